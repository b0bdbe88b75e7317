import sys

from ._cli import main


# Guarded: tools that import every submodule must not run the command.
if __name__ == "__main__":
    sys.exit(main())
