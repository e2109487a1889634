"""The results format: plain values and array records only, checked field by field.

Every hostile file is built here, in the test; nothing hostile is committed.
"""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import common
import results_format
from common import UserError
from conftest import fake_backwork_results

PROJECT = Path(common.__file__).resolve().parent


def test_round_trip_keeps_arrays_and_plain_values(tmp_path):
    results = fake_backwork_results(3)
    results["options"] = {"a": [1, 2.5, "x", None, True], "b": b"raw"}
    results_format.save_results(tmp_path / "results_3.pkl", results)
    loaded = results_format.load_results(tmp_path / "results_3.pkl")
    for key in ("images", "probs", "steps_to_reach"):
        np.testing.assert_array_equal(loaded[key], results[key])
        assert loaded[key].dtype == results[key].dtype and loaded[key].flags.writeable
    assert loaded["options"] == results["options"] and loaded["format_version"] == 2
    assert loaded["kind"] == "backwork" and loaded["history"][0]["step"] == 25


def test_the_pickle_names_no_class_at_all(tmp_path):
    results_format.save_results(tmp_path / "results_3.pkl", fake_backwork_results(3))
    data = (tmp_path / "results_3.pkl").read_bytes()
    raw = pickle.loads(data)  # Plain pickle: would build any class the file named.
    assert raw["images"]["__ndarray__"] == "float32" and isinstance(raw["images"]["data"], bytes)
    assert b"numpy" not in data


def test_unsafe_values_are_not_written(tmp_path):
    with pytest.raises(ValueError, match="cannot be saved"):
        results_format.save_results(tmp_path / "bad.pkl", {**fake_backwork_results(1), "model": object()})
    with pytest.raises(ValueError, match="dtype object"):
        results_format.save_results(tmp_path / "bad.pkl", {**fake_backwork_results(1), "x": np.array([None])})
    nan_images = fake_backwork_results(1)
    nan_images["images"][0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="'images' holds NaN"):
        results_format.save_results(tmp_path / "bad.pkl", nan_images)
    assert list(tmp_path.iterdir()) == []


def array_record(dtype, shape, data):
    return {"__ndarray__": dtype, "shape": shape, "data": data}


def valid_plain():
    """A format-2 results dict as it sits in the pickle (arrays as records)."""
    return pickle.loads(pickle.dumps(results_format._encode({**fake_backwork_results(2), "format_version": 2,
                                                     "kind": "backwork"}, "results")))


class Exploit:
    def __reduce__(self):
        return (print, ("this ran",))


def nested_references(depth):
    shared = []
    for _ in range(depth):
        shared = [shared, shared]  # 2**depth leaves through memo references, a few bytes each.
    return shared


def deep_nesting(depth):
    return b"\x80\x04" + b"]" * depth + b"a" * (depth - 1) + b"."


