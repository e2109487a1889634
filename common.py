"""Pieces every script shares: configs, MNIST, safe files, command-line errors.

Each script keeps its own method; this module only holds what would otherwise be
copied between them, so that there is one place to read for each of these.
"""
import io
import json
import math
import os
import pickle
import sys
import tempfile
import tomllib
from pathlib import Path

import numpy as np

PROJECT_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG_PATH = PROJECT_DIR / "configs" / "default.toml"
RESULTS_FORMAT_VERSION = 1

# Keys whose value may be one number or a list of them (build_model normalises them).
SCALAR_OR_LIST_KEYS = {"model.num_fc_units", "model.image_dim_size"}


class UserError(ValueError):
    """A mistake the user can fix; scripts print it as one line and exit non-zero."""


def run_cli(main):
    """Run a script's main(), turning user mistakes into one line and an exit code."""
    try:
        sys.exit(main())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------- configs


def read_toml(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config {path} does not exist; give the path of a .toml file such as configs/small.toml")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"config {path} is not valid TOML ({error}); fix that line") from None


def default_config():
    """The defaults of every script, read from configs/default.toml (the one place they live)."""
    return read_toml(DEFAULT_CONFIG_PATH)


def _checked_value(name, default, value):
    """Return value if it has the default's type (ints are accepted for floats)."""
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float)):
        return float(value)
    elif type(value) is type(default):
        return value
    elif name in SCALAR_OR_LIST_KEYS and isinstance(value, (int, list)):
        return value
    raise UserError(
        f"config key {name} must be a {type(default).__name__} like the default {default!r}, "
        f"not {value!r}; fix it in the config or the --set override")


def merge_config(config, updates, source):
    """Overlay updates onto config in place; unknown sections or keys are errors."""
    for section, values in updates.items():
        if section not in config or not isinstance(values, dict):
            known = ", ".join(f"[{name}]" for name in config)
            raise UserError(f"{source}: unknown section [{section}]; the sections are {known}")
        for key, value in values.items():
            if key not in config[section]:
                known = ", ".join(sorted(config[section]))
                raise UserError(f"{source}: unknown key {section}.{key}; keys of [{section}] are {known}")
            config[section][key] = _checked_value(f"{section}.{key}", config[section][key], value)
    return config


def parse_override(text):
    """'train.learning_rate=3e-4' -> {'train': {'learning_rate': 3e-4}} with TOML value syntax."""
    name, separator, raw_value = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not separator or not dot or not key:
        raise UserError(f"--set {text!r} must look like section.key=value, e.g. train.learning_rate=3e-4")
    try:
        value = tomllib.loads(f"value = {raw_value.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw_value.strip()  # A bare word such as relu or SAME is meant as a string.
    return {section: {key: value}}


def load_config(path=None, overrides=(), base=None):
    """Defaults (or base), then the config file, then each --set override, strictly checked."""
    config = base if base is not None else default_config()
    if path is not None:
        merge_config(config, read_toml(path), source=str(path))
    for override in overrides:
        merge_config(config, parse_override(override), source=f"--set {override}")
    return config


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value)  # JSON numbers and strings are valid TOML.
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {_toml_value(item)}" for key, item in value.items()) + "}"
    if callable(value):
        return json.dumps(getattr(value, "__name__", repr(value)))
    if value is None:
        return "{}"  # TOML has no null; an empty table is our "none" (no pooling layer).
    raise TypeError(f"cannot write {value!r} to TOML")


def dump_toml(config):
    """Write a resolved config as TOML, so that a run's config.toml can be passed back in."""
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ files


def atomic_write(path, write):
    """Call write(temporary_path), then rename it over path, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the suffix: Keras and matplotlib pick the format from it.
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path, data):
    def write(temporary):
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())

    atomic_write(path, write)


def write_json(path, value):
    atomic_write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())


def ensure_writable_dir(path):
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UserError(f"cannot write to output folder {path} ({error.strerror}); choose another with --out") from None
    return path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend; imported only where a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as module

    return module


def save_figure(figure, path):
    """Save a figure as PNG atomically and free it."""
    try:
        atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=110, bbox_inches="tight"))
    finally:
        pyplot().close(figure)


# Everything a results pickle may construct: NumPy arrays, their dtypes and scalars.
# NumPy 2 moved these from numpy.core to numpy._core; files from either version load.
_SAFE_GLOBALS = {
    (module, name)
    for prefix in ("numpy.core", "numpy._core")
    for module, name in [
        (f"{prefix}.multiarray", "_reconstruct"),
        (f"{prefix}.multiarray", "scalar"),
        (f"{prefix}.numeric", "_frombuffer"),
    ]
} | {("numpy", "ndarray"), ("numpy", "dtype")}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks to construct {module}.{name}, which a results file never holds")


def _check_plain(value, where="results"):
    """Refuse anything the restricted loader could not read back."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is not a string or int")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
    elif isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError(f"{where}: object arrays cannot be saved safely")
    elif not isinstance(value, (str, bytes, int, float, bool, type(None), np.generic)):
        raise TypeError(f"{where}: {type(value).__name__} cannot be saved in a results file")


