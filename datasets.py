"""Datasets: the registry of Keras datasets, reading a local file or a download, provenance, class names.

load_dataset is the one reader of image data (a local Keras-layout .npz, or a
keras.datasets download); its "provenance" record says what was read, and
provenance_dataset, describe_data and same_data are how the scripts compare the data of
a run with a model's. split_validation holds out the validation examples.
"""
import functools
import hashlib
import math
import os
import zipfile
from pathlib import Path

import numpy as np

import common
from common import UserError, with_channel

# The datasets load_dataset downloads (and caches) by name through keras.datasets.
DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")

# Each dataset's class names, shown on figures and tables instead of bare indices. MNIST's
# classes are its digits; a dataset without names here (CIFAR-100, an unknown file) shows indices.
CLASS_NAMES = {
    "mnist": tuple(str(digit) for digit in range(10)),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}

# Local files recognised by their sha256 as a dataset: Keras' own mnist.npz, and the Keras-layout
# copies on this project's machines (../shared/data/mnist.npz and fashion_mnist.npz). A file named
# after a dataset (fashion_mnist.npz) is recognised by its name too.
KNOWN_FILES = {
    "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1": "mnist",
    "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64": "mnist",
    "5b6d2c4c694a91887af8ab7d039c04f80af3c29378d731c93a538d2e831aa469": "fashion_mnist",
}


# The file each download leaves in Keras' cache (~/.keras/datasets), hashed for provenance;
# fashion_mnist is four files, so it is recorded by its name alone.
CACHED_FILES = {"mnist": "mnist.npz", "cifar10": "cifar-10-batches-py-target_archive",
                "cifar100": "cifar-100-python-target_archive"}

DATA_HINT = ("give a local copy in the Keras layout with --data PATH or DATA_PATH=PATH (MNIST_PATH=PATH for "
             "MNIST; on this project's machines: ../shared/data/mnist.npz; never commit it)")


OOD_HINT = ("give --ood a Keras-layout .npz of images that are none of the model's classes (for an MNIST model, "
            "on this project's machines: ../shared/data/fashion_mnist.npz)")


# The arrays of one data file, decompressed, at most: MNIST is 55 MB and CIFAR-10 180 MB, and the
# float32 copy the scripts train on is four times as large again. A zip's directory says how large
# each member is before anything is read, so a zip bomb or a header claiming a terabyte is refused
# unread; reading then stops at the size claimed (zipfile checks it and the CRC).
MAX_DATA_BYTES = 1 << 30
# Deflate never packs more than 1032 bytes into one, so a member claiming more per compressed byte
# has a directory that lies about it.
MAX_DEFLATE_RATIO = 1032


def _npz_members(archive, path, hint):
    """The .npy members of an archive, each one's claimed size checked against the zip directory and
    MAX_DATA_BYTES before any is read; other members are never read."""
    members = [info for info in archive.infolist() if info.filename.endswith(".npy")]
    total = sum(info.file_size for info in members)
    if total > MAX_DATA_BYTES:
        raise UserError(f"{common.shown_path(path)}: its arrays would take {total} bytes decompressed, more than a "
                        f"data file may ({MAX_DATA_BYTES}); give a smaller file. {hint}")
    for info in members:
        ratio = {zipfile.ZIP_STORED: 1, zipfile.ZIP_DEFLATED: MAX_DEFLATE_RATIO}.get(info.compress_type)
        if ratio is not None and info.file_size > info.compress_size * ratio + 1024:
            raise UserError(f"{common.shown_path(path)}: {info.filename} claims {info.file_size} bytes from "
                            f"{info.compress_size} compressed ones, which no zip holds; the file is damaged. {hint}")
    return members


def _check_npz_members(archive, path, hint):
    """The names of the arrays of an archive (x_train for x_train.npy); refuses a member whose array
    header claims more data than the member holds, or objects."""
    members = _npz_members(archive, path, hint)
    for info in members:
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(member)
        if dtype.hasobject:
            raise UserError(f"{common.shown_path(path)}: {info.filename} is an array of Python objects (dtype "
                            f"{dtype}), which a data file never holds: save images as uint8 and labels as "
                            f"integers. {hint}")
        if math.prod(shape) * dtype.itemsize > info.file_size:
            raise UserError(f"{common.shown_path(path)}: {info.filename} claims shape {shape} of {dtype}, more than "
                            f"the {info.file_size} bytes it holds; the file is damaged. {hint}")
    return [info.filename[:-len(".npy")] for info in members]


def _read_npz(path, hint=DATA_HINT):
    """The arrays of a local .npz; a bad file is one line ending in hint (what to give instead)."""
    path = common.checked_input(path, "data file", hint)
    if not zipfile.is_zipfile(path):
        raise UserError(f"{common.shown_path(path)} is not an .npz archive (a zip of .npy arrays); {hint}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = _check_npz_members(archive, path, hint)
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in names}
    except UserError:
        raise  # Already one line that ends in hint.
    except (OSError, ValueError, EOFError, MemoryError, zipfile.BadZipFile) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{common.shown_path(path)} is not a readable .npz file "
                        f"({common.shortened(message, 200)}); {hint}") from None


