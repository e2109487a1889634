import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import common
import proc_mnist
from conftest import tiny_options

SILENT = {"progress": lambda line: None}


def test_training_learns_the_tiny_task(trained_tiny):
    _, metrics = trained_tiny
    assert metrics["test_accuracy"] > 0.9
    assert metrics["history"][-1]["loss"] < metrics["history"][0]["loss"]
    assert metrics["steps"] == 150 and metrics["examples_per_second"] > 0


def test_same_seed_same_weights_other_seed_other_weights(tiny_data):
    def weights(seed):
        options = tiny_options(num_steps=20)
        options["train"]["seed"] = seed
        model, _ = proc_mnist.train(tiny_data, options, **SILENT)
        return np.concatenate([w.ravel() for w in model.get_weights()])

    first = weights(0)
    np.testing.assert_array_equal(first, weights(0))
    assert not np.allclose(first, weights(1))


def test_batches_cover_each_epoch_and_resume_in_order():
    everything = proc_mnist.batch_indices(10, 3, seed=5, first_step=0, num_steps=9)
    for epoch in range(3):  # 3 full batches per epoch; the remainder waits for the next epoch.
        seen = everything[3 * epoch:3 * epoch + 3].ravel()
        assert len(set(seen)) == 9 and set(seen) <= set(range(10))
    np.testing.assert_array_equal(proc_mnist.batch_indices(10, 3, 5, first_step=4, num_steps=5), everything[4:])


def test_soft_labels_train_towards_their_targets(tiny_data):
    uniform = np.full((len(tiny_data["y_train"]), 10), 0.1, np.float32)
    options = tiny_options(num_steps=60)
    model, _ = proc_mnist.train({**tiny_data, "y_train": uniform}, options, **SILENT)
    probabilities = np.asarray(model(tiny_data["x_test"][:50]))
    assert probabilities.max(axis=1).mean() < 0.2


def test_resumed_training_equals_uninterrupted(tiny_data, tmp_path):
    options = tiny_options(num_steps=60)
    straight, _ = proc_mnist.train(tiny_data, options, **SILENT)
    options["train"]["num_steps"] = 30
    half, _ = proc_mnist.train(tiny_data, options, **SILENT)
    proc_mnist.save_model(half, tmp_path / "model.keras")
    reloaded = common.load_trained_model(tmp_path / "model.keras", compile=True)
    options["train"]["num_steps"] = 60
    resumed, metrics = proc_mnist.train(tiny_data, options, model=reloaded, **SILENT)
    assert metrics["steps"] == 60 and metrics["history"][0]["step"] == 50
    for expected, actual in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def write_config(tmp_path, num_steps=40):
    options = common.merge_config(common.default_config(), tiny_options(num_steps), "test")
    options["train"]["log_every"] = 20
    options["data"]["validation_size"] = 100
    path = tmp_path / "tiny.toml"
    path.write_text(common.dump_toml(options))
    return path


def test_command_line_run_writes_every_output(tiny_npz, tmp_path, capsys):
    out = tmp_path / "run"
    assert proc_mnist.main([str(write_config(tmp_path)), "--data", str(tiny_npz), "--out", str(out)]) == 0
    assert {"model.keras", "config.toml", "metrics.json", "training_curve.png"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 40 and 0 <= metrics["test_accuracy"] <= 1
    assert common.load_config(out / "config.toml")["model"]["conv_layers"][0]["filter"] == [3, 3, 1, 4]
    assert (out / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "step 20/40" in capsys.readouterr().out


def test_interrupt_saves_and_resume_finishes(tiny_npz, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_make_train_function = proc_mnist.make_train_function

    def interrupted_during_first_block(*args):
        run_steps = real_make_train_function(*args)

        def run_then_interrupt(indices):
            run_steps(indices)  # Like Ctrl-C during the call: TensorFlow finishes the block first.
            raise KeyboardInterrupt

        return run_then_interrupt

    monkeypatch.setattr(proc_mnist, "make_train_function", interrupted_during_first_block)
    config = str(write_config(tmp_path))
    assert proc_mnist.main([config, "--data", str(tiny_npz), "--out", str(out)]) == 130
    interrupted = json.loads((out / "metrics.json").read_text())
    assert interrupted["interrupted"] is True and interrupted["steps"] == 20
    monkeypatch.setattr(proc_mnist, "make_train_function", real_make_train_function)
    assert proc_mnist.main(["--data", str(tiny_npz), "--out", str(out), "--resume"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 40 and [record["step"] for record in metrics["history"]] == [40]


@pytest.mark.parametrize("arguments,message", [
    (["missing.toml"], "config missing.toml does not exist"),
    (["--set", "train.batch_size=big"], "train.batch_size must be a int"),
    (["--resume", "--out", "nowhere"], "nothing to resume in nowhere"),
])
def test_user_mistakes_end_in_one_line(arguments, message, tmp_path):
    result = subprocess.run([sys.executable, str(Path(proc_mnist.__file__)), *arguments], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {result.stderr.strip()[7:]}"]
    assert message in result.stderr and "Traceback" not in result.stderr


def test_model_that_does_not_fit_the_data_is_refused(tiny_npz, trained_tiny):
    path, _ = trained_tiny
    with pytest.raises(common.UserError, match=r"takes images of shape \(12, 12, 1\)"):
        common.load_trained_model(path, images=np.zeros((1, 28, 28, 1)))
    with pytest.raises(common.UserError, match="has 10 classes"):
        common.load_trained_model(path, num_classes=11)
