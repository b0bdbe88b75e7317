"""Offline data sets for the experiments: nothing here ever downloads."""

import gzip
import io
import pathlib
import pickle
import struct
from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
    """A classification data set as numpy arrays.

    **Fields:**

    - `x_train`, `x_test`: float arrays of shape `(n, features)`, standardised with the
        training set's per-feature mean and standard deviation; or, for image data
        sets (`load_cifar10`, `load_digits(as_images=True)`), of shape
        `(n, channels, height, width)` (channels first, as `equinox.nn.Conv2d`
        takes them), standardised per channel.
    - `y_train`, `y_test`: integer labels of shape `(n,)`.
    - `num_classes`: the number of classes.
    - `name`: a short name for tables.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str


def _standardise(x_train, x_test):
    mean = x_train.mean(axis=0)
    # Constant pixels (the borders of digits/MNIST) would divide by zero.
    std = np.maximum(x_train.std(axis=0), 1e-2)
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(
        np.float32
    )


def _standardise_channels(x_train, x_test):
    # One mean and standard deviation per channel (axis 1) over the training images,
    # as image pipelines normalise.
    axes = (0, 2, 3)
    mean = x_train.mean(axis=axes, keepdims=True)
    std = np.maximum(x_train.std(axis=axes, keepdims=True), 1e-2)
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(
        np.float32
    )


def _subsample(ds: Dataset, max_train: int | None, max_test: int | None) -> Dataset:
    if max_train is not None:
        ds = ds._replace(x_train=ds.x_train[:max_train], y_train=ds.y_train[:max_train])
    if max_test is not None:
        ds = ds._replace(x_test=ds.x_test[:max_test], y_test=ds.y_test[:max_test])
    return ds


def load_digits(
    seed: int = 0,
    test_fraction: float = 0.25,
    max_train: int | None = None,
    max_test: int | None = None,
    as_images: bool = False,
) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the package),
    split into train and test sets by a seeded stratified shuffle.

    **Arguments:**

    - `seed`: seed of the train/test split.
    - `test_fraction`: fraction of the images held out for testing.
    - `max_train`, `max_test`: optional caps on the number of examples (for quick runs).
    - `as_images`: return `(n, 1, 8, 8)` images standardised over the whole channel
        (an offline stand-in for image data sets such as CIFAR-10) instead of
        64 features standardised one by one.

    **Returns:**

    A [`lcp_solvers.experiments.Dataset`][].
    """
    from sklearn.datasets import load_digits as _load_digits
    from sklearn.model_selection import train_test_split

    x, y = _load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        np.asarray(x, np.float64),
        np.asarray(y, np.int32),
        test_size=test_fraction,
        random_state=seed,
        stratify=y,
    )
    if as_images:
        x_train, x_test = _standardise_channels(
            np.reshape(x_train, (-1, 1, 8, 8)), np.reshape(x_test, (-1, 1, 8, 8))
        )
    else:
        x_train, x_test = _standardise(x_train, x_test)
    ds = Dataset(x_train, np.asarray(y_train), x_test, np.asarray(y_test), 10, "digits")
    return _subsample(ds, max_train, max_test)


def load_mnist1d(
    num_samples: int = 5000,
    seed: int = 42,
    max_train: int | None = None,
    max_test: int | None = None,
) -> Dataset:
    """MNIST-1D (Greydanus, 2020), generated procedurally by `mnist1d`'s `make_dataset`.

    The package's `get_dataset` downloads a pickle; it is never called. With the
    default arguments this is the standard 4,000/1,000 split of 40-dimensional signals.

    **Arguments:**

    - `num_samples`: total number of signals generated (80% train, 20% test).
    - `seed`: seed of the generator.
    - `max_train`, `max_test`: optional caps on the number of examples.

    **Returns:**

    A [`lcp_solvers.experiments.Dataset`][].
    """
    from mnist1d.data import get_dataset_args, make_dataset
    from mnist1d.utils import ObjectView

    defaults = get_dataset_args(as_dict=True)
    assert isinstance(defaults, dict)
    args = ObjectView({**defaults, "num_samples": num_samples, "seed": seed})
    # `make_dataset` reseeds numpy's global generator; do not leak that to the caller.
    state = np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(state)
    x_train, x_test = _standardise(
        np.asarray(data["x"], np.float64), np.asarray(data["x_test"], np.float64)
    )
    ds = Dataset(
        x_train,
        np.asarray(data["y"], np.int32),
        x_test,
        np.asarray(data["y_test"], np.int32),
        10,
        "mnist1d",
    )
    return _subsample(ds, max_train, max_test)


