"""``ckptviz app [PATH] [--port]``: the inspector and diff view as a standalone page (Voilà, 127.0.0.1)."""

from __future__ import annotations

from typing import Any


def run(args: Any) -> int:
    from ..app import serve

    return serve(args.path, port=args.port, open_browser=not args.no_browser)