def hostile_files():
    """name -> (bytes, a phrase the refusal must contain)."""
    plain = valid_plain()
    object_array = np.frombuffer(b"\x41" * 64, dtype=np.uint8)
    cases = {
        "code": (pickle.dumps({"images": Exploit()}), "construct objects"),
        "format1_numpy": (pickle.dumps({**fake_backwork_results(1), "format_version": 1}, protocol=4),
                          "older version"),
        "object_dtype_from_bytes": (pickle.dumps(object_array.view(np.dtype([("a", "u1", 8)]))), "construct"),
        "huge_shape": (pickle.dumps({**plain, "images": array_record("float32", [10**8, 28, 28], b"\0" * 129)}),
                       "claims shape (100000000, 28, 28)"),
        "object_record": (pickle.dumps({**plain, "images": array_record("object", [2], b"\0" * 16)}),
                          "dtype 'object'"),
        "big_endian_record": (pickle.dumps({**plain, "images": array_record(">f4", [1], b"\0" * 4)}), "dtype '>f4'"),
        "negative_shape": (pickle.dumps({**plain, "images": array_record("float32", [-1, 4], b"")}),
                           "malformed shape"),
        "billion_references": (pickle.dumps({**plain, "history": nested_references(30)}), "nests deeper"),
        "shared_references": (pickle.dumps({**plain, "history": nested_references(5)}), "refers back"),
        "cycle": (None, "refers back"),
        "deep": (deep_nesting(100_000), "nests deeper"),
        "terabyte_bytes": (b"\x80\x04\x8e" + (10**12).to_bytes(8, "little") + b"abc.", "truncated"),
        "persistent_id": (b"\x80\x04\x95\x0c\x00\x00\x00\x00\x00\x00\x00\x8c\x03abc\x94Q.", "BINPERSID"),
        "truncated": (pickle.dumps(plain)[:-40], "truncated"),
        "empty": (b"", "truncated"),
        "not_a_dict": (pickle.dumps([1, 2]), "does not hold a dict"),
        # A zero size makes the byte count 0 whatever the other sizes; numpy then refused the shape.
        "zero_beside_huge_sizes": (pickle.dumps({**plain, "images": array_record("float32", [2**32, 2**32, 0, 1],
                                                                                 b"")}), "malformed shape"),
        "zero_beside_sizes_too_many": (
            pickle.dumps({**plain, "images": array_record("float32", [2**30] * 3 + [0], b"")}),
            "claims shape (1073741824, 1073741824, 1073741824, 0) of float32, more than"),
        "bool_size": (pickle.dumps({**plain, "images": array_record("float32", [True, 12, 12], b"\0" * 576)}),
                      "malformed shape"),
        "float_size": (pickle.dumps({**plain, "images": array_record("float32", [3.0, 12, 12], b"\0" * 1728)}),
                       "malformed shape"),
        "million_digit_size": (pickle.dumps({**plain, "images": array_record("float32", [10**5000], b"")}),
                               "malformed shape"),
        "million_digit_label": (pickle.dumps({**plain, "label": 10**5000}), "'label' an int of 16610 bits is not"),
        "million_digit_version": (pickle.dumps({**plain, "format_version": 10**5000}),
                                  "format_version an int of 16610 bits, not 2"),
        "array_version": (pickle.dumps({**plain, "format_version": array_record("int64", [2], b"\0" * 16)}),
                          "format_version an array of shape (2,), not 2"),
        "list_dtype": (pickle.dumps({**plain, "images": array_record(["float32"], [1], b"\0" * 4)}),
                       "dtype a list of 1 items"),
        "list_kind": (pickle.dumps({**plain, "kind": ["backwork"]}), "kind a list of 1 items is not one of"),
        "long_string_label": (pickle.dumps({**plain, "label": "x" * 10**6}), "... (1000000 long)"),
        "long_string_key": (pickle.dumps({**plain, "history": [{"x" * 10**6: [1.0] * 100_000}]}),
                            "'history[0].step' must be"),
        "no_rows": (pickle.dumps({**plain, "nearest_training_distance": array_record("float32", [], b"\0" * 4)}),
                    "'nearest_training_distance' has no rows but images has 3"),
        "history_not_a_list": (pickle.dumps({**plain, "history": 5}), "has the wrong type"),
        "worst_images_flat": (
            pickle.dumps({**plain, "worst_training_images": array_record("float32", [3], b"\0" * 12)}),
            "'worst_training_images' has shape (3,), not 3-d"),
        "cap_not_a_number": (pickle.dumps({**plain, "options": {"prob_cap_min": "x"}}),
                             "'options.prob_cap_min' must be a finite int or float >= 0, not 'x'"),
        # Plain opcodes in orders no pickler writes: the unpickler itself fails.
        "non_ascii_string": (b"\x80\x02U\x01\xff.", "not a pickle of plain values (UnicodeDecodeError"),
        "list_as_key": (b"\x80\x02}]]s.", "not a pickle of plain values (TypeError"),
        "item_set_on_list": (b"\x80\x02]KaKbs.", "not a pickle of plain values (IndexError"),
        # Fields a script reads beyond the images and numbers: the data record, the options, the model.
        "data_without_dataset": (pickle.dumps({**plain, "data": {"download": True}}),
                                 "field 'data.dataset' is missing (a str or None)"),
        "data_sha256_an_array": (pickle.dumps({**plain, "data": {"dataset": None, "file": "x.npz", "sha256":
                                                                 array_record("uint8", [2], b"ab")}}),
                                 "field 'data.sha256' must be a str"),
        "data_download_a_string": (pickle.dumps({**plain, "data": {"dataset": None, "file": None, "sha256": None,
                                                                   "download": "yes"}}),
                                   "field 'data.download' must be true or false, not 'yes'"),
        "model_data_not_a_record": (pickle.dumps({**plain, "data": {"dataset": None, "file": None, "sha256": None,
                                                                    "model_data": [1]}}),
                                    "field 'data.model_data' is not a data record"),
        "data_file_of_ten_megabytes": (pickle.dumps({**plain, "data": {"dataset": None, "file": "x" * 10**7,
                                                                       "sha256": None}}), "(10000000 long)"),
        "options_an_array": (pickle.dumps({**plain, "options": {"learning_rate": array_record("float64", [2],
                                                                                              b"\0" * 16)}}),
                             "field 'options.learning_rate' must be a finite number, str, bool or None, or a list"),
        "options_a_nested_list": (pickle.dumps({**plain, "options": {"layer_cost_coeffs": [[1.0], [2.0]]}}),
                                  "field 'options.layer_cost_coeffs' must be"),
        "options_an_infinite_number": (pickle.dumps({**plain, "options": {"tolerance": float("inf")}}),
                                       "field 'options.tolerance' must be a finite number"),
        "options_not_a_dict": (pickle.dumps({**plain, "options": [1]}), "field 'options' has the wrong type"),
        "options_a_5000_digit_int": (pickle.dumps({**plain, "options": {"seed": 10**5000}}),
                                     "field 'options.seed' must be a finite number, str, bool or None, or a list of "
                                     "them, not an int of 16610 bits"),
        "model_a_number": (pickle.dumps({**plain, "model": 3}), "field 'model' must be a str"),
        "layer_cost_coeffs_a_matrix": (pickle.dumps({**plain, "layer_cost_coeffs": array_record("float32", [1, 1],
                                                                                                b"\0" * 4)}),
                                       "field 'layer_cost_coeffs' has shape (1, 1), not 1-d"),
        "reinitialised_negative": (pickle.dumps({**plain, "reinitialised": -1}), "field 'reinitialised' must be"),
    }
    cycle = {**plain, "history": []}
    cycle["history"].append(cycle["history"])
    cases["cycle"] = (pickle.dumps(cycle), "refers back")
    return cases


