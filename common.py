"""What every script shares at run time: one-line errors, interrupts, safe files, logs, figures,
the results format, datasets.

Each script keeps its own method; this module only holds what would otherwise be copied
between them. It imports no other module of the project, so every module may import it.

Why TensorFlow is imported late: importing it takes seconds and prints C++ start-up lines.
Every module of the project imports TensorFlow and Keras inside the functions that need
them, never at the top, so that --help, a config mistake or a bad path answers in a
fraction of a second with one line (tests/test_layout.py checks it). The first import,
wherever it happens, goes through _QuietTensorFlowImport below.
"""
import atexit
import contextlib
import functools
import gc
import hashlib
import importlib.abc
import importlib.util
import io
import itertools
import json
import math
import os
import pickle
import pickletools
import signal
import sys
import tempfile
import threading
import time
import weakref
import zipfile
from pathlib import Path

import numpy as np

PROJECT_DIR = Path(__file__).resolve().parent

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


class UserError(ValueError):
    """A mistake the user can fix; scripts print it as one line and exit non-zero."""


# Folders that ensure_writable_dir created in this run: a run that fails removes the
# ones it left empty, so a mistake leaves nothing behind.
_CREATED_DIRS = []


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


class InterruptsDeferred:
    """Within the block, a first Ctrl-C or SIGTERM is only noted (and message printed); a second aborts.

    Outside the main thread (where Python cannot set signal handlers) it changes nothing.
    """

    def __init__(self, message="interrupted: finishing the save (interrupt again to abort it; "
                               "no file is left half-written)"):
        self.message, self.interrupted, self.previous = message, False, {}

    def __enter__(self):
        self.interrupted = False
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self._note) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _note(self, signum, frame):
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        print(self.message)

    def __exit__(self, *exception):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}
        return False


def run_cli(main):
    """Run a script's main(), turning user mistakes into one line and an exit code.

    SIGTERM (a scheduler's kill) is handled like Ctrl-C: whatever main saves on an
    interrupt is saved, temporary files are removed, and the exit code is 130.
    """
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    _CREATED_DIRS.clear()
    code = 1
    try:
        code = main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    finally:
        if code:
            _remove_empty_created_dirs()
    # Python's last garbage collections walk every object TensorFlow and Keras made: 0.9 s
    # at every exit. Frozen objects are skipped; whatever was not closed by now is still
    # closed as its module goes (reference counting), and atexit handlers still run.
    atexit.register(gc.freeze)
    sys.exit(code)


def _remove_empty_created_dirs():
    for path in reversed(_CREATED_DIRS):
        try:
            path.rmdir()  # Only an empty folder goes; anything written stays.
        except OSError:
            pass


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Silence the C++ start-up lines TensorFlow writes to stderr while it is imported.

    TensorFlow 2.21 prints them through absl before TF_CPP_MIN_LOG_LEVEL is read, so the
    only way to keep a one-line error one line is to point file descriptor 2 elsewhere
    for the import itself. Python errors raised by the import still reach stderr.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # Only the first import; find the real spec below.
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _SilencedLoader(spec.loader)
        return spec


class _SilencedLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self.loader
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # No real stderr (an embedding host): import as is.
            return self.loader.exec_module(module)
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                self.loader.exec_module(module)
            finally:
                os.dup2(saved, 2)
                os.close(saved)


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Later C++ info lines, for versions that read it.
if "tensorflow" not in sys.modules:
    sys.meta_path.insert(0, _QuietTensorFlowImport())


# ------------------------------------------------------------------------------ files


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """Call write(temporary_path), then rename it over path, so readers never see half a file.

    The file gets the permissions the user's umask gives a new file (mkstemp's 0600 would
    hide results from the user's group), and an interrupted write leaves no temporary file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Keep the suffix: Keras and matplotlib pick the format from it.
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
        os.close(handle)
    except OSError as error:
        raise _write_error(path, error) from None
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):  # A full disk or a folder made read-only: the old file is intact.
            raise _write_error(path, error) from None
        raise


def _write_error(path, error):
    reason = error.strerror or str(error).splitlines()[0]
    return UserError(f"cannot write {path} ({reason}); free some space or fix the folder's permissions "
                     "and run again (any earlier version of the file is unchanged)")


def atomic_write_bytes(path, data):
    def write(temporary):
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())

    atomic_write(path, write)


def _json_safe(value):
    """NaN and infinity become None: strict JSON readers refuse a bare NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def write_json(path, value):
    atomic_write_bytes(path, (json.dumps(_json_safe(value), indent=2, allow_nan=False) + "\n").encode())


