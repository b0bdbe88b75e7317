"""Data parallelism on 8 simulated CPU devices: the checks of `devices_checks.py`, run
once in a process of their own (the rest of the suite keeps one device)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import requires_sharding_jax


pytestmark = [pytest.mark.slow, requires_sharding_jax]

# float64 throughout: a sharded step differs from the one-device step only by the
# order of its reductions (measured: at most 5e-16 relative).
TOLERANCE = 1e-12
MOVES_DATA = ("all-gather", "all-to-all", "collective-permute")


@pytest.fixture(scope="module")
def records():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    script = Path(__file__).with_name("devices_checks.py")
    proc = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["check"]: r for r in map(json.loads, lines)}


def _ops(collectives):
    return [(op, size) for op, _, size in collectives]


def test_the_detector_sees_communication_that_grows_with_the_batch(records):
    # Sorting along the batch axis has to bring the batch together: if this were
    # not reported, the checks below could not fail.
    record = records["control_sort_over_batch"]
    small, large = record["collectives"]["32"], record["collectives"]["64"]
    assert any(op in MOVES_DATA for op, _, _ in small)
    assert _ops(small) != _ops(large)


@pytest.mark.parametrize(
    "check",
    [
        "dropin_implicit_adjoint",  # the peer, for parity
        "dropin_least_control_adjoint",
        "objective_imex",
        "objective_default",
        "train_step_least_control",
    ],
)
def test_sharded_step_matches_one_device_and_communicates_no_batch(records, check):
    record = records[check]
    assert record["rel_diff"] <= TOLERANCE
    small, large = record["collectives"]["32"], record["collectives"]["64"]
    # Only reductions, and the same ones whatever the batch: parameter-sized
    # gradients and scalars (stopping tests, error flags).
    assert not [c for c in small + large if c[0] in MOVES_DATA]
    assert _ops(small) == _ops(large)


def test_recurrent_backprop_baseline_is_right_when_sharded(records):
    # The baseline's own solve (GMRES over the whole batch in one system) reduces a
    # batch-sized vector; only its values are checked here (docs/devices.md).
    record = records["train_step_recurrent_backprop"]
    assert record["rel_diff"] <= TOLERANCE
    small = record["collectives"]["32"]
    assert not [c for c in small if c[0] in ("all-gather", "all-to-all")]


def test_train_classifier_on_a_mesh_matches_one_device(records):
    record = records["train_classifier"]
    assert record["rel_diff"] <= TOLERANCE
    on_mesh, on_one = record["accuracy"]
    assert on_mesh == on_one
    assert record["replicated"] and record["devices"] == 8


def test_a_batch_that_does_not_split_over_the_devices_is_refused(records):
    record = records["errors"]
    assert "shape (12, 3)" in record["shard_batch"]
    assert "multiple of 8" in record["shard_batch"]
    for case in ("train_classifier", "train_classifier_small_set"):
        assert "a batch of 12 examples" in record[case]
        assert "multiple of 8" in record[case]
    # Typed PRNG keys (one per sample) are split like any other leaf.
    assert record["keys_split_over"] == 8 and record["keys_equal"]