@pytest.mark.parametrize("name", sorted(hostile_files()))
def test_hostile_files_are_refused_in_one_line(tmp_path, name, capsys):
    data, phrase = hostile_files()[name]
    path = tmp_path / "results_2.pkl"
    path.write_bytes(data)
    with pytest.raises(UserError) as refusal:
        results_format.load_results(path)
    message = str(refusal.value)
    assert phrase in message and str(path) in message and "\n" not in message
    assert len(message) < len(str(path)) + 400  # Whatever the file holds, the line stays short.
    assert "this ran" not in capsys.readouterr().out


def test_hostile_files_cannot_crash_a_reader_process(tmp_path):
    """In a process of its own, where a segmentation fault or a MemoryError would show."""
    for name, (data, _) in hostile_files().items():
        (tmp_path / f"{name}.pkl").write_bytes(data)
    script = ("import sys, common, results_format\n"
              "for path in sys.argv[1:]:\n"
              "    try:\n"
              "        results_format.load_results(path)\n"
              "        print('LOADED', path)\n"
              "    except common.UserError:\n"
              "        print('refused')\n")
    paths = sorted(str(path) for path in tmp_path.iterdir())
    result = subprocess.run([sys.executable, "-c", script, *paths], cwd=PROJECT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["refused"] * len(paths)


def test_oversized_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "results_1.pkl"
    with open(path, "wb") as file:
        file.truncate(results_format.MAX_RESULTS_BYTES + 1)  # Sparse: no disk used.
    with pytest.raises(UserError, match="more than a results file holds"):
        results_format.load_results(path)


@pytest.mark.parametrize("change,field", [
    (lambda r: r["images"].__setitem__((0, 0, 0), np.nan), "'images' holds NaN"),
    (lambda r: r["images"].__setitem__((0, 0, 0), 1.5), "'images' holds values outside [0, 1]"),
    (lambda r: r.__setitem__("images", r["images"].astype(np.float64).reshape(3, -1)), "'images' has shape"),
    (lambda r: r.__setitem__("label", 10), "'label' 10 is not one of the 10 classes"),
    (lambda r: r.__setitem__("label", "3"), "'label' must be a finite int"),
    (lambda r: r.__setitem__("probs", r["probs"][:2]), "'probs' has 2 rows but images has 3"),
    (lambda r: r["probs"].__setitem__((0, 0), np.inf), "'probs' holds NaN or infinite"),
    (lambda r: r.__setitem__("steps_to_reach", np.zeros(3)), "'steps_to_reach' is not an int array"),
    (lambda r: r.pop("steps"), "'steps' must be a finite int"),
    (lambda r: r["history"][0].pop("cost"), "'history[0].cost' must be a finite"),
    (lambda r: r["history"][0]["probs"].__setitem__(1, -np.inf), "'history[0].probs' holds NaN or infinite"),
    (lambda r: r.__setitem__("history", [3]), "'history[0]' is not a dict"),
])
def test_every_field_the_readers_use_is_checked(tmp_path, change, field):
    import pickle as plain_pickle

    results = {**fake_backwork_results(2), "format_version": 2, "kind": "backwork"}
    change(results)
    path = tmp_path / "results_2.pkl"
    path.write_bytes(plain_pickle.dumps(results_format._encode(results, "results")))
    with pytest.raises(UserError, match=f"refusing to load {path}: field " + field.replace("[", r"\[")
                                        .replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        results_format.load_results(path)


def test_metrics_json_never_holds_a_bare_nan(tmp_path):
    common.write_json(tmp_path / "metrics.json", {"accuracy": float("nan"), "history": [{"loss": float("inf")}]})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"accuracy": None, "history": [{"loss": None}]}


def test_written_files_honour_the_umask(tmp_path):
    import os

    previous = os.umask(0o027)
    try:
        results_format.save_results(tmp_path / "results_1.pkl", fake_backwork_results(1))
        common.write_json(tmp_path / "metrics.json", {})
    finally:
        os.umask(previous)
    for name in ("results_1.pkl", "metrics.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("name", ["format1_numpy", "object_dtype_from_bytes", "huge_shape", "terabyte_bytes",
                                  "billion_references", "zero_beside_huge_sizes", "data_without_dataset",
                                  "data_sha256_an_array", "options_an_array"])
