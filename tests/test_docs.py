"""The README's quick example and the how-to guides run as printed, and print what
they show."""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from .helpers import requires_sharding_jax


_README = pathlib.Path(__file__).parent.parent / "README.md"


def _blocks(text, language):
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.M | re.S)


def _numbers(text):
    return np.array([float(x) for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", text)])


@pytest.mark.slow
def test_readme_quick_example_prints_what_the_readme_shows():
    text = _README.read_text()
    (code,) = _blocks(text, "python")
    (shown,) = _blocks(text, "text")
    # A fresh process: the test session runs in float64, the README in JAX's default.
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert [line.split(":")[0] for line in out.stdout.splitlines()] == [
        line.split(":")[0] for line in shown.splitlines()
    ]
    got, expected = _numbers(out.stdout), _numbers(shown)
    # Float32 results of another JAX version or CPU may differ in the last digits.
    np.testing.assert_allclose(got, expected, rtol=1e-3)
    assert 0 < got[-1] < 1e-2  # the stated "about 0.1%"


@pytest.mark.slow
def test_howto_train_rnn_runs_and_learns():
    # docs/howto_rnn.md's script, as printed: 10 epochs on scikit-learn's digits.
    text = (_README.parent / "docs" / "howto_rnn.md").read_text()
    code = _blocks(text, "python")[0]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 10 and lines[-1].startswith("epoch 10:")
    accuracy = [float(re.search(r"accuracy (\d+\.\d)%", line)[1]) for line in lines]
    control = [float(re.search(r"‖ψ‖² (\d+\.\d+)", line)[1]) for line in lines]
    # The doc says "about 85%" and that the control falls as the network learns.
    assert accuracy[-1] > 80 and accuracy[-1] > accuracy[0], accuracy
    assert control[-1] < control[0], control


@pytest.mark.slow
def test_howto_deq_runs_and_both_adjoints_learn():
    # docs/howto_deq.md's script, as printed.
    text = (_README.parent / "docs" / "howto_deq.md").read_text()
    (code,) = _blocks(text, "python")
    (shown,) = _blocks(text, "text")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[1:]] == [
        line.split(":")[0] for line in shown.splitlines()[1:]
    ]
    gap = float(re.search(r"differ by (\S+) ", lines[0])[1])
    accuracy = [float(re.search(r"accuracy (\d+\.\d)%", line)[1]) for line in lines[1:]]
    # The page: the default strength is the implicit gradient to about 0.3% and
    # trains to the same accuracy (95.1%); strength 0.1 trains about as well.
    assert 1e-4 < gap < 1e-2, gap
    assert accuracy[0] > 93 and abs(accuracy[1] - accuracy[0]) <= 0.5, accuracy
    assert accuracy[2] > 92, accuracy


_NUMBER = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


@pytest.mark.slow
def test_troubleshooting_page_prints_what_it_shows():
    # docs/troubleshooting.md: its python blocks are one script; its text blocks,
    # in order, are that script's output.
    text = (_README.parent / "docs" / "troubleshooting.md").read_text()
    code = "\n".join(_blocks(text, "python"))
    shown = "".join(_blocks(text, "text")).splitlines()
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = out.stdout.splitlines()
    assert [re.sub(_NUMBER, "#", line) for line in got] == [
        re.sub(_NUMBER, "#", line) for line in shown
    ]
    numbers = [[float(x) for x in re.findall(_NUMBER, line)] for line in got]
    expected = [[float(x) for x in re.findall(_NUMBER, line)] for line in shown]
    # The page prints one significant digit (float32 gaps vary in the last bits
    # between JAX versions).
    for g, e, line in zip(numbers, expected, got):
        np.testing.assert_allclose(g, e, rtol=0.35, err_msg=line)


@pytest.mark.slow
@requires_sharding_jax
def test_devices_page_recipe_prints_what_it_shows():
    # docs/devices.md's recipe, as printed, in a fresh process (it simulates 4 CPU
    # devices before JAX starts; XLA_FLAGS of the test session is left out).
    text = (_README.parent / "docs" / "devices.md").read_text()
    code = _blocks(text, "python")[0]
    (shown,) = _blocks(text, "text")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got, shown = out.stdout.splitlines(), shown.splitlines()
    assert [re.sub(_NUMBER, "#", line) for line in got] == [
        re.sub(_NUMBER, "#", line) for line in shown
    ]
    losses = [float(line.split()[-1]) for line in got[:3]]
    expected = [float(line.split()[-1]) for line in shown[:3]]
    np.testing.assert_allclose(losses, expected, rtol=1e-4)
    # The sharded steps equal the one-device steps to float32 rounding.
    assert float(got[4].split()[-1]) <= 1e-6, got[4]
    assert got[3] == shown[3] and got[5:] == shown[5:]
