import gzip
import pathlib
import pickle
import struct

import numpy as np
import pytest

from lcp_solvers.experiments import (
    load_cifar10,
    load_dataset,
    load_digits,
    load_mnist,
    load_mnist1d,
    read_idx,
)


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


def write_tiny_cifar10(directory, n_train=2, n_test=3, protocol=2, skip=()):
    """The six CIFAR-10 python batches, as pickled dicts with bytes keys like the
    real ones, with `n_train` images per training batch; returns the arrays."""
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_train
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        written[name] = (data, labels)
        if name in skip:
            continue
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data}
        (directory / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return written


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("subfolder", [False, True])
def test_load_cifar10_from_python_batches(tmp_path, protocol, subfolder):
    where = tmp_path / "cifar-10-batches-py" if subfolder else tmp_path
    written = write_tiny_cifar10(where, protocol=protocol)
    ds = load_cifar10(tmp_path)
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.x_train.dtype == np.float32 and ds.num_classes == 10
    train = [written[f"data_batch_{i}"] for i in range(1, 6)]
    np.testing.assert_array_equal(ds.y_train, sum((y for _, y in train), []))
    np.testing.assert_array_equal(ds.y_test, written["test_batch"][1])
    # Per channel, with the training images' statistics (an independent numpy
    # computation over the raw bytes, images laid out as 3 planes of 32x32).
    raw = np.concatenate([x for x, _ in train]).reshape(-1, 3, 1024) / 255.0
    mean, std = raw.mean(axis=(0, 2)), raw.std(axis=(0, 2))
    test = written["test_batch"][0].reshape(-1, 3, 1024) / 255.0
    want = (test - mean[None, :, None]) / std[None, :, None]
    np.testing.assert_allclose(
        ds.x_test.reshape(3, 3, 1024), want, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(ds.x_train.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(axis=(0, 2, 3)), 1, atol=1e-4)
    small = load_dataset("cifar10", data_dir=tmp_path, max_train=4, max_test=1)
    assert small.x_train.shape[0] == 4 and small.x_test.shape[0] == 1


def test_cifar10_missing_and_bad_files(tmp_path):
    write_tiny_cifar10(tmp_path, skip=("data_batch_3", "test_batch"))
    with pytest.raises(FileNotFoundError, match="data_batch_3, test_batch"):
        load_cifar10(tmp_path)
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("cifar10")
    write_tiny_cifar10(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    )
    with pytest.raises(ValueError, match="data_batch_2.*shape"):
        load_cifar10(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        load_cifar10(tmp_path)


class _Touch:
    # A pickle that would create a file when loaded.
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def test_cifar10_batches_cannot_run_code(tmp_path):
    write_tiny_cifar10(tmp_path)
    marker = tmp_path / "ran"
    batch = {b"data": _Touch(marker), b"labels": []}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match="refusing to load"):
        load_cifar10(tmp_path)
    assert not marker.exists()


def test_digits_as_images():
    ds = load_digits(as_images=True)
    flat = load_digits()
    assert ds.x_train.shape == (len(flat.x_train), 1, 8, 8)
    np.testing.assert_array_equal(ds.y_train, flat.y_train)
    # One channel: one mean and standard deviation over all training pixels.
    assert abs(float(ds.x_train.mean())) < 1e-5
    assert abs(float(ds.x_train.std()) - 1) < 1e-4