def test_the_scripts_refuse_hostile_files_in_one_line_and_write_nothing(name, tmp_path):
    """guided_backprop.py --images FILE and preprocess_data.py --results DIR, each in its own process."""
    data, phrase = hostile_files()[name]
    hostile = tmp_path / "results"
    hostile.mkdir()
    for label in range(10):
        results_format.save_results(hostile / f"results_{label}.pkl", fake_backwork_results(label))
    (hostile / "results_3.pkl").write_bytes(data)
    model = tmp_path / "run" / "model.keras"
    model.parent.mkdir()
    import zipfile

    with zipfile.ZipFile(model, "w") as archive:  # Never loaded: the results are refused first.
        archive.writestr("config.json", "{}")
    commands = [["guided_backprop.py", "--model", str(model), "--images", str(hostile / "results_3.pkl"),
                 "--out", str(tmp_path / "saliency")],
                ["preprocess_data.py", "--model", str(model), "--results", str(hostile), "--data",
                 str(tmp_path / "none.npz"), "--out", str(tmp_path / "aug")]]
    np.savez(tmp_path / "none.npz", x_train=np.zeros((20, 12, 12), np.uint8), y_train=np.arange(20) % 10,
             x_test=np.zeros((10, 12, 12), np.uint8), y_test=np.arange(10))
    before = sorted(path.name for path in tmp_path.rglob("*"))
    for command in commands:
        result = subprocess.run([sys.executable, str(PROJECT / command[0]), *command[1:]], capture_output=True,
                                text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], lines
    assert sorted(path.name for path in tmp_path.rglob("*")) == before  # Nothing written, no folder left.


# ------------------------------------------------ files that would expand: memory bounded by the file


def framed(body):
    """A protocol-4 pickle of body's opcodes (a PROTO 4 header, body, no frame)."""
    return b"\x80\x04" + body


