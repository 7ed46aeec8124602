"""``python -m ckptviz ...``: the same command line as ``ckptviz ...``."""

import sys

from .cli import main

sys.exit(main())