_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: str | pathlib.Path) -> np.ndarray:
    """Read one IDX file (the format MNIST is distributed in), gzipped or not.

    **Arguments:**

    - `path`: the file; a name ending in `.gz` is decompressed.

    **Returns:**

    The stored array, with the shape given in the file's header.
    """
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file (bad magic number). Pass the MNIST files as "
            "distributed (e.g. `train-images-idx3-ubyte.gz`) or an `mnist.npz`."
        )
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(
            f"{path} is truncated: its header promises shape {shape} "
            f"({int(np.prod(shape))} values) but it holds {data.size}."
        )
    return data.reshape(shape)


def _find(data_dir: pathlib.Path, stem: str) -> pathlib.Path | None:
    # The canonical names and the dotted variant torchvision writes, each maybe gzipped.
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def load_mnist(
    data_dir: str | pathlib.Path,
    max_train: int | None = None,
    max_test: int | None = None,
) -> Dataset:
    """MNIST from files already on disk; nothing is downloaded.

    `data_dir` must hold either `mnist.npz` (arrays `x_train`, `y_train`, `x_test`,
    `y_test`, as written by Keras) or the four standard IDX files
    `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
    `t10k-labels-idx1-ubyte` (each optionally gzipped).

    **Arguments:**

    - `data_dir`: the directory holding the files.
    - `max_train`, `max_test`: optional caps on the number of examples.

    **Returns:**

    A [`lcp_solvers.experiments.Dataset`][] with images flattened to 784 features.

    **Raises:**

    `FileNotFoundError` naming the directory and every missing file.
    """
    data_dir = pathlib.Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"MNIST data directory {str(data_dir)!r} does not exist. Pass "
            "`--data-dir` pointing at a directory with `mnist.npz` or the four IDX "
            f"files ({', '.join(_IDX_FILES.values())}, optionally .gz)."
        )
    npz = data_dir / "mnist.npz"
    if npz.is_file():
        with np.load(npz) as f:
            missing = [k for k in _IDX_FILES if k not in f]
            if missing:
                raise ValueError(
                    f"{npz} lacks the arrays {missing}; it must hold x_train, y_train, "
                    "x_test and y_test."
                )
            arrays = {k: np.asarray(f[k]) for k in _IDX_FILES}
    else:
        paths = {k: _find(data_dir, stem) for k, stem in _IDX_FILES.items()}
        missing = [_IDX_FILES[k] for k, p in paths.items() if p is None]
        if missing:
            raise FileNotFoundError(
                f"MNIST files missing from {str(data_dir)!r}: {', '.join(missing)} "
                "(plain or .gz). Put the four IDX files there, or an `mnist.npz` "
                "with arrays x_train, y_train, x_test, y_test. Nothing is downloaded."
            )
        arrays = {k: read_idx(p) for k, p in paths.items()}  # pyright: ignore
    for split in ("train", "test"):
        nx, ny = len(arrays[f"x_{split}"]), len(arrays[f"y_{split}"])
        if nx != ny:
            raise ValueError(
                f"MNIST {split} set in {str(data_dir)!r} has {nx} images but {ny} "
                "labels."
            )
    x_train = arrays["x_train"].reshape(len(arrays["x_train"]), -1) / 255.0
    x_test = arrays["x_test"].reshape(len(arrays["x_test"]), -1) / 255.0
    x_train, x_test = _standardise(x_train, x_test)
    ds = Dataset(
        x_train,
        arrays["y_train"].astype(np.int32),
        x_test,
        arrays["y_test"].astype(np.int32),
        10,
        "mnist",
    )
    return _subsample(ds, max_train, max_test)


