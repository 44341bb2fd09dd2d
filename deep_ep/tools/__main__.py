"""``python -m deep_ep.tools NAME [ARGS...]``: run a measurement tool (no name: list them)."""

import sys

from deep_ep.tools import main

if __name__ == "__main__":
    sys.exit(main())