def structure_file(extra_opcodes, extra=None):
    """A valid plain results pickle (protocol 3: no frames) whose options["x"] is a list of extra_opcodes'
    values (each opcode one value), and with an extra field of value extra."""
    data = pickle.dumps({**valid_plain(), "extra": extra, "options": {"x": "PLACEHOLDER"}}, protocol=3)
    start = data.index(b"PLACEHOLDER") - 5  # BINUNICODE: one opcode byte and four of length.
    return data[:start] + b"](" + extra_opcodes + b"e" + data[start + 5 + len("PLACEHOLDER"):]


def shared_megabyte():
    """A plain results dict with 1,500 array records that share one 1 MiB bytes object: a 1.1 MB file."""
    megabyte = b"\1" * (1 << 20)
    return {**valid_plain(), "extra": [array_record("uint8", [1 << 20], megabyte) for _ in range(1500)]}


MOST_OPCODES = results_format.OPCODES_PER_VALUE * results_format.max_results_values(0) - 200
FOUR_MEGABYTES = 4 << 20
ASTRAL = "\U0001F600" + "a" * FOUR_MEGABYTES  # One astral character: four bytes for each of them in memory.
FLOAT = b"G?\xf8\0\0\0\0\0\0"  # BINFLOAT 1.5

# name -> (a function making the file's bytes, a phrase the refusal must contain, or None where it loads).
EXPANDING_FILES = {
    # A FRAME of 2**63 bytes: an OverflowError in the unpickler.
    "frame_beyond_the_file": (lambda: framed(b"\x95" + (2**63).to_bytes(8, "little")
                                             + pickle.dumps(valid_plain(), protocol=4)[11:]), "claims a frame"),
    # LONG_BINPUT (and PUT) 75,000,000 before STOP: a memo array of 600 MB.
    "memo_index_far_away": (lambda: pickle.dumps(valid_plain(), protocol=4)[:-1] + b"r"
                            + (75_000_000).to_bytes(4, "little") + b".", "memo index 75000000"),
    "memo_put_far_away": (lambda: pickle.dumps(valid_plain(), protocol=4)[:-1] + b"p75000000\n.",
                          "memo index 75000000"),
    "shared_megabyte_1500_times": (lambda: pickle.dumps(shared_megabyte(), protocol=4),
                                   "one string referred to many times"),
    # A legal pickle of 100,000 option entries: more values than a file of its size may hold.
    "options_of_100000_entries": (lambda: pickle.dumps({**valid_plain(), "options": {
        f"k{index}": index for index in range(100_000)}}, protocol=4), "than a results file of"),
    # The most opcodes the walk lets through, each an empty dict of one byte (the costliest value, about 200
    # bytes once unpickled and decoded): the constant of the bound.
    "most_empty_dicts": (lambda: structure_file(b"}" * MOST_OPCODES), "more values than a results file of its size"),
    # As many floats as a 4 MB file may hold, and a string of four bytes a character: a file that loads.
    "astral_string_and_floats": (lambda: structure_file(FLOAT * (results_format.max_results_values(FOUR_MEGABYTES)
                                                                 - 2000), ASTRAL), None),
}


def peak_of_load(path):
    """load_results(path) and its peak traced memory (NumPy's arrays are traced too); the refusal or None."""
    import tracemalloc

    tracemalloc.start()
    try:
        results_format.load_results(path)
        refusal = None
    except UserError as error:
        refusal = str(error)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, refusal


@pytest.mark.parametrize("name", sorted(EXPANDING_FILES))
def test_a_small_file_cannot_expand_beyond_the_bound(tmp_path, name):
    """Memo indices, frames, shared strings and counts of values: refused, each load within the bound."""
    make, phrase = EXPANDING_FILES[name]
    data = make()
    path = tmp_path / "results_2.pkl"
    path.write_bytes(data)
    peak, refusal = peak_of_load(path)
    if phrase is None:
        assert refusal is None, refusal
    else:
        assert refusal is not None and phrase in refusal and "\n" not in refusal, refusal
    assert peak <= results_format.peak_memory_bound(len(data)), (peak, len(data))


# A script for a process of its own: loads each file given, one JSON line each, with its peak memory.
LOAD_AND_MEASURE = """
import json, sys, tracemalloc
import common, results_format
for path in sys.argv[1:]:
    tracemalloc.start()
    try:
        results = results_format.load_results(path)
        results_format.check_results(results)
        outcome = "loaded"
    except common.UserError as error:
        outcome = "refused: " + str(error).partition(": ")[2].split(";")[0] if "\\n" not in str(error) else "two lines"
    except BaseException as error:
        outcome = "FAILED " + type(error).__name__ + ": " + str(error)[:200]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps({"path": path, "outcome": outcome, "peak": peak}), flush=True)
"""


