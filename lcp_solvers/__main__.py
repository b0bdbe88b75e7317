import sys


def _run() -> int:
    # The command lives with the experiments, on top of the library.
    from .experiments._cli import main

    return main()


# Guarded: tools that import every submodule (e.g. the docs' API inspection) must not
# run the command.
if __name__ == "__main__":
    sys.exit(_run())