def ensure_writable_dir(path):
    """Create the output folder if needed and check that a file can be written there.

    A folder created here is removed again if the command then fails and leaves it empty.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"output folder {path} is a file; choose another with --out")
    missing = [folder for folder in [path, *path.parents] if not folder.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        _CREATED_DIRS.extend(reversed(missing))
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UserError(f"cannot write to output folder {path} ({error.strerror}); choose another with --out") from None
    return path


# ------------------------------------------------------------------------ TensorBoard


# Writers that received a summary: a writer that received none leaves no file behind.
_USED_WRITERS = weakref.WeakSet()


@contextlib.contextmanager
def summary_writer(log_dir):
    """A TensorBoard event-file writer for log_dir, flushed and closed however the block ends (Ctrl-C too).

    A block that wrote nothing (a run that failed before its first progress line) removes
    the empty event file, and log_dir if it made it, so a failed start leaves no folder.
    """
    import tensorflow as tf

    log_dir = Path(log_dir)
    created = [folder for folder in [log_dir, *log_dir.parents] if not folder.exists()]
    before = set(log_dir.glob("events.out.tfevents.*"))
    writer = tf.summary.create_file_writer(str(log_dir))
    try:
        yield writer
    finally:
        writer.close()
        if writer not in _USED_WRITERS:
            for path in set(log_dir.glob("events.out.tfevents.*")) - before:
                path.unlink(missing_ok=True)
            for folder in created:  # The innermost first: only empty folders go.
                with contextlib.suppress(OSError):
                    folder.rmdir()


def session_log_dir(log_root):
    """A fresh subfolder of log_root for this session's event files (log_root/<date-time>, -2 on a clash):
    TensorBoard shows each run or resumed session of a folder as its own run, never merged."""
    log_root, stamp = Path(log_root), time.strftime("%Y%m%d-%H%M%S")
    candidates = (log_root / (stamp if count == 1 else f"{stamp}-{count}") for count in itertools.count(1))
    return next(path for path in candidates if not path.exists())


def _summary_metadata(plugin_name):
    from tensorflow.core.framework import summary_pb2

    return summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin_name))


# tf.summary.scalar and tf.summary.image live in the tensorboard package, which only reading
# the logs needs; tf.summary.write with TensorBoard's plugin metadata writes the same records.


def write_scalars(writer, step, values):
    """Each {tag: number} at step, for TensorBoard's scalars tab (None is left out); no writer, no-op."""
    import tensorflow as tf

    if writer is None:
        return
    _USED_WRITERS.add(writer)
    with writer.as_default(step=int(step)):
        for tag, value in values.items():
            if value is not None:
                tf.summary.write(tag, tf.constant(float(value), tf.float32), metadata=_summary_metadata("scalars"))
    writer.flush()


def write_images(writer, step, tag, images):
    """Images (N, H, W[, C]) in [0, 1], grey or colour, for TensorBoard's images tab; no writer, no-op."""
    import tensorflow as tf

    if writer is None:
        return
    _USED_WRITERS.add(writer)
    images = tf.image.convert_image_dtype(with_channel(np.asarray(images, np.float32)), tf.uint8, saturate=True)
    encoded = [tf.image.encode_png(image) for image in images]
    height, width = images.shape[1:3]
    with writer.as_default(step=int(step)):  # TensorBoard's layout: width, height, then one PNG per image.
        tf.summary.write(tag, tf.stack([str(width), str(height), *encoded]), metadata=_summary_metadata("images"))
    writer.flush()


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


# ---------------------------------------------------------------------- results files
#
# A results file is a pickle that holds nothing but dicts, lists, tuples, str, int, float,
# bool, None and bytes. Each NumPy array is stored as a small record
#     {"__ndarray__": dtype name, "shape": [...], "data": raw little-endian bytes}
# and rebuilt with np.frombuffer after its shape has been bounded (each size, and what the
# sizes span with a zero counted as one) and its byte count checked against that shape.
# So reading one constructs no class at all: the opcodes are checked before anything is
# built, and the unpickler's find_class refuses every name. A file can then neither run
# code nor make the reader build an array over memory that is not its own, and every
# allocation is bounded by the file's size.
# docs/results-format.md lists what a reader can rely on.