def mutants(valid, seed, count=300, truncations=100):
    """Seeded variants of a valid file: count with one to three bytes changed (half of them at an
    opcode or within its argument, where lengths, indices and frames are), and truncations."""
    import pickletools

    rng = np.random.default_rng(seed)
    opcode_positions = [position for _, _, position in pickletools.genops(valid)]
    for index in range(count):
        data = bytearray(valid)
        for _ in range(rng.integers(1, 4)):
            if index % 2:
                where = min(int(rng.choice(opcode_positions)) + int(rng.integers(0, 9)), len(data) - 1)
            else:
                where = int(rng.integers(0, len(data)))
            data[where] = int(rng.integers(0, 256))
        yield bytes(data)
    for length in rng.integers(0, len(valid), truncations):
        yield valid[:length]


def test_random_changes_and_truncations_load_checked_or_are_refused_within_the_bound(tmp_path):
    """Each of 400 damaged copies of a valid file either loads and passes the checks or is refused in one
    UserError line, in a process of its own, and its load stays within the memory bound."""
    results = {**fake_backwork_results(2), "reinitialised": 1, "nearest_training_distance": np.ones(3, np.float32),
               "layer_cost_coeffs": np.ones(4, np.float32), "data": {"dataset": "mnist", "file": None, "sha256": None,
                                                                    "download": True}}
    results["history"].append({**results["history"][0], "step": 50})
    results_format.save_results(tmp_path / "valid.pkl", results)
    valid = (tmp_path / "valid.pkl").read_bytes()
    paths = []
    for index, data in enumerate(mutants(valid, seed=25)):
        paths.append(tmp_path / f"mutant_{index}.pkl")
        paths[-1].write_bytes(data)
    process = subprocess.run([sys.executable, "-c", LOAD_AND_MEASURE, *map(str, paths)], cwd=PROJECT,
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr[-2000:]
    reports = [json.loads(line) for line in process.stdout.splitlines()]
    assert len(reports) == len(paths) == 400
    failures = [report for report in reports if not report["outcome"].startswith(("loaded", "refused: "))]
    assert failures == []
    for report in reports:
        assert report["peak"] <= results_format.peak_memory_bound(Path(report["path"]).stat().st_size), report
    # Not trivial: some copies still load (a changed number or image value), and the refusals are of many kinds.
    outcomes = [report["outcome"] for report in reports]
    assert 0 < outcomes.count("loaded") < 200 and len(set(outcomes)) > 20


def test_the_folder_reader_takes_only_labels_as_str_writes_them(tmp_path):
    """results_00.pkl and results_\u0663.pkl (an Arabic-Indic three) are never read as labels 0 and 3."""
    for name, label, seed in [("results_0.pkl", 0, 0), ("results_00.pkl", 0, 1), ("results_\u0663.pkl", 3, 2),
                              ("results_12.pkl", 12, 3), ("results_012.pkl", 12, 4)]:
        results_format.save_results(tmp_path / name, fake_backwork_results(label, num_classes=13, seed=seed))
    results = results_format.load_label_results(tmp_path)
    assert sorted(results) == [0, 12]
    np.testing.assert_array_equal(results[0]["images"], fake_backwork_results(0, num_classes=13, seed=0)["images"])
    assert [name for name, *_ in results_format.results_signature(tmp_path)] == ["results_0.pkl", "results_12.pkl"]


def test_results_of_another_model_are_refused_by_name(tmp_path):
    results = {0: fake_backwork_results(0), 1: fake_backwork_results(1, num_classes=20)}
    with pytest.raises(UserError, match=r"results_1.pkl has 20 classes, the model 10; choose another --out"):
        results_format.check_results_fit(results, tmp_path, (12, 12, 1), 10, fix="choose another --out")
    results[1] = fake_backwork_results(1, shape=(3, 8, 8))
    with pytest.raises(UserError, match=r"results_1.pkl holds images of shape \(8, 8, 1\), the data \(12, 12, 1\)"):
        results_format.check_results_fit(results, tmp_path, (12, 12, 1), 10)
