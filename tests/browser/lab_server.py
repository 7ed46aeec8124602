"""A throwaway JupyterLab server for browser tests: a temp copy of a notebook folder, fresh Jupyter config,
runtime, settings and workspace dirs, a kernelspec pointing at this interpreter, and a clean stop by PID."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90.0

# User settings written into JUPYTERLAB_SETTINGS_DIR: no news toast or update check, no autosave,
# every cell rendered in the DOM (no windowing), so selectors see widgets below the fold.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}
# Server config written into JUPYTER_CONFIG_DIR: nothing may reach for the internet (news, update check,
# PyPI extension manager), and nothing slows a 2-core machine down (language-server scan, terminals).
SERVER_CONFIG = {
    "LabApp": {
        "news_url": None,
        "check_for_updates_class": "jupyterlab.handlers.announcements.NeverCheckForUpdate",
        "extension_manager": "readonly",
    },
    "ServerApp": {"terminals_enabled": False},
    "LanguageServerManager": {"autodetect": False},
}
# Page config: skip the front end's "is a rebuild needed?" check (seconds of server CPU per page load).
PAGE_CONFIG = {"buildCheck": False, "buildAvailable": False}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


class JupyterLab:
    """One running server. ``url(path)`` gives an authenticated URL; ``root`` is the served temp dir."""

    def __init__(self, src_dir: Path, base_dir: Path) -> None:
        self.src_dir = Path(src_dir)
        self.base_dir = Path(base_dir)
        self.root = self.base_dir / "root"
        self.token = secrets.token_hex(16)
        self.port = 0
        self.log_path = self.base_dir / "server.log"
        self.proc: subprocess.Popen | None = None

    # -- URLs and REST -------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "lab") -> str:
        """Authenticated URL of a server path, e.g. ``url("lab/tree/x.ipynb")`` or ``url("api/status")``."""
        path = path.lstrip("/")
        sep = "&" if "?" in path else "?"
        return f"{self.base_url}/{path}{sep}token={self.token}"

    def notebook_url(self, nb_path: str) -> str:
        """URL opening ``nb_path`` (relative to ``root``) in JupyterLab with a reset workspace (no stale tabs)."""
        return self.url(f"lab/tree/{urllib.parse.quote(nb_path)}?reset")

    def api(self, method: str, path: str, body: object = None, timeout: float = 10.0) -> object:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url(path), data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # loopback only
            body = resp.read()
        return json.loads(body) if body else None

    def delete_sessions(self, nb_path: str | None = None) -> int:
        """Shut down the sessions (and kernels) of ``nb_path``, or all of them; returns how many."""
        sessions = self.api("GET", "api/sessions")
        doomed = [s for s in sessions if nb_path is None or s.get("path") == nb_path]
        for s in doomed:
            self.api("DELETE", f"api/sessions/{s['id']}")
        return len(doomed)

    def start_session(self, nb_path: str) -> dict:
        """Start (or reuse) the kernel session of ``nb_path`` through the REST API, with the kernel named in the
        notebook's metadata (default ``python3``). The page then attaches to it, so the kernel boots while the
        front end loads instead of after."""
        meta = json.loads((self.root / nb_path).read_text()).get("metadata", {})
        kernel = meta.get("kernelspec", {}).get("name", "python3")
        body = {"path": nb_path, "name": Path(nb_path).name, "type": "notebook", "kernel": {"name": kernel}}
        return self.api("POST", "api/sessions", body)

    # -- lifecycle -----------------------------------------------------------------------------------------
    def _prepare(self) -> dict[str, str]:
        if self.root.exists():
            shutil.rmtree(self.root)
        shutil.copytree(self.src_dir, self.root, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
        dirs = {
            name: self.base_dir / name.lower()
            for name in (
                "JUPYTER_CONFIG_DIR",
                "JUPYTER_DATA_DIR",
                "JUPYTER_RUNTIME_DIR",
                "JUPYTERLAB_SETTINGS_DIR",
                "JUPYTERLAB_WORKSPACES_DIR",
                "IPYTHONDIR",
            )
        }
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        for rel, data in LAB_SETTINGS.items():
            _write_json(dirs["JUPYTERLAB_SETTINGS_DIR"] / rel, data)
        _write_json(dirs["JUPYTER_CONFIG_DIR"] / "jupyter_server_config.json", SERVER_CONFIG)
        _write_json(dirs["JUPYTER_CONFIG_DIR"] / "labconfig" / "page_config.json", PAGE_CONFIG)
        # A "python3" kernelspec that runs *this* interpreter; JUPYTER_PATH beats every other kernel dir.
        kernel_path = self.base_dir / "jupyter_path"
        _write_json(
            kernel_path / "kernels" / "python3" / "kernel.json",
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (ipykernel)",
                "language": "python",
                "metadata": {"debugger": True},
            },
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "JPY_"))}
        env.update({k: str(v) for k, v in dirs.items()})
        env["JUPYTER_PATH"] = str(kernel_path)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        return env

    def start(self, timeout: float = START_TIMEOUT_S, attempts: int = 3) -> JupyterLab:
        env = self._prepare()
        for attempt in range(1, attempts + 1):
            self.port = free_port()
            cmd = [
                sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
                "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={self.root}", "--allow-root", "--LabApp.expose_app_in_browser=True",
            ]  # fmt: skip
            log = open(self.log_path, "a")  # the child process owns it from here
            log.write(f"\n=== attempt {attempt}: {' '.join(cmd)}\n")
            log.flush()
            self.proc = subprocess.Popen(
                cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
            log.close()
            if self._wait_ready(timeout):
                return self
            port_clash = "address already in use" in self.log_tail(4000).lower()
            self.stop()
            if not port_clash:
                break
        raise RuntimeError(
            f"JupyterLab did not answer GET /api/status within {timeout:.0f} s (serving {self.src_dir}).\n"
            f"--- server log tail ({self.log_path}) ---\n{self.log_tail()}"
        )

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                self.api("GET", "api/status", timeout=2)
                return True
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.25)
        return False

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the server by PID (it shuts its kernels down); SIGKILL it and any leftover kernels if stuck."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        children = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        for child in children:  # kernels run in their own session; make sure none outlives the test run
            try:
                if child.is_running():
                    child.kill()
            except Exception:  # already gone
                pass

    def log_tail(self, chars: int = 6000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return text[-chars:]


def _descendants(pid: int) -> list:
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:  # psutil missing or process gone
        return []
