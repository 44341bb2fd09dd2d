"""``python -m deep_ep``: the ``deep-ep`` command line."""

import sys

from deep_ep.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m deep_ep"))