RESULTS_FORMAT_VERSION = 2
MAX_RESULTS_BYTES = 1 << 30  # 1 GiB: far above any backwork or saliency file.
MAX_RESULTS_VALUES = 5_000_000  # containers and values in one file
MAX_RESULTS_DEPTH = 16
MAX_ARRAY_DIMENSIONS = 8
MAX_ARRAY_SIZE = MAX_RESULTS_BYTES  # any one size of an array: no file holds more elements
ARRAY_MARKER = "__ndarray__"
ARRAY_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in (
    "bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
    "float16", "float32", "float64")}

# The pickle opcodes of plain values (protocol 2 to 5); anything else is refused unread.
_PLAIN_OPCODES = {
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4",
    "FLOAT", "BINFLOAT", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
    "SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "SHORT_BINSTRING", "BINSTRING", "STRING",
    "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_LIST", "LIST", "APPEND", "APPENDS",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET",
}


class ResultsFormatError(ValueError):
    """A results file (or a value to be saved) that does not follow the format above."""


def _encode(value, where):
    """value with every NumPy array or scalar replaced by its record; other types refused."""
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, (str, int)) or key == ARRAY_MARKER:
                raise ResultsFormatError(f"{where}: key {key!r} cannot be saved (str or int keys only)")
        return {key: _encode(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        if array.dtype.name not in ARRAY_DTYPES:
            raise ResultsFormatError(f"{where}: arrays of dtype {array.dtype} cannot be saved; "
                                     f"use one of {', '.join(ARRAY_DTYPES)}")
        data = np.ascontiguousarray(array, dtype=ARRAY_DTYPES[array.dtype.name]).tobytes()
        return {ARRAY_MARKER: array.dtype.name, "shape": list(array.shape), "data": data}
    if isinstance(value, (str, bytes, bool, int, float, type(None))):
        return value
    raise ResultsFormatError(f"{where}: {type(value).__name__} cannot be saved in a results file")


def _shown(value, limit=60):
    """value as an error message shows it, in at most about limit characters whatever a file holds.

    A crafted file's int may have a million digits (repr refuses those) and its string a
    billion characters; containers are described, not printed.
    """
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an int of {value.bit_length()} bits"
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} long)"
    if isinstance(value, (dict, list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape}"
    return repr(value)


def _array_from_record(record, where):
    dtype_name, shape, data = record.get(ARRAY_MARKER), record.get("shape"), record.get("data")
    if set(record) != {ARRAY_MARKER, "shape", "data"} or not isinstance(dtype_name, str) \
            or dtype_name not in ARRAY_DTYPES:
        raise ResultsFormatError(f"{where} is an array record with dtype {_shown(dtype_name)} or keys "
                                 f"{sorted(_shown(key) for key in record)[:5]} that this format does not have")
    # Every size bounded before any arithmetic: no bools, floats or million-digit ints.
    if (not isinstance(shape, list) or len(shape) > MAX_ARRAY_DIMENSIONS
            or not all(type(size) is int and 0 <= size <= MAX_ARRAY_SIZE for size in shape)
            or not isinstance(data, bytes)):
        raise ResultsFormatError(f"{where} has a malformed shape or data (at most {MAX_ARRAY_DIMENSIONS} sizes, "
                                 f"each an int from 0 to {MAX_ARRAY_SIZE}, and bytes)")
    dtype = ARRAY_DTYPES[dtype_name]
    # A zero size makes any shape's byte count 0, but numpy still refuses to make a shape whose
    # other sizes overflow: so the sizes, each zero counted as one, must fit in a file too.
    if math.prod(max(size, 1) for size in shape) * dtype.itemsize > MAX_RESULTS_BYTES:
        raise ResultsFormatError(f"{where} claims shape {tuple(shape)} of {dtype_name}, more than "
                                 f"a results file holds ({MAX_RESULTS_BYTES} bytes)")
    if math.prod(shape) * dtype.itemsize != len(data):
        raise ResultsFormatError(f"{where} claims shape {tuple(shape)} of {dtype_name} "
                                 f"({math.prod(shape) * dtype.itemsize} bytes) but holds {len(data)} bytes")
    return np.frombuffer(data, dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def _decode(value, where, budget, seen, depth=0):
    """The loaded plain value with array records rebuilt; shared or cyclic containers refused."""
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_RESULTS_DEPTH:
        raise ResultsFormatError(f"{where} nests deeper or holds more values than any results file")
    if isinstance(value, (dict, list, tuple)):
        if id(value) in seen:  # Our writer never shares a container; a crafted file could, 10^9 times.
            raise ResultsFormatError(f"{where} refers back to a container seen before")
        seen.add(id(value))
    if isinstance(value, dict):
        if ARRAY_MARKER in value:
            return _array_from_record(value, where)
        return {key: _decode(item, f"{where}[{_shown(key)}]", budget, seen, depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_decode(item, f"{where}[{index}]", budget, seen, depth + 1) for index, item in enumerate(value)]
    return value


def _check_opcodes(data):
    """Walk the pickle's opcodes without building anything; refuse any but plain values'."""
    count = 0
    try:
        for opcode, argument, _ in pickletools.genops(data):
            count += 1
            if count > 2 * MAX_RESULTS_VALUES:
                raise ResultsFormatError("it holds more values than any results file")
            if opcode.name in ("GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "INST", "OBJ", "NEWOBJ"):
                raise ResultsFormatError(
                    "it asks to construct objects (opcode " + opcode.name + "), which a results file never "
                    f"holds; if it was written by an older version of these scripts (format 1), "
                    "run cnn_backwork.py again")
            if opcode.name not in _PLAIN_OPCODES:
                raise ResultsFormatError(f"it holds pickle opcode {opcode.name}, which a results file never holds")
    except ValueError as error:  # pickletools' word for truncated or malformed data
        if isinstance(error, ResultsFormatError):
            raise
        raise ResultsFormatError(f"it is truncated or not a pickle ({error})") from None


class _NoClassUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it asks to construct {module}.{name}")

    def persistent_load(self, persistent_id):
        raise pickle.UnpicklingError("it refers to a persistent object")


def save_results(path, results, kind="backwork"):
    """Write a results dict (plain values and NumPy arrays) atomically, in the format above.

    The dict is checked as load_results will check it, so a NaN image or a malformed
    field is an error here rather than a file that cannot be read back.
    """
    results = {**results, "format_version": RESULTS_FORMAT_VERSION, "kind": kind}
    try:
        check_results(_decode(_encode(results, "results"), "results", [MAX_RESULTS_VALUES], set()))
    except ResultsFormatError as error:
        raise ValueError(f"refusing to save {path}: {error}") from None
    atomic_write_bytes(path, pickle.dumps(_encode(results, "results"), protocol=4))


def load_results(path):
    """Read and check a results file; returns the dict with its arrays rebuilt.

    Guarantees: nothing but plain values and arrays of allowed numeric dtypes is built,
    every array owns memory of exactly its shape, and the fields the scripts read are
    present, of the right type and shape, and finite (see check_results).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"results file {path} does not exist; run cnn_backwork.py first or fix the path")
    if not path.is_file():
        raise UserError(f"results file {path} is not a file; give the path of a results_<label>.pkl")
    size = path.stat().st_size
    if size > MAX_RESULTS_BYTES:
        raise UserError(f"refusing to load {path}: {size} bytes is more than a results file holds "
                        f"({MAX_RESULTS_BYTES}); use a file written by these scripts")
    try:
        data = path.read_bytes()
        _check_opcodes(data)
        try:
            loaded = _NoClassUnpickler(io.BytesIO(data)).load()
        except (TypeError, ValueError, AttributeError, IndexError, KeyError) as error:
            # Plain opcodes in an order no pickler writes: a list as a dict key, a byte string
            # that is not ASCII, an item set on a list. Nothing was built but plain values.
            raise ResultsFormatError(f"it is not a pickle of plain values ({type(error).__name__}: "
                                     f"{_shown(str(error), 100)})") from None
        results = _decode(loaded, "results", [MAX_RESULTS_VALUES], set())
        return check_results(results)
    except OSError as error:
        raise UserError(f"cannot read {path} ({error.strerror}); check the file and its permissions") from None
    except (pickle.UnpicklingError, ResultsFormatError, EOFError, MemoryError, RecursionError) as error:
        message = str(error).splitlines()[0] if str(error) else "the file is truncated or not a pickle"
        raise UserError(f"refusing to load {path}: {message}; use a file written by these scripts, "
                        "or re-create it") from None


def _field_error(field, problem):
    return ResultsFormatError(f"field {field!r} {problem}")


def _checked_array(results, field, dtype_kind, ndim=None, rows=None, finite=False, unit_range=False, where=""):
    """results[field] as an array of the given kind ('f' float, 'i' int), shape and range.

    where names the record that holds the field in messages (e.g. "history[4]").
    """
    array, field = results.get(field), f"{where}.{field}" if where else field
    if not isinstance(array, np.ndarray) or array.dtype.kind not in dtype_kind:
        expected = {"f": "a float array", "i": "an int array", "fi": "a number array"}[dtype_kind]
        raise _field_error(field, f"is not {expected}")
    if ndim is not None and array.ndim not in ndim:
        raise _field_error(field, f"has shape {array.shape}, not {' or '.join(f'{n}-d' for n in ndim)}")
    if rows is not None and (array.ndim == 0 or len(array) != rows):
        raise _field_error(field, f"has {len(array) if array.ndim else 'no'} rows but images has {rows}")
    if finite and not np.isfinite(array).all():
        raise _field_error(field, "holds NaN or infinite values")
    if unit_range and array.size and (array.min() < 0 or array.max() > 1):
        raise _field_error(field, "holds values outside [0, 1]")
    return array


def _checked_scalar(results, field, types, minimum=None, where=""):
    value, field = results.get(field), f"{where}.{field}" if where else field
    if type(value) not in types or (minimum is not None and not value >= minimum) or (
            isinstance(value, float) and not math.isfinite(value)):
        names = " or ".join(kind.__name__ for kind in types)
        raise _field_error(field, f"must be a finite {names}{f' >= {minimum}' if minimum is not None else ''}, "
                                  f"not {_shown(value)}")
    return value


def _check_backwork_results(results):
    label = _checked_scalar(results, "label", (int,), minimum=0)
    images = _checked_array(results, "images", "f", ndim=(3, 4), finite=True, unit_range=True)
    count = len(images)
    if count == 0:
        raise _field_error("images", "is empty")
    probs = _checked_array(results, "probs", "f", ndim=(2,), rows=count, finite=True)
    if not label < probs.shape[1]:
        raise _field_error("label", f"{_shown(label)} is not one of the {probs.shape[1]} classes of 'probs'")
    _checked_array(results, "steps_to_reach", "i", ndim=(1,), rows=count)
    _checked_scalar(results, "steps", (int,), minimum=0)
    _checked_scalar(results, "seconds", (int, float), minimum=0)
    if not isinstance(results.get("options", {}), dict) or not isinstance(results.get("history", []), list):
        raise _field_error("options' or 'history", "has the wrong type")
    if "prob_cap_min" in results.get("options", {}):  # cnn_backwork.py --evaluate counts images at this cap.
        _checked_scalar(results["options"], "prob_cap_min", (int, float), minimum=0, where="options")
    for record_index, record in enumerate(results.get("history", [])):
        where = f"history[{record_index}]"
        if not isinstance(record, dict):
            raise _field_error(where, "is not a dict")
        _checked_scalar(record, "step", (int,), minimum=0, where=where)
        _checked_array(record, "images", "f", ndim=(images.ndim,), finite=True, unit_range=True, where=where)
        _checked_array(record, "probs", "f", ndim=(1, 2), finite=True, where=where)
        _checked_scalar(record, "cost", (int, float), where=where)
    for field, rows in [("nearest_training_distance", count), ("layer_cost_coeffs", None)]:
        if field in results:
            _checked_array(results, field, "f", rows=rows, finite=True)
    if "worst_training_images" in results or "worst_training_probs" in results:  # Drawn as a figure's row.
        worst = _checked_array(results, "worst_training_images", "f", ndim=(images.ndim,), finite=True)
        _checked_array(results, "worst_training_probs", "f", ndim=(2,), rows=len(worst), finite=True)
        if results["worst_training_probs"].shape[1] != probs.shape[1]:
            raise _field_error("worst_training_probs", f"has {results['worst_training_probs'].shape[1]} classes, "
                                                       f"'probs' {probs.shape[1]}")


def _check_saliency_results(results):
    images = _checked_array(results, "images", "f", ndim=(4,), finite=True)
    for field in ("labels", "image_labels"):
        _checked_array(results, field, "i", ndim=(1,), rows=len(images))
    _checked_array(results, "probs", "f", ndim=(2,), rows=len(images), finite=True)
    for method in ("vanilla", "guided", "vanilla_smooth", "guided_smooth"):
        if method in results:
            _checked_array(results, method, "f", ndim=(4,), rows=len(images), finite=True)


_RESULTS_CHECKS = {"backwork": _check_backwork_results, "saliency": _check_saliency_results}


def check_results(results):
    """Check the fields the scripts read, for the file's kind; return results unchanged.

    The one place where a results file's contents are validated: every reader gets either
    a complete, finite dict or a ResultsFormatError naming the field.
    """
    if not isinstance(results, dict):
        raise ResultsFormatError("it does not hold a dict")
    version = results.get("format_version")
    if type(version) is not int or version != RESULTS_FORMAT_VERSION:
        raise ResultsFormatError(f"it has format_version {_shown(version)}, not {RESULTS_FORMAT_VERSION}: written by "
                                 "another version of these scripts; run cnn_backwork.py again")
    kind = results.get("kind")
    if not isinstance(kind, str) or kind not in _RESULTS_CHECKS:
        raise ResultsFormatError(f"its kind {_shown(kind)} is not one of {', '.join(_RESULTS_CHECKS)}")
    _RESULTS_CHECKS[kind](results)
    return results


# ------------------------------------------------------------------------------- data

# The file each download leaves in Keras' cache (~/.keras/datasets), hashed for provenance;
# fashion_mnist is four files, so it is recorded by its name alone.
CACHED_FILES = {"mnist": "mnist.npz", "cifar10": "cifar-10-batches-py-target_archive",
                "cifar100": "cifar-100-python-target_archive"}

DATA_HINT = ("give a local copy in the Keras layout with --data PATH or DATA_PATH=PATH (MNIST_PATH=PATH for "
             "MNIST; on this project's machines: ../shared/data/mnist.npz; never commit it)")


OOD_HINT = ("give --ood a Keras-layout .npz of images that are none of the model's classes (for an MNIST model, "
            "on this project's machines: ../shared/data/fashion_mnist.npz)")


def _check_npz_members(archive, path, hint):
    """Refuse an archive member whose header claims more data than it holds (read lazily)."""
    for info in archive.infolist():
        if not info.filename.endswith(".npy"):
            continue
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(member)
        if dtype.hasobject or math.prod(shape) * dtype.itemsize > info.file_size:
            raise UserError(f"{path}: {info.filename} claims shape {shape} of {dtype}, more than the "
                            f"{info.file_size} bytes it holds; the file is damaged. {hint}")


def _read_npz(path, hint=DATA_HINT):
    """The arrays of a local .npz; a bad file is one line ending in hint (what to give instead)."""
    path = Path(path)
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "does not exist"
        raise UserError(f"data file {path} {problem}; {hint}")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not an .npz archive (a zip of .npy arrays); {hint}")
    try:
        with zipfile.ZipFile(path) as archive:
            _check_npz_members(archive, path, hint)
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{path} is not a readable .npz file ({message}); {hint}") from None


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
    sha256 = file_sha256(path) if Path(path).is_file() else None
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
    for split in ("train", "test"):
        data[f"x_{split}"], data[f"y_{split}"] = _validate_split(arrays, split, source)
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
        return f"keras.datasets.{provenance['dataset']}"
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


def split_validation(data, validation_size):
    """Hold out the last validation_size training examples (the same ones for every seed)."""
    if not 0 <= validation_size < len(data["x_train"]):
        raise UserError(f"validation_size {validation_size} must be between 0 and the "
                        f"{len(data['x_train'])} training examples; change data.validation_size")
    keep = len(data["x_train"]) - validation_size
    return {**data,
            "x_train": data["x_train"][:keep], "y_train": data["y_train"][:keep],
            "x_val": data["x_train"][keep:], "y_val": data["y_train"][keep:]}




def with_channel(images):
    """Grey images (N, H, W), as results files hold them, as (N, H, W, 1) for a model."""
    return images[..., None] if images.ndim == 3 else images


def format_seconds(seconds):
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
