import sys


def _run() -> int:
    # The command lives with the experiments, on top of the library.
    from .experiments._cli import main

    return main()


sys.exit(_run())
