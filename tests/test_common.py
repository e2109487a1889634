import hashlib

import numpy as np
import pytest

import common
import configurator
import datasets
from common import UserError


def write(tmp_path, text, name="config.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_config_lists_only_differences(tmp_path):
    config = configurator.load_config(write(tmp_path, "[train]\nlearning_rate = 1\n"), ["train.batch_size=7"])
    assert config["train"]["learning_rate"] == 1.0 and isinstance(config["train"]["learning_rate"], float)
    assert config["train"]["batch_size"] == 7
    assert config["model"] == configurator.default_config()["model"]


@pytest.mark.parametrize("text,message", [
    ("[train]\nlearning_rat = 0.1\n", "unknown key train.learning_rat"),
    ("[trian]\n", r"unknown section \[trian\]"),
    ("[train]\nbatch_size = 2.5\n", "train.batch_size must be a int"),
    ("[model]\nbatch_norm = 1\n", "model.batch_norm must be a bool"),
    ("[train\n", "not valid TOML"),
])
def test_bad_configs_are_one_clear_error(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        configurator.load_config(write(tmp_path, text))


def test_overrides_parse_toml_values_and_bare_words():
    config = configurator.load_config(None, ["model.fc_act_fn=tanh", "model.num_fc_units=[8, 4]", "model.dropout=0"])
    assert config["model"]["fc_act_fn"] == "tanh"
    assert config["model"]["num_fc_units"] == [8, 4]
    with pytest.raises(UserError, match="section.key=value"):
        configurator.load_config(None, ["learning_rate=3"])


def test_dumped_config_reads_back_identically(tmp_path):
    config = configurator.load_config(None, ["model.pool_layers=[{}, {filter = [1, 3, 3, 1], strides = [1, 2, 2, 1], padding = 'VALID'}]"])
    path = write(tmp_path, configurator.dump_toml(config), name="resolved.toml")
    assert configurator.load_config(path) == config


def test_load_dataset_scales_adds_channel_and_records_the_file(tiny_npz, monkeypatch):
    for name in ("MNIST_PATH", "DATA_PATH"):
        monkeypatch.delenv(name, raising=False)
    data = datasets.load_dataset(tiny_npz)
    assert data["x_train"].dtype == np.float32 and data["x_train"].shape == (500, 12, 12, 1)
    assert 0.0 <= data["x_train"].min() and data["x_train"].max() == 1.0
    assert data["provenance"] == {"dataset": None, "file": str(tiny_npz),
                                  "sha256": hashlib.sha256(tiny_npz.read_bytes()).hexdigest(), "download": False}
    assert datasets.count_classes(data) == 10
    for name in ("MNIST_PATH", "DATA_PATH"):  # DATA_PATH is the general name, MNIST_PATH the old one.
        monkeypatch.setenv(name, str(tiny_npz))
        np.testing.assert_array_equal(datasets.load_dataset()["y_test"], data["y_test"])
        monkeypatch.delenv(name)


def test_mnist_path_is_not_used_for_another_dataset(tiny_npz, monkeypatch):
    import keras

    monkeypatch.delenv("DATA_PATH", raising=False)
    monkeypatch.setenv("MNIST_PATH", str(tiny_npz))
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", lambda: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(UserError, match="could not download cifar10.*DATA_PATH"):
        datasets.load_dataset(dataset="cifar10")


def test_colour_images_with_column_labels_and_many_classes_load(colour_npz):
    data = datasets.load_dataset(colour_npz)
    assert data["x_train"].shape[1:] == (10, 14, 3) and data["y_train"].ndim == 1
    assert data["y_train"].dtype == np.int64 and datasets.count_classes(data) == 3
    x = np.zeros((4, 5, 5, 3), np.uint8)
    np.savez(colour_npz.parent / "many.npz", x_train=x, y_train=np.array([[0], [1], [2], [99]]), x_test=x,
             y_test=np.array([[5], [6], [7], [8]]))
    assert datasets.count_classes(datasets.load_dataset(colour_npz.parent / "many.npz")) == 100


def test_load_dataset_rejects_bad_files(tmp_path):
    x = np.zeros((4, 5, 5), np.uint8)
    np.savez(tmp_path / "labels.npz", x_train=x, y_train=np.array([0, 1, 2, -1]), x_test=x, y_test=np.zeros(4, int))
    with pytest.raises(UserError, match="negative labels"):
        datasets.load_dataset(tmp_path / "labels.npz")
    np.savez(tmp_path / "keys.npz", x_train=x)
    with pytest.raises(UserError, match="lacks x_train or y_train|lacks x_test"):
        datasets.load_dataset(tmp_path / "keys.npz")
    with pytest.raises(UserError, match="--data PATH or DATA_PATH"):
        datasets.load_dataset(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not an .npz archive"):
        datasets.load_dataset(tmp_path / "junk.npz")
    with pytest.raises(UserError, match="data.dataset 'svhn' is unknown"):
        datasets.load_dataset(dataset="svhn")
    with pytest.raises(UserError, match="data.dataset = 'svhn' must be one of mnist, fashion_mnist, cifar10"):
        configurator.load_config(None, ["data.dataset=svhn"])


def test_download_failure_says_how_to_give_a_file(monkeypatch):
    import keras

    def offline():
        raise OSError("no network")

    for name in ("MNIST_PATH", "DATA_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)
    with pytest.raises(UserError, match="could not download mnist.*--data PATH"):
        datasets.load_dataset()


def test_a_download_records_the_dataset_and_the_cached_file(monkeypatch, tmp_path):
    import keras

    for name in ("MNIST_PATH", "DATA_PATH"):
        monkeypatch.delenv(name, raising=False)
    x = np.zeros((4, 5, 5), np.uint8)
    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", lambda: ((x, np.arange(4)), (x, np.arange(4))))
    assert datasets.load_dataset(dataset="fashion_mnist")["provenance"] == {
        "dataset": "fashion_mnist", "file": None, "sha256": None, "download": True}  # Four files: the name alone.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "mnist.npz").write_bytes(b"cached")
    monkeypatch.setattr(keras.datasets.mnist, "load_data", lambda: ((x, np.arange(4)), (x, np.arange(4))))
    provenance = datasets.load_dataset()["provenance"]
    assert provenance["dataset"] == "mnist" and provenance["sha256"] == hashlib.sha256(b"cached").hexdigest()
    assert configurator.load_config(None, ["data.dataset=cifar10"])["data"]["dataset"] == "cifar10"


def test_provenance_comment_keeps_the_config_loading_back_unchanged(tmp_path):
    config = configurator.default_config()
    comment = datasets.provenance_comment({"dataset": None, "file": "/x/y.npz", "sha256": "ab" * 32})
    assert comment.startswith("# data: /x/y.npz, sha256 abab")
    path = write(tmp_path, comment + configurator.dump_toml(config), name="resolved.toml")
    assert configurator.load_config(path) == config


def test_split_validation_holds_out_the_last_examples(tiny_data):
    assert len(tiny_data["x_train"]) == 400 and len(tiny_data["x_val"]) == 100
    with pytest.raises(UserError, match="validation_size"):
        datasets.split_validation(tiny_data, 10_000)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "metrics.json"
    common.write_json(path, {"old": 1})

    def broken(temporary):
        open(temporary, "w").write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        common.atomic_write(path, broken)
    assert path.read_text().strip().startswith("{") and '"old": 1' in path.read_text()
    assert [entry.name for entry in tmp_path.iterdir()] == ["metrics.json"]


def test_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    common.write_json(path, {"old": 1})

    def full(temporary):
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="cannot write .*metrics.json \\(No space left on device\\); free some"):
        common.atomic_write(path, full)
    assert '"old": 1' in path.read_text() and [entry.name for entry in tmp_path.iterdir()] == ["metrics.json"]


SIGTERM_DURING_WRITE = """
import os, signal, sys
from pathlib import Path
import common

def main():
    out = common.ensure_writable_dir(Path(sys.argv[1]) / "made" / "here")
    common.write_json(out.parent.parent / "kept.json", {"kept": 1})

    def killed_while_writing(temporary):
        Path(temporary).write_text("half a figure")
        os.kill(os.getpid(), signal.SIGTERM)

    common.atomic_write(out.parent.parent / "figure.png", killed_while_writing)

common.run_cli(main)
"""


def test_sigterm_while_writing_exits_130_and_leaves_no_temporary_file(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", SIGTERM_DURING_WRITE, str(tmp_path)], capture_output=True,
                            text=True, timeout=60, cwd=common.PROJECT_DIR)
    assert result.returncode == 130 and result.stderr.strip() == "interrupted"
    # The finished file stays; the half-written one and the folders left empty are gone.
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["kept.json"]


def test_values_out_of_range_are_one_line_at_load_time():
    for override, message in [("train.batch_size=0", "train.batch_size = 0 must be between 1"),
                              ("backwork.save_freq=-3", "backwork.save_freq = -3 must be between 1"),
                              ("train.learning_rate=nan", "must be a finite number"),
                              ("augment.num_blank=-1", "augment.num_blank = -1 must be between 0"),
                              ("model.conv_layers=[3]", "model.conv_layers = [3] must be a list of at most"),
                              ("model.num_fc_units=[10000000]", "must be one or more sizes between 1 and 65536")]:
        with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
            configurator.load_config(None, [override])


def test_damaged_data_files_are_one_line(tmp_path):
    import zipfile

    x = np.zeros((4, 5, 5), np.uint8)
    np.savez(tmp_path / "good.npz", x_train=x, y_train=np.zeros(4, int), x_test=x, y_test=np.zeros(4, int))
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated.npz is not an .npz archive"):
        datasets.load_dataset(tmp_path / "truncated.npz")
    with zipfile.ZipFile(tmp_path / "claims.npz", "w") as archive:  # A header claiming 10^9 images.
        with archive.open("x_train.npy", "w") as member:
            header = {"descr": "|u1", "fortran_order": False, "shape": (10**9, 28, 28)}
            np.lib.format.write_array_header_1_0(member, header)
            member.write(b"\0" * 100)
    with pytest.raises(UserError, match=r"x_train.npy claims shape \(1000000000, 28, 28\)"):
        datasets.load_dataset(tmp_path / "claims.npz")
    (tmp_path / "folder.npz").mkdir()
    with pytest.raises(UserError, match="folder.npz is a folder"):
        datasets.load_dataset(tmp_path / "folder.npz")


def test_tensorflow_start_up_lines_are_silenced():
    import subprocess
    import sys

    script = "import common, keras, tensorflow as tf; print(int(tf.constant(2) + 1))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=common.PROJECT_DIR)
    assert result.returncode == 0 and result.stdout.strip() == "3"
    assert result.stderr == "", result.stderr


def test_a_local_file_is_recognised_by_its_contents_its_name_or_mnist_path(tiny_npz, tmp_path, monkeypatch):
    for name in ("MNIST_PATH", "DATA_PATH"):
        monkeypatch.delenv(name, raising=False)
    named = tmp_path / "fashion_mnist.npz"
    named.write_bytes(tiny_npz.read_bytes())
    assert datasets.load_dataset(named)["provenance"]["dataset"] == "fashion_mnist"
    assert datasets.data_label(named) == "fashion_mnist" and datasets.data_label(tiny_npz) == "tiny_mnist"
    sha256 = datasets.file_sha256(tiny_npz)
    monkeypatch.setitem(datasets.KNOWN_FILES, sha256, "cifar10")
    assert datasets.load_dataset(tiny_npz)["provenance"]["dataset"] == "cifar10"
    monkeypatch.delitem(datasets.KNOWN_FILES, sha256)
    monkeypatch.setenv("MNIST_PATH", str(tiny_npz))  # $MNIST_PATH names MNIST.
    assert datasets.load_dataset()["provenance"]["dataset"] == "mnist" and datasets.data_label() == "mnist"
    # A config's data.file is read where --data is not given, before $DATA_PATH.
    monkeypatch.setenv("DATA_PATH", str(tmp_path / "missing.npz"))
    assert datasets.load_dataset(None, "mnist", str(named))["provenance"]["file"] == str(named)


def test_same_data_compares_contents_then_dataset_names():
    mnist_file = {"dataset": "mnist", "file": "a.npz", "sha256": "1" * 64, "download": False}
    download = {"dataset": "mnist", "file": None, "sha256": None, "download": True}
    unknown = {"dataset": None, "file": "b.npz", "sha256": "2" * 64, "download": False}
    assert datasets.same_data(mnist_file, download) and datasets.same_data(unknown, dict(unknown))
    assert not datasets.same_data(unknown, download) and not datasets.same_data(unknown, {**unknown, "sha256": "3" * 64})
    assert not datasets.same_data(download, {**download, "dataset": "fashion_mnist"})
    old_record = {"dataset": None, "file": "/data/fashion_mnist.npz", "sha256": "4" * 64}  # Before recognition.
    assert datasets.provenance_dataset(old_record) == "fashion_mnist" and datasets.provenance_dataset([1]) is None
    assert datasets.describe_data(download) == "keras.datasets.mnist"
    assert datasets.describe_data(unknown) == "b.npz (sha256 222222222222...)"


def test_class_names_for_datasets_keras_names_and_indices_otherwise():
    assert datasets.class_names("fashion_mnist", 10)[0] == "T-shirt/top" and datasets.class_names("cifar10", 10)[9] == "truck"
    assert datasets.class_names("mnist", 10) == [str(digit) for digit in range(10)]
    assert datasets.class_names("cifar100", 100)[42] == "42" and datasets.class_names(None, 3) == ["0", "1", "2"]
    assert datasets.class_names("fashion_mnist", 11)[-1] == "none"  # The extra "none" output.
    assert datasets.class_names("fashion_mnist", 3) == ["0", "1", "2"]  # Another class count: not these names.


def test_a_saved_config_records_the_data_used_and_still_loads(tmp_path):
    config = configurator.default_config()
    provenance = {"dataset": None, "file": "/x/mine.npz", "sha256": "ab" * 32, "download": False}
    saved = configurator.with_data_record(config, provenance)
    assert saved["data"] == {**config["data"], "dataset": "", "file": "/x/mine.npz", "sha256": "ab" * 32}
    path = write(tmp_path, datasets.provenance_comment(provenance) + configurator.dump_toml(saved))
    assert configurator.load_config(path) == saved
    download = configurator.with_data_record(config, {"dataset": "cifar10", "file": "/c/x", "sha256": "cd" * 32,
                                                      "download": True})
    assert download["data"]["dataset"] == "cifar10" and download["data"]["file"] == ""
    with pytest.raises(UserError, match="data.sha256 = 'xyz' must be"):
        configurator.load_config(None, ["data.sha256='xyz'"])


# ------------------------------------------------------------ every path a user gives: one guard, one line


def one_line(refusal, limit=400):
    message = str(refusal.value)
    assert "\n" not in message and len(message) < limit, message
    return message


def test_a_user_path_is_checked_before_it_is_read(tmp_path):
    import os

    fix = "give another"
    cases = [(tmp_path / "missing.toml", "config .*missing.toml does not exist; give another"),
             (tmp_path, "config .* is a folder; give another"),
             ("x" * 300, r"config x{160}\.\.\. \(300 characters\) cannot be reached \(File name too long\)"),
             (str(tmp_path / "a\0b"), "holds a NUL character"),
             ("/dev/zero", "config /dev/zero is not a regular file"),  # Read, it would never end.
             (tmp_path / "missing" / "x" / "y.toml", "does not exist")]
    os.mkfifo(tmp_path / "pipe.toml")  # Opened, it would wait for a writer for ever.
    cases.append((tmp_path / "pipe.toml", "pipe.toml is not a regular file"))
    for path, message in cases:
        with pytest.raises(UserError, match=message) as refusal:
            common.checked_input(path, "config", fix)
        one_line(refusal)
    (tmp_path / "large").write_bytes(b"x" * 101)
    with pytest.raises(UserError, match="large holds more than 100 bytes, more than a config holds"):
        common.read_input(tmp_path / "large", "config", fix, max_bytes=100)
    assert common.read_input(tmp_path / "large", "config", fix, max_bytes=101) == b"x" * 101


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/pagemap"), reason="no /proc/self/pagemap here")
def test_a_regular_file_that_cannot_be_read_is_one_line():
    """/proc/self/pagemap says it is a regular file of 0 bytes: read whole it fails, read in chunks it holds
    8 bytes for each page of the address space (terabytes); either way one line."""
    with pytest.raises(UserError, match=r"(cannot read config /proc/self/pagemap \(Invalid argument\)|config "
                                        r"/proc/self/pagemap holds more than 1048576 bytes)") as refusal:
        configurator.load_config("/proc/self/pagemap")
    one_line(refusal)


@pytest.mark.parametrize("text,message", [
    ("[train]\nseed = " + "1" * 4301 + "\n", "holds a number of more than 4300 digits"),
    ("[model]\nnum_fc_units = " + "[" * 3000 + "]" * 3000 + "\n", "nests arrays or tables deeper than Python"),
    ("[model]\nnum_fc_units = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n", "nests arrays or tables deeper"),
    ("[data]\nfile = \"" + "x" * (2 << 20) + "\"\n", "holds more than 1048576 bytes, more than a config holds"),
    ("[train]\nseed = [[[[" + "1, " * 1000 + "]]]]\n", "must be a int like the default 0, not a list of 1 items"),
    ("[train]\nschedule = \"" + "x" * 5000 + "\"\n", r"train.schedule 'xxxx.*\.\.\. \(5000 long\) is unknown"),
])
def test_configs_python_cannot_read_are_one_line(tmp_path, text, message):
    with pytest.raises(UserError, match=message) as refusal:
        configurator.load_config(write(tmp_path, text))
    one_line(refusal)


@pytest.mark.parametrize("override,message", [
    ("train.seed=" + "9" * 4301, "--set 'train.seed=99.*holds a number of more than 4300 digits"),
    ("model.num_fc_units=" + "[" * 3000 + "]" * 3000, "nests arrays or tables deeper than Python can read"),
    ("x" * 100_000, r"--set 'xxx.*\.\.\. \(100000 long\) must look like section.key=value"),
])
def test_overrides_python_cannot_read_are_one_line(override, message):
    with pytest.raises(UserError, match=message) as refusal:
        configurator.load_config(None, [override])
    one_line(refusal)


@pytest.mark.parametrize("name", ["x" * 300, "x/" * 3000, "x" * 100_000])
def test_a_data_file_name_too_long_is_one_short_line(tmp_path, name):
    config = configurator.load_config(None, [f"data.file={tmp_path / name}"])
    with pytest.raises(UserError, match=r"data file .*\.\.\. \(\d+ characters\) (cannot be reached \(File name too "
                                        r"long\)|does not exist); give a local copy") as refusal:
        datasets.load_dataset(file=config["data"]["file"])
    one_line(refusal, limit=600)
    assert datasets.data_label(file=config["data"]["file"]) == name.rstrip("/").split("/")[-1]
