"""The results format: what a backwork or saliency results file holds, and its safe reader.

save_results and load_results write and read one file; check_results is the one place
its fields are validated; label_results_path, save_label_results and load_label_results
name and read a backwork folder (one results_{label}.pkl per label); final_images and
steps_and_distances are how the other modules read a folder's images and numbers, so the
dict's fields are known here only. docs/results-format.md lists the fields.
"""
import io
import math
import os
import pickle
import pickletools
import re
from pathlib import Path

import numpy as np

import common
from common import UserError, shown
#
# A results file is a pickle that holds nothing but dicts, lists, tuples, str, int, float,
# bool, None and bytes. Each NumPy array is stored as a small record
#     {"__ndarray__": dtype name, "shape": [...], "data": raw little-endian bytes}
# and rebuilt with np.frombuffer after its shape has been bounded (each size, and what the
# sizes span with a zero counted as one) and its byte count checked against that shape.
# So reading one constructs no class at all: the opcodes are checked before anything is
# built, and the unpickler's find_class refuses every name. A file can then neither run
# code nor make the reader build an array over memory that is not its own, and every
# allocation is bounded by the file's size: the opcode walk bounds what the unpickler
# allocates (its memo, its frames, the count of values), and the decoding bounds what
# shared values could multiply (every use of a byte or text string counts).
# docs/results-format.md lists what a reader can rely on.

RESULTS_FORMAT_VERSION = 2
MAX_RESULTS_BYTES = 1 << 30  # 1 GiB: far above any backwork or saliency file.
# Values (containers, numbers, strings, array records' parts) in one file: a file of S bytes may hold
# BASE_RESULTS_VALUES + S / RESULTS_BYTES_PER_VALUE. A history record holds a few dozen and its images'
# bytes, so a real file has about one value per kilobyte (a test's made-up file a few hundred in all).
# A value costs the reader up to about 200 bytes however few bytes of pickle made it (an empty list is
# one opcode, one byte), hence a count bounded by the file.
BASE_RESULTS_VALUES = 120_000
RESULTS_BYTES_PER_VALUE = 256
OPCODES_PER_VALUE = 4  # the value, its memo entry, a MARK and the APPENDS or SETITEMS that place it
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


def peak_memory_bound(file_bytes):
    """The most memory load_results takes to read a file of file_bytes bytes, refused or not: the
    file, the unpickler's copy, the values it may build, strings (4 bytes a character at worst) and
    arrays. tests/test_results_format.py measures it on the files that cost the most."""
    return 12 * file_bytes + (64 << 20)


def max_results_values(file_bytes):
    """How many values (containers, numbers, strings) a results file of file_bytes bytes may hold."""
    return BASE_RESULTS_VALUES + file_bytes // RESULTS_BYTES_PER_VALUE


# Every use of a byte or text string counts against this many bytes per byte of file, plus
# STRING_BYTES_SLACK: each is stored once in a file our writer makes, but a crafted file can store
# one string once and refer to it a thousand times (a memo reference costs it two bytes), and
# each array record's bytes are copied as the array is rebuilt.
STRING_BYTES_PER_FILE_BYTE = 2
STRING_BYTES_SLACK = 1 << 20


class _Budget:
    """What a file may still expand into as it is decoded: values, and bytes of strings used."""

    def __init__(self, file_bytes):
        self.values = max_results_values(file_bytes)
        self.string_bytes = STRING_BYTES_PER_FILE_BYTE * file_bytes + STRING_BYTES_SLACK

    def spend(self, value, where, values=1):
        self.values -= values
        if self.values < 0:
            raise ResultsFormatError(f"it holds more values than a results file of its size may (at {where})")
        if isinstance(value, (bytes, str)):
            self.string_bytes -= len(value)
            if self.string_bytes < 0:
                raise ResultsFormatError(f"its strings, each counted where it is used, outgrow the file at {where} "
                                         "(one string referred to many times)")


