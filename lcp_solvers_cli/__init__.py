"""The `lcp-solvers` command line, kept outside the `lcp_solvers` package so that
starting it does not import JAX: `--help`, a bad argument and a bad output path are
answered at once, and the experiments (`lcp_solvers.experiments`) are imported only
when a command runs."""

from ._cli import main as main