def _validate_split(arrays, split, source):
    images, labels = arrays.get(f"x_{split}"), arrays.get(f"y_{split}")
    if images is None or labels is None:
        raise UserError(f"{source} lacks x_{split} or y_{split}; it must hold x_train, y_train, x_test, y_test")
    if labels.ndim == 2 and labels.shape[1] == 1:  # CIFAR's labels are (N, 1).
        labels = labels[:, 0]
    if images.ndim not in (3, 4) or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"{source}: x_{split} {images.shape} and y_{split} {labels.shape} do not fit "
                        "(want images (N, H, W[, C]) and labels (N,) or (N, 1))")
    if images.dtype != np.uint8 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{source}: x_{split} must be uint8 pixels and y_{split} integer labels, "
                        f"not {images.dtype} and {labels.dtype}")
    if len(labels) and labels.min() < 0:
        raise UserError(f"{source}: y_{split} holds negative labels; classes are numbered from 0")
    images = images.astype(np.float32)
    images /= 255.0  # In place: a second 190 MB array would cost a fresh page fault per 4 KB.
    return with_channel(images), labels.astype(np.int64)


def file_sha256(path):
    """The sha256 of a file, read in chunks (a CIFAR archive is 170 MB); once per file and version."""
    status = os.stat(path)
    return _file_sha256(str(Path(path).resolve()), status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_sha256(path, size, mtime_ns):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cached_file(dataset):
    """The file a keras.datasets download left in Keras' cache, or None where there is no one file."""
    name = CACHED_FILES.get(dataset)
    if name is None:
        return None
    # Keras caches in $KERAS_HOME (default ~/.keras), or in /tmp/.keras where that is not writable.
    homes = [Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")), Path("/tmp/.keras")]
    return next((home / "datasets" / name for home in homes if (home / "datasets" / name).is_file()), None)


def _download(dataset):
    """keras.datasets' arrays and the provenance of the download (the cached file's sha256 where known)."""
    import keras

    if dataset not in DATASETS:
        raise UserError(f"data.dataset {dataset!r} is unknown; use one of {', '.join(DATASETS)} "
                        "or give a local .npz with --data PATH")
    try:
        (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, dataset).load_data()
    except Exception as error:  # Any download or cache failure has the same fix.
        raise UserError(f"could not download {dataset} ({type(error).__name__}); {DATA_HINT}") from None
    cached = _cached_file(dataset)
    provenance = {"dataset": dataset, "file": str(cached) if cached else None,
                  "sha256": file_sha256(cached) if cached else None, "download": True}
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}, provenance


def data_path(path=None, dataset="mnist", file=""):
    """The local file to read: path (--data), else file (data.file), else $DATA_PATH, else $MNIST_PATH
    when the dataset is MNIST."""
    return (path or file or os.environ.get("DATA_PATH")
            or (os.environ.get("MNIST_PATH") if dataset == "mnist" else None))


def recognised_dataset(path, sha256=None, declared=None):
    """The dataset a local file is (its sha256 in KNOWN_FILES, declared, or a file named after a
    dataset: fashion_mnist.npz), or None where it is not recognised."""
    stem = Path(path).stem if isinstance(path, (str, Path)) and path else None
    known = KNOWN_FILES.get(sha256) if isinstance(sha256, str) else None
    return known or declared or (stem if stem in DATASETS else None)


def data_label(path=None, dataset="mnist", file=""):
    """A short name of the data a run would read, for its default folder: the dataset's name, or the
    local file's (its recognised dataset, else its name without .npz)."""
    path = data_path(path, dataset, file)
    if not path:
        return dataset
    declared = "mnist" if path == os.environ.get("MNIST_PATH") and dataset == "mnist" else None
    sha256 = file_sha256(path) if os.path.isfile(path) else None  # Never raises: load_dataset says what is wrong.
    return recognised_dataset(path, sha256, declared) or Path(path).stem


def load_dataset(path=None, dataset="mnist", file="", hint=DATA_HINT):
    """An image dataset as float32 images in [0, 1] of shape (N, H, W, C) and int64 labels.

    From path (an .npz in the Keras layout), else file (data.file), else $DATA_PATH, else
    $MNIST_PATH for MNIST, else keras.datasets.<dataset> (download and cache).
    data["provenance"] says which: {"dataset": the dataset's name (a local file's where it is
    recognised, else None), "file": path or None, "sha256": the file's or None, "download": bool}.
    hint ends the one-line error for a missing or damaged local file (what to give instead).
    """
    path = data_path(path, dataset, file)
    if path:
        arrays, source, sha256 = _read_npz(path, hint), str(path), file_sha256(path)
        # $MNIST_PATH names MNIST (it is read only for it); --data, data.file and $DATA_PATH name a file.
        declared = "mnist" if str(path) == os.environ.get("MNIST_PATH") and dataset == "mnist" else None
        provenance = {"dataset": recognised_dataset(path, sha256, declared), "file": str(path), "sha256": sha256,
                      "download": False}
    else:
        arrays, provenance = _download(dataset)
        source = f"keras.datasets.{dataset}"
    data = {}
    try:
        for split in ("train", "test"):
            data[f"x_{split}"], data[f"y_{split}"] = _validate_split(arrays, split, source)
    except MemoryError:  # The float32 copy is four times the file's pixels.
        raise UserError(f"{common.shown_path(source)}: its images as float32 do not fit in this machine's memory; "
                        f"give a smaller file. {hint}") from None
    if data["x_train"].shape[1:] != data["x_test"].shape[1:]:
        raise UserError(f"{source}: training and test images differ in shape")
    data["provenance"] = provenance
    return data


def count_classes(data):
    """The number of classes the data's integer labels name: the largest label plus one."""
    labels = [data[key] for key in ("y_train", "y_val", "y_test") if key in data and np.ndim(data[key]) == 1]
    return int(max((int(array.max()) for array in labels if len(array)), default=-1)) + 1


def provenance_dataset(provenance):
    """The dataset a provenance record names, recognising a local file recorded before files were
    recognised; None for an unknown file or no record."""
    if not isinstance(provenance, dict):
        return None
    dataset = provenance.get("dataset")
    return dataset if dataset in DATASETS else recognised_dataset(provenance.get("file"), provenance.get("sha256"))


def downloaded(provenance):
    """Whether a provenance record is of a keras.datasets download (not a local file)."""
    # Records written before "download" existed named a dataset only for a download.
    return provenance.get("download", provenance.get("dataset") is not None)


def describe_data(provenance):
    """A provenance record in a few words: keras.datasets.mnist, or the file with its dataset and sha256."""
    if not provenance:
        return "unrecorded data"
    if downloaded(provenance):
        return f"keras.datasets.{provenance.get('dataset')}"
    name = provenance_dataset(provenance)
    digest = str(provenance.get("sha256") or "?")[:12]
    return f"{provenance.get('file')} ({f'{name}, ' if name else ''}sha256 {digest}...)"


def same_data(recorded, given):
    """Whether two provenance records name the same data: the same file contents, or the same dataset."""
    if recorded.get("sha256") and recorded.get("sha256") == given.get("sha256"):
        return True
    names = provenance_dataset(recorded), provenance_dataset(given)
    return None not in names and names[0] == names[1]


def provenance_comment(provenance):
    """One TOML comment line saying what a run was made from (a config.toml still loads back unchanged)."""
    if not provenance:
        return ""
    what = f"keras.datasets.{provenance['dataset']}" if downloaded(provenance) else provenance["file"]
    digest = f", sha256 {provenance['sha256']}" if provenance["sha256"] else ""
    return f"# data: {what}{digest}\n"


def class_names(dataset, num_classes):
    """The names of num_classes classes of dataset (CLASS_NAMES), as strings; the indices where it has
    none or another count. One class more than the dataset has (an extra "none" output) is "none"."""
    names = CLASS_NAMES.get(dataset)
    if names is not None and num_classes == len(names):
        return list(names)
    if names is not None and num_classes == len(names) + 1:
        return [*names, "none"]
    return [str(index) for index in range(num_classes)]


def read_ood_images(path, shape):
    """The test images and labels of a Keras-layout .npz of other data (Fashion-MNIST for an MNIST
    model), which must have the image shape a model takes, and the file's provenance."""
    data = load_dataset(path, hint=OOD_HINT)  # A bad file's message says what --ood wants, not --data.
    images = data["x_test"]
    if not len(images):
        raise UserError(f"--ood {path} holds no test images (x_test is empty); {OOD_HINT}")
    if images.shape[1:] != tuple(shape):
        raise UserError(f"--ood {path} holds images of shape {images.shape[1:]}, the model's {tuple(shape)}; "
                        "give a data set of the same image size")
    return images, data["y_test"], data["provenance"]


def one_hot(labels, num_classes):
    """Integer labels (N,) as one-hot rows (N, num_classes) of float32."""
    return np.eye(num_classes, dtype=np.float32)[np.asarray(labels)]


def split_validation(data, validation_size):
    """Hold out the last validation_size training examples (the same ones for every seed)."""
    if not 0 <= validation_size < len(data["x_train"]):
        raise UserError(f"validation_size {validation_size} must be between 0 and the "
                        f"{len(data['x_train'])} training examples; change data.validation_size")
    keep = len(data["x_train"]) - validation_size
    return {**data,
            "x_train": data["x_train"][:keep], "y_train": data["y_train"][:keep],
            "x_val": data["x_train"][keep:], "y_val": data["y_train"][keep:]}
