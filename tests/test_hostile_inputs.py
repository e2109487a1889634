"""The scripts given what a hostile or careless user gives them: one line, exit 2, nothing written.

The readers' own cases live beside them (test_results_format.py, test_datasets.py, test_common.py);
here are the commands: a path or config no script can read, a folder or file of another model, a
model whose outputs overflow, and `--model MODEL CONFIG` as every script takes it.
"""
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import cnn
import cnn_backwork
import common
import guided_backprop
import preprocess_data
import proc_mnist
import results_format
from common import UserError
from conftest import fake_backwork_results

PROJECT = common.PROJECT_DIR


def fake_model(folder):
    """A file that passes cnn.check_model_file and is never loaded: every case here is refused first."""
    path = folder / "run" / "model.keras"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", "{}")
    return path


def listing(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


# Each refused before TensorFlow loads: a second or so per command.
COMMANDS = {
    "config_unreadable": (["proc_mnist.py", "/proc/self/pagemap"], "/proc/self/pagemap"),
    "config_a_pipe": (["proc_mnist.py", "{tmp}/pipe.toml"], "pipe.toml is not a regular file"),
    "config_huge_int": (["proc_mnist.py", "--set", "train.seed=" + "7" * 4301], "more than 4300 digits"),
    "config_nested_3000_deep": (["guided_backprop.py", "--model", "{model}", "{tmp}/deep.toml"],
                                "nests arrays or tables deeper than Python can read"),
    "images_name_too_long": (["guided_backprop.py", "--model", "{model}", "--images", "{tmp}/" + "r" * 300 + ".pkl"],
                             "cannot be reached (File name too long)"),
    "model_name_too_long": (["cnn_backwork.py", "--model", "{tmp}/" + "m" * 300 + ".keras"],
                            "cannot be reached (File name too long)"),
    "results_folder_a_file": (["preprocess_data.py", "--model", "{model}", "--results", "{model}"],
                              "--results wants the folder holding results_<label>.pkl, not the file"),
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_command_given_what_it_cannot_read_says_so_in_one_line(tmp_path, name):
    import os

    arguments, phrase = COMMANDS[name]
    model = fake_model(tmp_path)
    os.mkfifo(tmp_path / "pipe.toml")
    (tmp_path / "deep.toml").write_text("[model]\nnum_fc_units = " + "[" * 3000 + "]" * 3000 + "\n")
    results_format.save_results(tmp_path / "results_3.pkl", fake_backwork_results(3))
    before = listing(tmp_path)
    arguments = [argument.format(tmp=tmp_path, model=model) for argument in arguments]
    result = subprocess.run([sys.executable, str(PROJECT / arguments[0]), *arguments[1:]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert len(lines[0]) < 600 and phrase in lines[0], lines[0]
    assert listing(tmp_path) == before


def test_a_data_or_output_name_too_long_stops_training_in_one_line(tiny_npz, tmp_path):
    with pytest.raises(UserError, match=r"data file .*\.\.\. \(\d+ characters\) cannot be reached \(File name too "
                                        r"long\)"):
        proc_mnist.main(["--data", str(tmp_path / ("d" * 300)), "--out", str(tmp_path / "out"), "--steps", "1"])
    with pytest.raises(UserError, match=r"output folder .*\.\.\. \(\d+ characters\) cannot be reached \(File name "
                                        r"too long\); choose another with --out"):
        proc_mnist.main(["--data", str(tiny_npz), "--out", str(tmp_path / ("o" * 300)), "--steps", "1",
                         "--set", "data.validation_size=100"])
    assert listing(tmp_path) == []


# ------------------------------------------------------------------ --model MODEL CONFIG (cnn_backwork.py)


def test_a_config_after_the_model_is_the_config():
    args = cnn_backwork.parse_arguments(["--model", "runs/default/model.keras", "configs/default.toml"])
    assert args.model == ["runs/default/model.keras"] and args.config == "configs/default.toml"
    args = cnn_backwork.parse_arguments(["--evaluate", "folder", "--model", "a/model.keras", "b/model.keras"])
    assert args.model == ["a/model.keras", "b/model.keras"] and args.config is None
    args = cnn_backwork.parse_arguments(["configs/small.toml", "--model", "a/model.keras"])
    assert args.model == ["a/model.keras"] and args.config == "configs/small.toml"
    with pytest.raises(UserError, match="give one config, not configs/small.toml, configs/default.toml"):
        cnn_backwork.parse_arguments(["configs/small.toml", "--model", "a/model.keras", "configs/default.toml"])
    with pytest.raises(UserError, match="--model configs/default.toml names a config, not a model"):
        cnn_backwork.parse_arguments(["--model", "configs/default.toml"])


def test_backwork_with_a_config_after_the_model_reads_that_config(tmp_path):
    """The command of the issue: the config is read (and refused here for its value), the model is not."""
    config = tmp_path / "my.toml"
    config.write_text("[backwork]\nsave_freq = 0\n")
    with pytest.raises(UserError, match=rf"{config}: backwork.save_freq = 0 must be between 1"):
        cnn_backwork.main(["--model", str(fake_model(tmp_path)), str(config)])


# ------------------------------------------------------------------ results of another model, optional fields


def test_evaluate_reads_a_folder_whose_files_have_no_options(trained_tiny, tmp_path):
    for label in (1, 4):
        result = fake_backwork_results(label)
        del result["options"], result["model"]  # Both optional.
        results_format.save_results(tmp_path / f"results_{label}.pkl", result)
    numbers = cnn_backwork.evaluate(tmp_path, [trained_tiny[0]])
    assert set(numbers[str(trained_tiny[0])]) >= {"mean_p", "at_cap", "made_from_it"}


def test_evaluate_refuses_a_folder_mixing_two_models_results(trained_tiny, tmp_path):
    results_format.save_results(tmp_path / "results_1.pkl", fake_backwork_results(1))
    results_format.save_results(tmp_path / "results_4.pkl", fake_backwork_results(4, shape=(3, 8, 8)))
    with pytest.raises(UserError, match=r"results_4.pkl holds images of shape \(8, 8, 1\), results_1.pkl's "
                                        r"\(12, 12, 1\); keep one model's results in a folder"):
        cnn_backwork.evaluate(tmp_path, [trained_tiny[0]])


@pytest.mark.parametrize("other,message", [
    ({"num_classes": 20}, "results_15.pkl has 20 classes, the model 10; choose another --out for this model"),
    ({"shape": (3, 8, 8)}, r"results_15.pkl holds images of shape \(8, 8, 1\), the model's \(12, 12, 1\)"),
])
def test_backwork_into_a_folder_of_another_model_is_refused_before_any_work(trained_tiny, tiny_npz, tmp_path,
                                                                            other, message):
    out = tmp_path / "backwork"
    out.mkdir()
    results_format.save_results(out / "results_15.pkl", fake_backwork_results(15, **{"num_classes": 20, **other}))
    before = listing(out)
    with pytest.raises(UserError, match=message):
        cnn_backwork.main(["--model", str(trained_tiny[0]), "--data", str(tiny_npz), "--labels", "0",
                           "--out", str(out), "--set", "backwork.max_num_steps=5"])
    assert listing(out) == before  # No results_0.pkl, no figure, no logs.


def test_a_study_refuses_options_of_another_type_in_one_line(tmp_path):
    results = {3: {**fake_backwork_results(3), "options": {"learning_rate": [0.01, 0.01]}}}
    backwork = {"learning_rate": 0.01, "loss": "margin", "layer_cost_coeffs": []}
    with pytest.raises(UserError, match=r"results_3.pkl records backwork.learning_rate = a list of 2 items, which is "
                                        r"no float; backwork it again"):
        preprocess_data.check_one_backwork_setting(results, tmp_path, backwork)
    results[3]["options"] = {"layer_cost_coeffs": [1.0, 2.0]}  # Of another length: another setting, one line.
    with pytest.raises(UserError, match=r"backwork.layer_cost_coeffs = \[1.0, 2.0\] \(the study's: \[\]\)"):
        preprocess_data.check_one_backwork_setting(results, tmp_path, backwork)


# ------------------------------------------------------------------ a model whose outputs overflow


def test_saliency_of_a_model_whose_outputs_overflow_is_refused_before_the_work(trained_tiny, tiny_npz, tmp_path,
                                                                               monkeypatch):
    """Finite weights (a diverged run saved at its last finite step) whose logits overflow float32."""
    model = cnn.load_trained_model(trained_tiny[0])
    kernel, bias = model.get_layer("logits").get_weights()
    model.get_layer("logits").set_weights([kernel * np.float32(1e38), bias])
    path = tmp_path / "diverged" / "model.keras"
    cnn.save_model(model, path)
    computed = []
    monkeypatch.setattr(guided_backprop, "compute_maps", lambda *arguments: computed.append(1))
    with pytest.raises(UserError, match="gives NaN or infinite probabilities for these images"):
        guided_backprop.main(["--model", str(path), "--data", str(tiny_npz), "--num", "2",
                              "--out", str(tmp_path / "saliency")])
    assert computed == [] and not (tmp_path / "saliency").exists()


def test_saliency_of_another_model_s_class_is_refused_in_one_line(trained_tiny, tmp_path):
    results_format.save_results(tmp_path / "results_15.pkl", fake_backwork_results(15, num_classes=20))
    with pytest.raises(UserError, match=r"results_15.pkl holds images made for class 15, which model .* \(classes "
                                        r"0-9\) does not have"):
        guided_backprop.main(["--model", str(trained_tiny[0]), "--images", str(tmp_path / "results_15.pkl"),
                              "--out", str(tmp_path / "saliency")])
    assert not (tmp_path / "saliency").exists()
