"""``python -m ntkit``: the ``ntkit`` command line (with no arguments, the demo)."""

from .cli import main

if __name__ == "__main__":
    main()
