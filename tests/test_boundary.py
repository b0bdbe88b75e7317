"""The experiments and the command sit on top of the library: `lcp_solvers.experiments`
and `lcp_solvers_cli` use only the public names of `lcp_solvers`, and the library core
never imports either."""

import ast
import pathlib


# The source tree, read as text: the check does not need the library to import.
_PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lcp_solvers"
_EXPERIMENTS = _PACKAGE / "experiments"
_COMMAND = _PACKAGE.parent / "lcp_solvers_cli"


def _imported_modules(path: pathlib.Path, package: str) -> list[tuple[int, str]]:
    """`(line, module)` of every import in `path`, relative ones resolved against
    `package` (the dotted package the file lives in) and prefixed with as many dots
    as they climbed above it (`..x` stays visible as `..x`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 0:
                modules = [base]
            elif node.level == 1:
                # `from . import x` may import the submodule `x`.
                prefix = f"{package}.{base}" if base else package
                modules = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
            else:
                modules = ["." * node.level + base]
            found += [(node.lineno, m) for m in modules]
    return found


def _boundary_violations(path: pathlib.Path, package: str) -> list[str]:
    bad = []
    for line, module in _imported_modules(path, package):
        parts = module.split(".")
        relative_up = module.startswith("..")
        private_core = (
            parts[0] == "lcp_solvers" and len(parts) > 1 and parts[1].startswith("_")
        )
        if relative_up or private_core:
            bad.append(f"{path.name}:{line}: imports {module}")
    return bad


def _core_violations(path: pathlib.Path) -> list[str]:
    bad = []
    for line, module in _imported_modules(path, "lcp_solvers"):
        if module.split(".")[:2] == ["lcp_solvers", "experiments"]:
            bad.append(f"{path.name}:{line}: imports {module}")
    return bad


def test_experiments_use_only_public_names():
    files = [(f, "lcp_solvers.experiments") for f in sorted(_EXPERIMENTS.glob("*.py"))]
    files += [(f, "lcp_solvers_cli") for f in sorted(_COMMAND.glob("*.py"))]
    assert len(files) >= 8
    bad = [v for f, package in files for v in _boundary_violations(f, package)]
    assert bad == [], "experiments import library privates:\n" + "\n".join(bad)


def test_core_does_not_import_experiments():
    files = sorted(_PACKAGE.glob("*.py"))
    assert any(f.name == "_least_control.py" for f in files)
    # `__main__` runs the command, which lives with the experiments: not the core.
    core = [f for f in files if f.name != "__main__.py"]
    bad = [v for f in core for v in _core_violations(f)]
    assert bad == [], "the core imports the experiments:\n" + "\n".join(bad)


def test_the_checks_catch_violations(tmp_path):
    bad = tmp_path / "bad.py"
    for source in (
        "from .._controller import DynamicInversion\n",
        "from lcp_solvers._misc import theta_vjp\n",
        "import lcp_solvers._solution\n",
        "def f():\n    from ..models import x\n",
    ):
        bad.write_text(source)
        assert _boundary_violations(bad, "lcp_solvers.experiments"), source
    for source in (
        "import lcp_solvers as lcp\nfrom lcp_solvers import RESULTS\n",
        "from ._train import mean_of_successful\nfrom . import meta_train\n",
    ):
        bad.write_text(source)
        assert not _boundary_violations(bad, "lcp_solvers.experiments"), source
    for source in (
        "from .experiments import train_classifier\n",
        "from . import experiments\n",
        "import lcp_solvers.experiments._cli\n",
    ):
        bad.write_text(source)
        assert _core_violations(bad), source
    bad.write_text("from ._controller import DynamicInversion\n")
    assert not _core_violations(bad)