_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
# What CIFAR-10's python batches legitimately reference: numpy arrays and dtypes.
_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # A batch re-saved from Python 3: protocol 2 writes bytes with `_codecs.encode`,
    # protocol 5 builds arrays from a buffer.
    ("_codecs", "encode"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _BatchUnpickler(pickle.Unpickler):
    # The batches are pickles; refuse anything but arrays, so that a stray file can
    # not run code when it is read.
    def find_class(self, module, name):
        if (module, name) in _CIFAR_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a CIFAR-10 batch holds only arrays"
        )


def _read_cifar_batch(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    bad_file = (pickle.UnpicklingError, EOFError, KeyError, AttributeError, ValueError)
    try:
        raw = _BatchUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        batch = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
        data = np.asarray(batch["data"], np.uint8)
        labels = np.asarray(batch["labels"], np.int32)
    except bad_file as e:
        raise ValueError(
            f"{path} is not a CIFAR-10 python batch (a pickled dict with `data`, "
            f"uint8 of shape (n, 3072), and `labels`): {e}"
        ) from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(
            f"{path}: expected `data` of shape (n, 3072) and n labels, got "
            f"{data.shape} and {len(labels)} labels."
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(
    data_dir: str | pathlib.Path,
    max_train: int | None = None,
    max_test: int | None = None,
) -> Dataset:
    """CIFAR-10 from the standard python batches already on disk; nothing is
    downloaded.

    `data_dir` holds the five training batches `data_batch_1` … `data_batch_5` and
    `test_batch` of `cifar-10-python.tar.gz`, directly or in its
    `cifar-10-batches-py` folder. The batches are pickles: only arrays are accepted
    from them (anything else is refused before it is built).

    **Arguments:**

    - `data_dir`: the directory holding the batches.
    - `max_train`, `max_test`: optional caps on the number of examples.

    **Returns:**

    A [`lcp_solvers.experiments.Dataset`][] of `(n, 3, 32, 32)` float32 images
    standardised per channel with the training set's mean and standard deviation
    (50,000 training and 10,000 test images in full).

    **Raises:**

    `FileNotFoundError` naming the directory and every missing batch; `ValueError`
    for a file that is not a CIFAR-10 batch.
    """
    data_dir = pathlib.Path(data_dir)
    if (data_dir / "cifar-10-batches-py").is_dir():
        data_dir = data_dir / "cifar-10-batches-py"
    names = (*_CIFAR_TRAIN, _CIFAR_TEST)
    missing = [n for n in names if not (data_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 batches missing from {str(data_dir)!r}: {', '.join(missing)}. "
            "Extract cifar-10-python.tar.gz there (the folder cifar-10-batches-py or "
            "its files). Nothing is downloaded."
        )
    train = [_read_cifar_batch(data_dir / n) for n in _CIFAR_TRAIN]
    x_test, y_test = _read_cifar_batch(data_dir / _CIFAR_TEST)
    x_train = np.concatenate([x for x, _ in train]).astype(np.float64) / 255.0
    y_train = np.concatenate([y for _, y in train])
    x_train, x_test = _standardise_channels(x_train, x_test.astype(np.float64) / 255.0)
    ds = Dataset(x_train, y_train, x_test, y_test, 10, "cifar10")
    return _subsample(ds, max_train, max_test)


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    data_dir: str | pathlib.Path | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
) -> Dataset:
    """Load a data set by name: `"digits"`, `"mnist1d"`, or `"mnist"` and
    `"cifar10"` (which need `data_dir`). See
    [`lcp_solvers.experiments.load_digits`][] and friends."""
    if name == "digits":
        return load_digits(seed=seed, max_train=max_train, max_test=max_test)
    if name == "mnist1d":
        return load_mnist1d(max_train=max_train, max_test=max_test)
    from_disk = {
        "mnist": (load_mnist, "the IDX files or `mnist.npz`"),
        "cifar10": (load_cifar10, "the python batches (cifar-10-batches-py)"),
    }
    if name in from_disk:
        loader, files = from_disk[name]
        if data_dir is None:
            raise ValueError(
                f"The `{name}` data set is read from disk: pass `data_dir` "
                f"(`--data-dir` on the command line) pointing at {files}."
            )
        return loader(data_dir, max_train=max_train, max_test=max_test)
    raise ValueError(
        f"Unknown data set {name!r}; choose one of 'digits', 'mnist1d', 'mnist', "
        "'cifar10'."
    )
