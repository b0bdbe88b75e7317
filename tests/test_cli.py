import argparse
import json
import os
import subprocess
import sys

import pytest

from lcp_solvers.experiments._meta import META_METHOD_NAMES
from lcp_solvers_cli import _cli, main

from .helpers import requires_sharding_jax
from .test_data import write_tiny_cifar10, write_tiny_mnist_idx


_TINY = ["--epochs", "1", "--hidden", "4", "--max-test", "20", "--no-progress"]


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["demo"],
        ["reproduce"],
        ["reproduce", "table1"],
        ["reproduce", "table2"],
        ["reproduce", "meta"],
    ],
)
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: lcp-solvers" in out
    if argv:
        assert argv[-1] in out


@pytest.mark.slow
def test_console_script_and_module_entry_points():
    for cmd in (
        [sys.executable, "-m", "lcp_solvers", "--help"],
        [sys.executable, "-m", "lcp_solvers_cli", "--help"],
        [
            sys.executable,
            "-c",
            "from lcp_solvers_cli import main; main()",
            "--help",
        ],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "demo" in proc.stdout and "reproduce" in proc.stdout
    import importlib.metadata

    (ep,) = [
        e
        for e in importlib.metadata.entry_points(group="console_scripts")
        if e.name == "lcp-solvers"
    ]
    assert ep.value == "lcp_solvers_cli:main"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["reproduce", "table1"], "--dataset"),
        (["reproduce", "table1", "--dataset", "cifar"], "invalid choice: 'cifar'"),
        (["demo", "--epochs", "0"], "expected a positive integer, got 0"),
        (["demo", "--alpha", "fast"], "expected a positive number, got 'fast'"),
        (["reproduce", "meta", "--methods", "maml"], "invalid choice: 'maml'"),
        (["demo", "--lr-schedule", "step"], "invalid choice: 'step'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["demo", "--devices", "0"], "expected a positive integer, got 0"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "--help" in err


@pytest.mark.parametrize(
    "option,path,message",
    [
        ("--json", "/nonexistent/dir/out.json", "does not exist"),
        ("--json", "/tmp", "is a directory"),
        ("--plot", "/proc/x.png", "cannot write there"),
    ],
)
def test_bad_output_paths_fail_before_any_work(option, path, message, capsys):
    # Checked before any data is loaded or any network trained: exit 2, one line.
    for argv in (["demo"], ["reproduce", "meta"]):
        assert main([*argv, option, path]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and option in err and message in err, err
    argv = ["reproduce", "table1", "--dataset", "mnist", "--data-dir", "/nonexistent"]
    assert main(argv) == 2
    assert "--data-dir /nonexistent: not a directory" in capsys.readouterr().err
    # MNIST is read from --data-dir: without it, stop at once; other data sets do
    # not use it, so a bad one is no reason to stop there.
    assert main(["reproduce", "table1", "--dataset", "mnist"]) == 2
    assert "--dataset mnist needs --data-dir DIR" in capsys.readouterr().err
    argv = ["reproduce", "table1", "--dataset", "digits", "--data-dir", "/nonexistent"]
    assert _cli._check_paths(_cli._build_parser().parse_args(argv)) is None


def test_unknown_option_names_the_subcommand(capsys):
    assert main(["demo", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert "lcp-solvers demo: error: unrecognized arguments: --bogus" in err
    assert "Run `lcp-solvers demo --help`." in err
    assert main(["reproduce", "meta", "--bogus", "1"]) == 2
    assert "Run `lcp-solvers reproduce meta --help`." in capsys.readouterr().err


def test_jacobian_penalty_takes_any_non_negative_number():
    for text, value in (("0", 0.0), ("0.00", 0.0), ("0e0", 0.0), ("2.5", 2.5)):
        assert _cli._non_negative_float(text) == value
    for text in ("-1", "nan", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="non-negative"):
            _cli._non_negative_float(text)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("lcp-solvers 0.")


def test_a_failing_run_ends_its_row_not_the_table(tmp_path, monkeypatch, capsys):
    def run_one(method, arch, dataset, args, seed):
        if method == "dropin" and seed == 1:
            # As equinox's errors under jit print: the stack, then the message.
            raise RuntimeError(
                "Above is the stack outside of JIT.\n  File x\n\nequinox."
                "EquinoxRuntimeError: The controlled equilibrium was not reached.\n"
                "\n-----\nmore"
            )
        return dict(
            test_accuracy=[0.5], seconds=[1.0], H=[float("nan")], steps=[0.0],
            solve_success=[1.0],
        )  # fmt: skip

    monkeypatch.setattr(_cli, "_run_one", run_one)
    out_json = tmp_path / "t2.json"
    argv = ["reproduce", "table2", "--dataset", "digits", "--seeds", "2"]
    argv += ["--architectures", "conv-deq", "--no-progress", "--json", str(out_json)]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "| LCP-DI (drop-in) | conv-deq | failed |" in captured.out
    assert "| LCP-DI | conv-deq | 50.00" in captured.out  # the next row still ran
    message = "RuntimeError: The controlled equilibrium was not reached."
    assert f"failed at seed 1: {message}" in captured.out
    assert f"seed 1 failed: {message}" in captured.err
    results = json.loads(out_json.read_text())
    assert results["LCP-DI (drop-in) [conv-deq]"] == {
        "error": message,
        "failed_seed": 1,
    }
    assert results["BP/RBP [conv-deq]"]["test_accuracy"] == 50.0


def test_ctrl_c_keeps_finished_runs_and_exits_130(tmp_path, monkeypatch, capsys):
    calls = []

    def run_one(method, arch, dataset, args, seed):
        if calls:
            raise KeyboardInterrupt
        calls.append(method)
        return dict(
            test_accuracy=[0.5], seconds=[1.0], H=[float("nan")], steps=[0.0],
            solve_success=[1.0],
        )  # fmt: skip

    monkeypatch.setattr(_cli, "_run_one", run_one)
    out_json = tmp_path / "t1.json"
    argv = ["reproduce", "table1", "--dataset", "digits", "--seeds", "1"]
    argv += ["--methods", "rbp", "di", "--architectures", "rnn", "--no-progress"]
    assert main([*argv, "--json", str(out_json)]) == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "interrupted" in captured.err
    assert "| BP/RBP | rnn |" in captured.out and "LCP-DI" not in captured.out
    assert set(json.loads(out_json.read_text())) == {"BP/RBP [rnn]"}


def test_missing_mnist_files(tmp_path, capsys):
    write_tiny_mnist_idx(tmp_path, skip=("train-labels-idx1-ubyte",))
    argv = ["reproduce", "table1", "--dataset", "mnist", "--data-dir", str(tmp_path)]
    assert main([*argv, *_TINY]) == 2
    err = capsys.readouterr().err
    assert "train-labels-idx1-ubyte" in err and "t10k-images" not in err


@pytest.mark.slow
def test_demo(tmp_path, capsys):
    out_json, png = tmp_path / "demo.json", tmp_path / "demo.png"
    argv = ["demo", *_TINY, "--max-train", "64", "--json", str(out_json)]
    assert main([*argv, "--plot", str(png)]) == 0
    results = json.loads(out_json.read_text())
    assert set(results) == {"BP/RBP", "LCP-DI"}
    for r in results.values():
        assert 0 <= r["test_accuracy"] <= 100
        # One epoch is all compilation: no time per epoch to report.
        assert r["seconds_per_epoch"] is None and r["mean_solve_steps"] > 0
    assert results["BP/RBP"]["final_H"] is None
    assert results["LCP-DI"]["final_H"] > 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "| LCP-DI | rnn |" in out and "| BP/RBP | rnn |" in out
    # One seed: no "± 0.00"; the columns are explained under the table.
    assert "±" not in out.split("solve steps |")[1].split("test acc.:")[0]
    assert "| n/a | " in out and "1 epoch," in out
    assert "solve steps: mean steps of the controlled solve" in out


@pytest.mark.slow
@requires_sharding_jax
def test_demo_on_two_simulated_devices_matches_one(tmp_path, capsys):
    argv = ["demo", *_TINY, "--max-train", "64", "--plot", str(tmp_path / "d.png")]
    assert main([*argv, "--json", str(tmp_path / "one.json")]) == 0
    one = json.loads((tmp_path / "one.json").read_text())
    # Two devices need a fresh process: JAX fixes its device count when it starts.
    script = (
        "import sys; from lcp_solvers_cli import main; sys.exit(main(sys.argv[1:]))"
    )
    two_json = tmp_path / "two.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            *argv,
            "--devices",
            "2",
            "--json",
            str(two_json),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = json.loads(two_json.read_text())
    for method in ("BP/RBP", "LCP-DI"):
        assert two[method]["test_accuracy"] == one[method]["test_accuracy"]
        assert two[method]["mean_solve_steps"] == one[method]["mean_solve_steps"]
    # float32 training; two devices only change the order of the batch sums.
    h1, h2 = one["LCP-DI"]["final_H"], two["LCP-DI"]["final_H"]
    assert abs(h2 - h1) <= 1e-5 * h1
    # More devices than XLA was told to simulate: a clear error, exit 2.
    proc = subprocess.run(
        [sys.executable, "-c", script, *argv, "--devices", "4"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )
    assert proc.returncode == 2
    assert "--devices 4: only 2 cpu device(s) are visible" in proc.stderr
    assert "XLA_FLAGS" in proc.stderr


@pytest.mark.slow
def test_table1_on_mnist_files(tmp_path, capsys):
    write_tiny_mnist_idx(tmp_path)
    out_json = tmp_path / "t1.json"
    argv = ["reproduce", "table1", "--dataset", "mnist", "--data-dir", str(tmp_path)]
    # (KP and LF training: tests/test_models.py.)
    argv += [*_TINY, "--seeds", "2", "--methods", "rbp", "ebd"]
    argv += ["--architectures", "ff", "--json", str(out_json)]
    assert main(argv) == 0
    results = json.loads(out_json.read_text())
    assert set(results) == {"BP/RBP [ff]", "LCP-EBD [ff]"}
    for r in results.values():
        assert len(r["test_accuracy_per_seed"]) == 2
    assert "5 test" in capsys.readouterr().out


@pytest.mark.slow
def test_table1_digits_rnn_with_progress_bars_and_cosine_step_size(capsys):
    tiny = [a for a in _TINY if a != "--no-progress"]
    argv = ["reproduce", "table1", "--dataset", "digits", *tiny, "--seeds", "1"]
    argv += ["--max-train", "64", "--methods", "di", "--architectures", "rnn"]
    assert main([*argv, "--lr-schedule", "cosine"]) == 0
    captured = capsys.readouterr()
    assert "| LCP-DI | rnn |" in captured.out
    assert "cosine step size" in captured.out
    assert "LCP-DI rnn seed 0" in captured.err  # the tqdm bar


@pytest.mark.slow
def test_table2_on_cifar10_files(tmp_path, capsys):
    # Every row of Table 2 on CIFAR-10-shaped files the test writes (3x32x32).
    write_tiny_cifar10(tmp_path, n_train=4, n_test=3)
    out_json = tmp_path / "t2.json"
    argv = ["reproduce", "table2", "--dataset", "cifar10", "--data-dir", str(tmp_path)]
    argv += ["--epochs", "1", "--channels", "2", "--seeds", "1", "--no-progress"]
    argv += ["--batch-size", "4", "--json", str(out_json)]
    assert main(argv) == 0
    results = json.loads(out_json.read_text())
    # The drop-in replaces a solve's backward pass: conv-ff has none; KP is on
    # conv-ff only, as in the paper.
    assert set(results) == {
        "BP/RBP [conv-ff]",
        "LCP-DI [conv-ff]",
        "LCP-DI (KP) [conv-ff]",
        "BP/RBP [conv-deq]",
        "LCP-DI (drop-in) [conv-deq]",
        "LCP-DI [conv-deq]",
    }
    for name, r in results.items():
        assert 0 <= r["test_accuracy"] <= 100
        assert r["solve_success"] == 1.0, name
    assert results["BP/RBP [conv-ff]"]["mean_solve_steps"] == 0
    assert "3x32x32" in capsys.readouterr().out


def test_table2_needs_cifar_files(tmp_path, capsys):
    assert main(["reproduce", "table2", "--dataset", "cifar10"]) == 2
    assert "--data-dir DIR" in capsys.readouterr().err
    argv = ["reproduce", "table2", "--dataset", "cifar10", "--data-dir", str(tmp_path)]
    assert main([*argv, "--epochs", "1", "--no-progress"]) == 2
    assert "data_batch_1" in capsys.readouterr().err


@pytest.mark.slow
def test_meta(tmp_path, capsys):
    out_json = tmp_path / "meta.json"
    argv = ["reproduce", "meta", "--seeds", "1", "--meta-steps", "2"]
    argv += ["--meta-batch", "2", "--width", "3", "--test-tasks", "3"]
    argv += ["--inner-steps", "3", "--no-progress", "--json", str(out_json)]
    assert main(argv) == 0
    results = json.loads(out_json.read_text())
    assert set(results) == set(META_METHOD_NAMES.values())
    assert set(_cli._META_METHODS) == set(META_METHOD_NAMES)
    for r in results.values():
        assert r["test_mse"] > 0 and len(r["curves"][0]) == 2
    out = capsys.readouterr().out
    assert "| LCP |" in out and "| Reptile (prox) |" in out
    assert "inner loop 3 x 0.003" in out


def test_meta_warns_with_counts_of_unconverged_inner_solves(monkeypatch, capsys):
    import lcp_solvers.experiments

    def fake_meta_train(method, *, meta_steps, meta_batch, **kwargs):
        total = meta_steps * meta_batch
        return dict(
            test_mse=1.0, curve=[1.0] * meta_steps, seconds=1.0, solve_success=1.0,
            solve_steps=0.0, test_inner_success=1.0,
            inner_success=1.0 if method == "imaml" else 1 - 1 / total,
        )  # fmt: skip

    monkeypatch.setattr(lcp_solvers.experiments, "meta_train", fake_meta_train)
    argv = ["reproduce", "meta", "--seeds", "2", "--meta-steps", "3000"]
    argv += ["--meta-batch", "5", "--methods", "lcp", "imaml", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Warning: LCP: 2 of 30,000 training and 0 of 200 test inner BFGS" in out
    assert "iMAML:" not in out


@pytest.mark.parametrize(
    "argv, status",
    [
        (["--help"], 0),
        (["reproduce", "table1", "--help"], 0),
        (["demo", "--epochs", "0"], 2),
        (["demo", "--json", "/nonexistent/dir/out.json"], 2),
        (["demo", "--devices", "3"], 2),  # batch 64 does not split over 3
    ],
)
def test_answers_without_importing_jax(argv, status):
    # Help, a bad argument and a bad path are answered before JAX (seconds) loads.
    code = (
        "import sys\n"
        "from lcp_solvers_cli import main\n"
        "try:\n"
        "    status = main(sys.argv[1:])\n"
        "except SystemExit as e:\n"
        "    status = e.code\n"
        "print('STATUS', status, 'jax' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60
    )
    assert f"STATUS {status} False" in proc.stdout, proc.stdout + proc.stderr


def test_optional_extras_are_not_imported_eagerly():
    code = (
        "import sys, lcp_solvers, lcp_solvers_cli; "
        "print(sorted(m for m in ('optax', 'sklearn', 'matplotlib', 'tqdm', "
        "'mnist1d') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_missing_examples_extra_is_a_clear_message(monkeypatch, capsys):
    monkeypatch.setattr(_cli, "_missing_extras", lambda: ["optax", "mnist1d"])
    assert _cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "missing: optax, mnist1d" in err
    assert "pip install 'lcp-solvers[examples]'" in err


def test_devices_with_a_training_set_smaller_than_one_batch(capsys):
    # 30 examples form one batch of 30, which does not split over 4 devices: a
    # one-line error before any training, not a traceback.
    argv = ["demo", *_TINY, "--max-train", "30", "--devices", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the 30 training examples" in err and "multiple of 4" in err, err
