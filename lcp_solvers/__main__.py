import sys


def _run() -> int:
    # The command lives outside the library (see `lcp_solvers_cli`).
    from lcp_solvers_cli import main

    return main()


# Guarded: tools that import every submodule (e.g. the docs' API inspection) must not
# run the command.
if __name__ == "__main__":
    sys.exit(_run())