def _array_from_record(record, where, budget):
    dtype_name, shape, data = record.get(ARRAY_MARKER), record.get("shape"), record.get("data")
    if set(record) != {ARRAY_MARKER, "shape", "data"} or not isinstance(dtype_name, str) \
            or dtype_name not in ARRAY_DTYPES:
        raise ResultsFormatError(f"{where} is an array record with dtype {shown(dtype_name)} or keys "
                                 f"{sorted(shown(key) for key in record)[:5]} that this format does not have")
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
    # The record's dtype name, shape, sizes and data are values too; and the data is copied below, so
    # one bytes object shared by many records would be copied many times.
    budget.spend(data, where, values=3 + len(shape))
    return np.frombuffer(data, dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def _decode(value, where, budget, seen, depth=0):
    """The loaded plain value with array records rebuilt; shared or cyclic containers refused.

    budget (a _Budget) counts every value and every use of a string, keys included.
    """
    budget.spend(value, where)
    if depth > MAX_RESULTS_DEPTH:
        raise ResultsFormatError(f"{where} nests deeper than any results file ({MAX_RESULTS_DEPTH} levels)")
    if isinstance(value, (dict, list, tuple)):
        if id(value) in seen:  # Our writer never shares a container; a crafted file could, 10^9 times.
            raise ResultsFormatError(f"{where} refers back to a container seen before")
        seen.add(id(value))
    if isinstance(value, dict):
        if ARRAY_MARKER in value:
            return _array_from_record(value, where, budget)
        decoded = {}
        for key, item in value.items():
            budget.spend(key, where)
            decoded[key] = _decode(item, f"{where}[{shown(key)}]", budget, seen, depth + 1)
        return decoded
    if isinstance(value, (list, tuple)):
        return [_decode(item, f"{where}[{index}]", budget, seen, depth + 1) for index, item in enumerate(value)]
    return value


_CONSTRUCTING_OPCODES = ("GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "INST", "OBJ", "NEWOBJ")
_MEMO_STORES = ("PUT", "BINPUT", "LONG_BINPUT")


def _check_opcode(name, argument, count, file_bytes):
    """Refuse the count-th opcode of a file unless it is a plain value's that allocates within the file.

    The unpickler keeps its memo as an array as long as the largest index stored: a pickler
    numbers memo entries from 0, one per opcode at most, so a larger index can only be a
    request for memory. A frame is read whole before its opcodes, so it is at most the file.
    """
    if name in _CONSTRUCTING_OPCODES:
        raise ResultsFormatError(
            f"it asks to construct objects (opcode {name}), which a results file never holds; if it was "
            "written by an older version of these scripts (format 1), run cnn_backwork.py again")
    if name not in _PLAIN_OPCODES:
        raise ResultsFormatError(f"it holds pickle opcode {name}, which a results file never holds")
    if name in _MEMO_STORES and not 0 <= argument < count:
        raise ResultsFormatError(f"its opcode {count} stores a value at memo index {shown(argument)}, beyond "
                                 "the opcodes before it")
    if name == "FRAME" and argument > file_bytes:
        raise ResultsFormatError(f"it is truncated or damaged: it claims a frame of {shown(argument)} bytes in a "
                                 f"file of {file_bytes}")


def _check_opcodes(data):
    """Walk the pickle's opcodes without building anything; refuse any _check_opcode refuses, and more
    opcodes than the values a file of this size may hold need."""
    limit = OPCODES_PER_VALUE * max_results_values(len(data))
    try:
        for count, (opcode, argument, _) in enumerate(pickletools.genops(data), start=1):
            if count > limit:
                raise ResultsFormatError(f"it holds more than {limit} pickle opcodes, more than a results file "
                                         f"of {len(data)} bytes needs")
            _check_opcode(opcode.name, argument, count, len(data))
    except ValueError as error:  # pickletools' word for truncated or malformed data
        if isinstance(error, ResultsFormatError):
            raise
        raise ResultsFormatError(f"it is truncated or not a pickle ({shown(str(error), 100)})") from None


class _NoClassUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it asks to construct {module}.{name}")

    def persistent_load(self, persistent_id):
        raise pickle.UnpicklingError("it refers to a persistent object")


def _results_from_bytes(data):
    """The checked results dict a pickle holds, arrays rebuilt; ResultsFormatError (or the unpickler's
    own error) where it breaks the format. Peak memory: docs/results-format.md."""
    _check_opcodes(data)
    try:
        loaded = _NoClassUnpickler(io.BytesIO(data)).load()
    except (TypeError, ValueError, AttributeError, IndexError, KeyError, OverflowError) as error:
        # Plain opcodes in an order no pickler writes: a list as a dict key, a byte string
        # that is not ASCII, an item set on a list. Nothing was built but plain values.
        raise ResultsFormatError(f"it is not a pickle of plain values ({type(error).__name__}: "
                                 f"{shown(str(error), 100)})") from None
    return check_results(_decode(loaded, "results", _Budget(len(data)), set()))


def save_results(path, results, kind="backwork"):
    """Write a results dict (plain values and NumPy arrays) atomically, in the format above.

    The bytes to be written are read back as load_results reads them, so a NaN image or a
    malformed field is an error here rather than a file that cannot be read back.
    """
    results = {**results, "format_version": RESULTS_FORMAT_VERSION, "kind": kind}
    try:
        data = pickle.dumps(_encode(results, "results"), protocol=4)
        _results_from_bytes(data)
    except ResultsFormatError as error:
        raise ValueError(f"refusing to save {path}: {error}") from None
    common.atomic_write_bytes(path, data)


RESULTS_FILE_FIX = "run cnn_backwork.py first or give the path of a results_<label>.pkl"


def load_results(path):
    """Read and check a results file; returns the dict with its arrays rebuilt.

    Guarantees: nothing but plain values and arrays of allowed numeric dtypes is built,
    every array owns memory of exactly its shape, memory stays within the bound of
    docs/results-format.md, and the fields the scripts read are present (or, where optional,
    absent), of the right type and shape, and finite (see check_results).
    """
    data = common.read_input(path, "results file", RESULTS_FILE_FIX, MAX_RESULTS_BYTES)
    try:
        return _results_from_bytes(data)
    except (pickle.UnpicklingError, ResultsFormatError, EOFError, MemoryError, RecursionError) as error:
        message = str(error).splitlines()[0] if str(error) else "the file is truncated or not a pickle"
        raise UserError(f"refusing to load {common.shown_path(path)}: {message}; use a file written by these "
                        "scripts, or re-create it") from None


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
                                  f"not {shown(value)}")
    return value


def _check_backwork_results(results):
    label = _checked_scalar(results, "label", (int,), minimum=0)
    images = _checked_array(results, "images", "f", ndim=(3, 4), finite=True, unit_range=True)
    count = len(images)
    if count == 0:
        raise _field_error("images", "is empty")
    probs = _checked_array(results, "probs", "f", ndim=(2,), rows=count, finite=True)
    if not label < probs.shape[1]:
        raise _field_error("label", f"{shown(label)} is not one of the {probs.shape[1]} classes of 'probs'")
    _checked_array(results, "steps_to_reach", "i", ndim=(1,), rows=count)
    _checked_scalar(results, "steps", (int,), minimum=0)
    _checked_scalar(results, "seconds", (int, float), minimum=0)
    if not isinstance(results.get("history", []), list):
        raise _field_error("history", f"has the wrong type ({shown(results['history'])}, not a list)")
    if "prob_cap_min" in recorded_options(results):  # cnn_backwork.py --evaluate counts images at this cap.
        _checked_scalar(results["options"], "prob_cap_min", (int, float), minimum=0, where="options")
    if "reinitialised" in results:
        _checked_scalar(results, "reinitialised", (int,), minimum=0)
    for record_index, record in enumerate(results.get("history", [])):
        where = f"history[{record_index}]"
        if not isinstance(record, dict):
            raise _field_error(where, "is not a dict")
        _checked_scalar(record, "step", (int,), minimum=0, where=where)
        _checked_array(record, "images", "f", ndim=(images.ndim,), finite=True, unit_range=True, where=where)
        _checked_array(record, "probs", "f", ndim=(1, 2), finite=True, where=where)
        _checked_scalar(record, "cost", (int, float), where=where)
    if "nearest_training_distance" in results:
        _checked_array(results, "nearest_training_distance", "f", rows=count, finite=True)
    if "layer_cost_coeffs" in results:
        _checked_array(results, "layer_cost_coeffs", "f", ndim=(1,), finite=True)
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

MAX_TEXT_LENGTH = 4096  # A path (the system's longest) or a name: what every text field of a file is.


def _checked_text(record, field, where, optional=False):
    """record[field] as a str of at most MAX_TEXT_LENGTH characters (or None where optional)."""
    if field not in record:
        raise _field_error(f"{where}{field}", f"is missing (a str{' or None' if optional else ''})")
    value = record[field]
    if not (isinstance(value, str) and len(value) <= MAX_TEXT_LENGTH or optional and value is None):
        raise _field_error(f"{where}{field}", f"must be a str of at most {MAX_TEXT_LENGTH} characters"
                                              f"{' or None' if optional else ''}, not {shown(value)}")
    return value


def _plain_option(value):
    """A value a config section can hold: a number (finite; an int within 64 bits, as Python can print it),
    str, bool or None."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, int):
        return value.bit_length() <= 64
    return isinstance(value, (bytes, type(None))) or isinstance(value, str) and len(value) <= MAX_TEXT_LENGTH


def _check_options(options):
    """options: the config section a file was made with; every entry plain, or a list of plain values."""
    if not isinstance(options, dict):
        raise _field_error("options", f"has the wrong type ({shown(options)}, not a dict)")
    for key, value in options.items():
        items = value if isinstance(value, list) else [value]
        if not isinstance(key, str) or not all(_plain_option(item) for item in items):
            name = common.shortened(key, 60) if isinstance(key, str) else shown(key)
            raise _field_error(f"options.{name}", f"must be a finite number, str, bool or None, or a list of them, "
                                                  f"not {shown(value)}")


def _check_data_record(record, where):
    """A record of the data images were made from (datasets.load_dataset's "provenance"), as
    datasets.describe_data and same_data read it: dataset, file and sha256 a str or None, download a
    bool where present, and model_data (the model's data, under --allow-other-data) such a record."""
    if not isinstance(record, dict):
        raise _field_error(where, f"is not a data record (a dict) but {shown(record)}")
    for key in ("dataset", "file", "sha256"):
        _checked_text(record, key, f"{where}.", optional=True)
    if not isinstance(record.get("download", False), bool):
        raise _field_error(f"{where}.download", f"must be true or false, not {shown(record['download'])}")
    if "model_data" in record:
        _check_data_record(record["model_data"], f"{where}.model_data")


def _check_shared_fields(results):
    """The optional fields of both kinds: options, the data record, and the model and source paths."""
    if "options" in results:
        _check_options(results["options"])
    if results.get("data") is not None:
        _check_data_record(results["data"], "data")
    for field in ("model", "source"):
        if field in results:
            _checked_text(results, field, "")


def recorded_options(results):
    """The config section a file's images were made with ({} for a file that has none: it is optional)."""
    return results.get("options", {})


def check_results(results):
    """Check the fields the scripts read, for the file's kind; return results unchanged.

    The one place where a results file's contents are validated: every reader gets either
    a complete, finite dict or a ResultsFormatError naming the field.
    """
    if not isinstance(results, dict):
        raise ResultsFormatError("it does not hold a dict")
    version = results.get("format_version")
    if type(version) is not int or version != RESULTS_FORMAT_VERSION:
        raise ResultsFormatError(f"it has format_version {shown(version)}, not {RESULTS_FORMAT_VERSION}: written by "
                                 "another version of these scripts; run cnn_backwork.py again")
    kind = results.get("kind")
    if not isinstance(kind, str) or kind not in _RESULTS_CHECKS:
        raise ResultsFormatError(f"its kind {shown(kind)} is not one of {', '.join(_RESULTS_CHECKS)}")
    _check_shared_fields(results)
    _RESULTS_CHECKS[kind](results)
    return results


# ----------------------------------------------------------- a backwork folder, one file per label

# A label as str(int) writes it: ASCII digits, no leading zero (results_00.pkl and results_\u0663.pkl,
# an Arabic-Indic three, are never taken for labels 0 and 3).
RESULTS_NAME = re.compile(r"results_(0|[1-9][0-9]*)\.pkl")


def label_results_path(out_dir, label):
    """The file of one backworked label's results in out_dir: results_{label}.pkl."""
    return Path(out_dir) / f"results_{label}.pkl"


def save_label_results(out_dir, result):
    """Save one backworked label's results dict (it holds its "label") as results_{label}.pkl in out_dir."""
    save_results(label_results_path(out_dir, result["label"]), result)


def load_label_results(out_dir, skip_unreadable=False, warn=print):
    """Every results_{label}.pkl in a folder, so figures include labels run by other processes.

    Only names of exactly that form count (results_1_old.pkl is ignored), and the label
    inside each file must be the one in its name. An unreadable file is an error, or with
    skip_unreadable a warning line (through warn) and the file is left out.
    """
    results = {}
    for path in sorted(Path(out_dir).iterdir()):
        match = RESULTS_NAME.fullmatch(path.name)
        if match is None or not path.is_file():
            continue
        try:
            result = load_results(path)
            if not isinstance(result, dict) or result.get("label") != int(match[1]):
                found = result.get("label") if isinstance(result, dict) else None
                raise UserError(f"{path} holds the results of label {found!r}, not {int(match[1])}; "
                                "rename or re-create it")
        except UserError as error:
            if not skip_unreadable:
                raise
            warn(f"warning: skipping {path.name} ({error})")
            continue
        results[int(match[1])] = result
    return results


def results_signature(out_dir):
    """Each results file of a folder as (name, inode, size, modification time): any new write changes it."""
    signature = []
    for path in Path(out_dir).iterdir():
        if RESULTS_NAME.fullmatch(path.name):
            # A write renames a new file (a new inode) over the old one, so even a same-sized rewrite shows.
            status = path.stat()
            signature.append((path.name, status.st_ino, status.st_size, status.st_mtime_ns))
    return sorted(signature)


def steps_and_distances(results):
    """Every image's steps_to_reach and nearest-training distance from backwork results, in class order."""
    ordered = [results[label] for label in sorted(results)]
    return (np.concatenate([result["steps_to_reach"] for result in ordered]),
            np.concatenate([result["nearest_training_distance"] for result in ordered]))


def final_labels(results):
    """The label each of final_images(results) was made for, (N,) int64, in the same order."""
    return np.concatenate([np.full(len(results[label]["images"]), label, np.int64) for label in sorted(results)])


def final_images(results):
    """Every label's final backworked images, (N, H, W, C), in label order."""
    return np.concatenate([common.with_channel(results[label]["images"]) for label in sorted(results)])


def load_results_folder(results_dir, option="--results"):
    """Every results_{label}.pkl of a folder (given with option), each checked by load_results."""
    results_dir = Path(results_dir)
    fix = f"give {option} the folder holding results_<label>.pkl (run cnn_backwork.py first)"
    if os.path.isfile(results_dir):  # Never raises; checked_input below says what else is wrong.
        raise UserError(f"{option} wants the folder holding results_<label>.pkl, not the file {results_dir}; "
                        f"use {option} {results_dir.parent}")
    return load_label_results(common.checked_input(results_dir, "results folder", fix, folder=True))


def check_results_fit(results, results_dir, image_shape, num_classes, shape_of="the data", classes_of="the model",
                      fix=None):
    """Refuse results whose images are not of image_shape (shape_of's) or whose probabilities do not
    have num_classes classes (classes_of's): the results of another model, which no figure or study
    can mix with this one's. fix ends the line (what to do instead)."""
    for label, result in sorted(results.items()):
        name = f"{common.shown_path(results_dir)}/results_{label}.pkl"
        label_images = common.with_channel(result["images"])
        if label_images.shape[1:] != tuple(image_shape):
            raise UserError(f"{name} holds images of shape {label_images.shape[1:]}, {shape_of} {tuple(image_shape)}; "
                            f"{fix or 'backwork a model trained on this data'}")
        if result["probs"].shape[-1] != num_classes:
            raise UserError(f"{name} has {result['probs'].shape[-1]} classes, {classes_of} {num_classes}; "
                            f"{fix or 'use results of a model with the same classes'}")
    return results


def check_fooling_results(results, results_dir, image_shape, num_classes):
    """Refuse results that lack a label or do not fit the data's images or the model's classes."""
    missing = sorted(set(range(num_classes)) - set(results))
    if missing:
        raise UserError(f"{results_dir} has no results for labels {missing}; run "
                        f"cnn_backwork.py --labels {','.join(map(str, missing))} first")
    return check_results_fit(results, results_dir, image_shape, num_classes)


def read_fooling_images(results_dir, image_shape, num_classes):
    """The final images of every results_{label}.pkl, checked against the data and model, and the results."""
    results = check_fooling_results(load_results_folder(results_dir), results_dir, image_shape, num_classes)
    return final_images(results), results