def save_results(path, results):
    """Pickle a dict of plain values and NumPy arrays atomically."""
    _check_plain(results)
    atomic_write_bytes(path, pickle.dumps(results, protocol=4))


def load_results(path):
    """Unpickle a results file, constructing nothing but NumPy arrays and plain values."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"results file {path} does not exist; run cnn_backwork.py first or fix the path")
    try:
        return _RestrictedUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise UserError(
            f"refusing to load {path}: {error or 'the file is truncated or not a pickle'}; "
            "use a file written by these scripts, or re-create it") from None


# ------------------------------------------------------------------------------- data

MNIST_HINT = ("give a local copy in the Keras layout with --data PATH or MNIST_PATH=PATH "
              "(on this project's machines: ../shared/data/mnist.npz; never commit it)")


def _read_npz(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"MNIST file {path} does not exist; {MNIST_HINT}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not a readable .npz file ({error}); {MNIST_HINT}") from None


def _validate_split(arrays, split, source):
    images, labels = arrays.get(f"x_{split}"), arrays.get(f"y_{split}")
    if images is None or labels is None:
        raise UserError(f"{source} lacks x_{split} or y_{split}; it must hold x_train, y_train, x_test, y_test")
    if images.ndim not in (3, 4) or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"{source}: x_{split} {images.shape} and y_{split} {labels.shape} do not fit "
                        "(want images (N, H, W[, C]) and labels (N,))")
    if images.dtype != np.uint8 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{source}: x_{split} must be uint8 pixels and y_{split} integer labels, "
                        f"not {images.dtype} and {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise UserError(f"{source}: y_{split} holds labels outside 0-9")
    images = images.astype(np.float32) / 255.0
    return with_channel(images), labels.astype(np.int64)


def load_mnist(path=None):
    """MNIST as float32 images in [0, 1] of shape (N, H, W, C) and int64 labels.

    From path, else $MNIST_PATH, else keras.datasets.mnist (download and cache).
    """
    path = path or os.environ.get("MNIST_PATH")
    if path:
        arrays, source = _read_npz(path), str(path)
    else:
        import keras

        try:
            (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
        except Exception as error:  # Any download or cache failure has the same fix.
            raise UserError(f"could not download MNIST ({type(error).__name__}); {MNIST_HINT}") from None
        arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
        source = "keras.datasets.mnist"
    data = {}
    for split in ("train", "test"):
        data[f"x_{split}"], data[f"y_{split}"] = _validate_split(arrays, split, source)
    if data["x_train"].shape[1:] != data["x_test"].shape[1:]:
        raise UserError(f"{source}: training and test images differ in shape")
    return data


def split_validation(data, validation_size):
    """Hold out the last validation_size training examples (the same ones for every seed)."""
    if not 0 <= validation_size < len(data["x_train"]):
        raise UserError(f"validation_size {validation_size} must be between 0 and the "
                        f"{len(data['x_train'])} training examples; change data.validation_size")
    keep = len(data["x_train"]) - validation_size
    return {**data,
            "x_train": data["x_train"][:keep], "y_train": data["y_train"][:keep],
            "x_val": data["x_train"][keep:], "y_val": data["y_train"][keep:]}


# ----------------------------------------------------------------------------- models


def load_trained_model(path, images=None, num_classes=None, compile=False):
    """Load a model saved by proc_mnist.py and check that it fits the data it will see.

    compile=True also restores the optimizer and its step count (to continue training).
    """
    import keras

    path = Path(path)
    if not path.is_file() or path.suffix != ".keras":
        raise UserError(f"model {path} does not exist; train one with proc_mnist.py or fix --model")
    try:
        model = keras.models.load_model(path, compile=compile)
    except Exception as error:  # Keras raises many types for a damaged archive.
        raise UserError(f"cannot load model {path} ({type(error).__name__}: {error}); "
                        "retrain it with proc_mnist.py") from None
    input_shape = tuple(model.input_shape[1:])
    if images is not None and tuple(images.shape[1:]) != input_shape:
        raise UserError(f"model {path} takes images of shape {input_shape} but the data has "
                        f"{tuple(images.shape[1:])}; use the data it was trained on")
    if num_classes is not None and model.output_shape[-1] != num_classes:
        raise UserError(f"model {path} has {model.output_shape[-1]} classes but the data needs "
                        f"{num_classes}; use a model trained on this data")
    return model


def predict(model, images, batch_size=1000):
    """The model's outputs (class probabilities) in inference mode, a batch at a time, as NumPy."""
    outputs = [np.asarray(model(images[start:start + batch_size], training=False))
               for start in range(0, len(images), batch_size)]
    return np.concatenate(outputs) if outputs else np.zeros((0,))


def with_channel(images):
    """Grey images (N, H, W), as results files hold them, as (N, H, W, 1) for a model."""
    return images[..., None] if images.ndim == 3 else images


def format_seconds(seconds):
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
