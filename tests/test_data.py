import gzip
import struct

import numpy as np
import pytest

from lcp_solvers.experiments import load_digits, load_mnist, load_mnist1d, read_idx


def _write_idx(path, array, compress):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as fh:
        fh.write(payload)


def _tiny_mnist(rng, n):
    x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    return x, y


def write_tiny_mnist_idx(directory, compress=True, skip=()):
    """Four IDX files with 12 train / 5 test images; returns the arrays written."""
    rng = np.random.default_rng(0)
    arrays = {}
    arrays["x_train"], arrays["y_train"] = _tiny_mnist(rng, 12)
    arrays["x_test"], arrays["y_test"] = _tiny_mnist(rng, 5)
    names = {
        "x_train": "train-images-idx3-ubyte",
        "y_train": "train-labels-idx1-ubyte",
        "x_test": "t10k-images-idx3-ubyte",
        "y_test": "t10k-labels-idx1-ubyte",
    }
    for k, name in names.items():
        if name in skip:
            continue
        _write_idx(
            directory / (name + (".gz" if compress else "")), arrays[k], compress
        )
    return arrays


def test_digits_split_is_stratified_standardised_and_seeded():
    ds = load_digits(seed=0)
    assert ds.x_train.shape == (1347, 64) and ds.x_test.shape == (450, 64)
    assert ds.x_train.dtype == np.float32
    np.testing.assert_allclose(ds.x_train.mean(axis=0), 0, atol=1e-5)
    assert set(np.unique(ds.y_test)) == set(range(10))
    # Stratified: each class is 10% of the test set to within rounding.
    assert np.bincount(ds.y_test).min() >= 43
    again = load_digits(seed=0)
    np.testing.assert_array_equal(ds.y_train, again.y_train)
    other = load_digits(seed=1)
    assert not np.array_equal(ds.y_train, other.y_train)
    small = load_digits(max_train=10, max_test=3)
    assert small.x_train.shape == (10, 64) and small.y_test.shape == (3,)


def test_mnist1d_is_generated_offline_and_leaves_numpy_seed_alone(monkeypatch):
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError("MNIST-1D must be generated, not downloaded")

    monkeypatch.setattr(requests, "get", no_network)
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    ds = load_mnist1d(num_samples=500)
    assert np.random.rand() == expected_next
    assert ds.x_train.shape == (400, 40) and ds.x_test.shape == (100, 40)
    assert set(np.unique(ds.y_train)) <= set(range(10))
    np.testing.assert_array_equal(ds.y_train, load_mnist1d(num_samples=500).y_train)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, compress):
    arrays = write_tiny_mnist_idx(tmp_path, compress=compress)
    suffix = ".gz" if compress else ""
    np.testing.assert_array_equal(
        read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}"), arrays["x_train"]
    )
    np.testing.assert_array_equal(
        read_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}"), arrays["y_test"]
    )
    big = np.arange(6, dtype=np.int32).reshape(2, 3) - 3
    _write_idx(tmp_path / "ints", big, compress=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "ints"), big)


def test_load_mnist_from_idx_and_npz(tmp_path):
    arrays = write_tiny_mnist_idx(tmp_path)
    ds = load_mnist(tmp_path)
    assert ds.x_train.shape == (12, 784) and ds.x_test.shape == (5, 784)
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
    # Standardisation with the training statistics, computed independently.
    x = arrays["x_train"].reshape(12, -1) / 255.0
    expected = (x - x.mean(0)) / np.maximum(x.std(0), 1e-2)
    np.testing.assert_allclose(ds.x_train, expected, rtol=1e-5, atol=1e-5)

    npz_dir = tmp_path / "npz"
    npz_dir.mkdir()
    np.savez(npz_dir / "mnist.npz", **arrays)
    ds_npz = load_mnist(npz_dir)
    np.testing.assert_array_equal(ds_npz.x_test, ds.x_test)
    np.testing.assert_array_equal(ds_npz.y_test, ds.y_test)


def test_missing_mnist_files_are_named(tmp_path):
    write_tiny_mnist_idx(tmp_path, skip=("t10k-images-idx3-ubyte",))
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte") as e:
        load_mnist(tmp_path)
    assert "train-images" not in str(e.value).split("missing from")[1].split(":")[1]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mnist(tmp_path / "nowhere")


def test_bad_mnist_files(tmp_path):
    arrays = write_tiny_mnist_idx(tmp_path, compress=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(ValueError, match="not an IDX file"):
        load_mnist(tmp_path)
    _write_idx(tmp_path / "train-images-idx3-ubyte", arrays["x_train"][:3], False)
    with pytest.raises(ValueError, match="3 images but 12 labels"):
        load_mnist(tmp_path)
    with open(tmp_path / "train-images-idx3-ubyte", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(ValueError, match="truncated"):
        load_mnist(tmp_path)
