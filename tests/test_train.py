import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import cnn
import common
import configurator
import proc_mnist
import trainer
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
        model, _ = trainer.train(tiny_data, options, **SILENT)
        return np.concatenate([w.ravel() for w in model.get_weights()])

    first = weights(0)
    np.testing.assert_array_equal(first, weights(0))
    assert not np.allclose(first, weights(1))


def test_batches_cover_each_epoch_and_resume_in_order():
    everything = trainer.batch_indices(10, 3, seed=5, first_step=0, num_steps=9)
    for epoch in range(3):  # 3 full batches per epoch; the remainder waits for the next epoch.
        seen = everything[3 * epoch:3 * epoch + 3].ravel()
        assert len(set(seen)) == 9 and set(seen) <= set(range(10))
    np.testing.assert_array_equal(trainer.batch_indices(10, 3, 5, first_step=4, num_steps=5), everything[4:])


def test_soft_labels_train_towards_their_targets(tiny_data):
    uniform = np.full((len(tiny_data["y_train"]), 10), 0.1, np.float32)
    options = tiny_options(num_steps=60)
    model, _ = trainer.train({**tiny_data, "y_train": uniform}, options, **SILENT)
    probabilities = np.asarray(model(tiny_data["x_test"][:50]))
    assert probabilities.max(axis=1).mean() < 0.2


def test_resumed_training_equals_uninterrupted(tiny_data, tmp_path):
    options = tiny_options(num_steps=60)
    straight, _ = trainer.train(tiny_data, options, **SILENT)
    options["train"]["num_steps"] = 30
    half, _ = trainer.train(tiny_data, options, **SILENT)
    cnn.save_model(half, tmp_path / "model.keras")
    reloaded = cnn.load_trained_model(tmp_path / "model.keras", compile=True)
    options["train"]["num_steps"] = 60
    resumed, metrics = trainer.train(tiny_data, options, model=reloaded, **SILENT)
    assert metrics["steps"] == 60 and metrics["history"][0]["step"] == 50
    for expected, actual in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def write_config(tmp_path, num_steps=40):
    options = configurator.merge_config(configurator.default_config(), tiny_options(num_steps), "test")
    options["train"]["log_every"] = 20
    options["data"]["validation_size"] = 100
    path = tmp_path / "tiny.toml"
    path.write_text(configurator.dump_toml(options))
    return path


def test_command_line_run_writes_every_output(tiny_npz, tmp_path, capsys):
    out = tmp_path / "run"
    assert proc_mnist.main([str(write_config(tmp_path)), "--data", str(tiny_npz), "--out", str(out)]) == 0
    assert {"model.keras", "config.toml", "metrics.json", "training_curve.png"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 40 and 0 <= metrics["test_accuracy"] <= 1
    assert configurator.load_config(out / "config.toml")["model"]["conv_layers"][0]["filter"] == [3, 3, 1, 4]
    assert (out / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "step 20/40" in capsys.readouterr().out


def interrupt_at_call(monkeypatch, call_number, real=trainer.make_train_function):
    """Make the call_number-th compiled call raise KeyboardInterrupt after it ran (as Ctrl-C does)."""
    calls = []

    def make(*args, **kwargs):
        run_steps = real(*args, **kwargs)

        def run_then_maybe_interrupt(indices):
            result = run_steps(indices)
            calls.append(len(indices))
            if len(calls) == call_number:
                raise KeyboardInterrupt
            return result

        return run_then_maybe_interrupt

    monkeypatch.setattr(trainer, "make_train_function", make)
    return calls


def test_interrupt_is_honoured_after_one_short_call_and_resume_finishes(tiny_npz, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(trainer, "TARGET_CALL_SECONDS", 1e-9)  # Every call one step: the shortest.
    calls = interrupt_at_call(monkeypatch, 3)
    config = str(write_config(tmp_path))
    assert proc_mnist.main([config, "--data", str(tiny_npz), "--out", str(out)]) == 130
    assert calls == [1, 1, 1]  # Not a whole log_every block (20 steps): stopped right after the call.
    interrupted = json.loads((out / "metrics.json").read_text())
    assert interrupted["interrupted"] is True and interrupted["steps"] == 3
    assert interrupted["stop_reason"] == "interrupted" and interrupted["diverged"] is False
    model = cnn.load_trained_model(out / "model.keras", compile=True)
    assert int(model.optimizer.iterations.numpy()) == 3
    monkeypatch.undo()
    assert proc_mnist.main(["--data", str(tiny_npz), "--out", str(out), "--resume"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 40 and [record["step"] for record in metrics["history"]] == [3, 20, 40]


@pytest.mark.parametrize("arguments,message", [
    (["missing.toml"], "config missing.toml does not exist"),
    (["--set", "train.batch_size=big"], "train.batch_size must be a int"),
    (["--resume", "--out", "nowhere"], "nothing to resume in nowhere"),
    (["--steps", "-5"], "--steps -5 must be at least 1"),
    (["--steps", "0"], "--steps 0 must be at least 1"),
    (["--set", "train.schedule=linear"], "train.schedule 'linear' is unknown"),
])
def test_user_mistakes_end_in_one_line(arguments, message, tmp_path):
    result = subprocess.run([sys.executable, str(Path(proc_mnist.__file__)), *arguments], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {result.stderr.strip()[7:]}"]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # Nothing trained or written.


def test_model_that_does_not_fit_the_data_is_refused(tiny_npz, trained_tiny):
    path, _ = trained_tiny
    with pytest.raises(common.UserError, match=r"takes images of shape \(12, 12, 1\)"):
        cnn.load_trained_model(path, images=np.zeros((1, 28, 28, 1)))
    with pytest.raises(common.UserError, match="has 10 classes"):
        cnn.load_trained_model(path, num_classes=11)


# ------------------------------------------------------------------ schedules and recipe


def schedule_section(**changes):
    section = {**configurator.default_config()["train"], "learning_rate": 0.01, "num_steps": 100, "warmup_steps": 20}
    section.update(changes)
    return section


def hand_formula(section, step):
    """The learning rate at step, written out independently of Keras."""
    peak, warmup, total, name = (section["learning_rate"], section["warmup_steps"], section["num_steps"],
                                 section["schedule"])
    low = peak / 25 if name == "one_cycle" else 0.0
    if step < warmup:
        return low + (peak - low) * step / warmup
    final = {"constant": peak, "cosine": 0.0, "one_cycle": peak / 25 / 1e4}[name]
    progress = min(step - warmup, total - warmup) / (total - warmup)
    return final + (peak - final) * 0.5 * (1 + np.cos(np.pi * progress))


@pytest.mark.parametrize("name", ["constant", "cosine", "one_cycle"])
@pytest.mark.parametrize("warmup", [0, 20])
def test_schedules_give_the_hand_formula(name, warmup):
    section = schedule_section(schedule=name, warmup_steps=warmup)
    schedule = trainer.learning_rate_schedule(section)
    for step in [0, 1, 10, 19, 20, 21, 50, 99, 100, 150]:
        expected = hand_formula(section, step)
        actual = float(schedule(step)) if callable(schedule) else schedule
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-9, err_msg=f"{name} at step {step}")
    if name != "constant":  # The formula is not trivially flat: the rate really moves.
        assert hand_formula(section, 80) < 0.5 * section["learning_rate"]
    if name == "constant" and warmup == 0:
        assert schedule == 0.01  # The original recipe is a plain float, as before.


@pytest.mark.parametrize("key,value,message", [
    ("schedule", "linear", "train.schedule 'linear' is unknown; use one of constant, cosine, one_cycle"),
    ("warmup_steps", 100, "train.warmup_steps 100 must be below train.num_steps"),
    ("warmup_steps", -1, "train.warmup_steps = -1 must be between 0 and"),
    ("label_smoothing", 1.0, r"train.label_smoothing = 1.0 must be in \[0, 1\)"),
    ("shift_pixels", -2, "train.shift_pixels = -2 must be between 0 and"),
])
def test_bad_recipe_values_are_refused_by_name(key, value, message):
    with pytest.raises(common.UserError, match=message):
        trainer.learning_rate_schedule(schedule_section(**{key: value}))


def test_recipe_keys_take_their_types_strictly():
    config = configurator.load_config(None, ["train.schedule=one_cycle", "train.label_smoothing=0", "train.warmup_steps=5"])
    assert config["train"]["schedule"] == "one_cycle" and config["train"]["label_smoothing"] == 0.0
    with pytest.raises(common.UserError, match="train.warmup_steps must be a int"):
        configurator.load_config(None, ["train.warmup_steps=0.5"])
    with pytest.raises(common.UserError, match="train.schedule must be a str"):
        configurator.load_config(None, ["train.schedule=3"])


def test_original_config_is_the_original_recipe():
    config = configurator.load_config(Path(common.PROJECT_DIR) / "configs" / "original.toml")
    section = config["train"]
    assert (section["learning_rate"], section["batch_size"], section["num_steps"]) == (1e-4, 50, 20000)
    assert trainer.learning_rate_schedule(section) == 1e-4
    assert section["label_smoothing"] == 0 and section["shift_pixels"] == 0
    assert config["model"] == configurator.default_config()["model"]


def recipe_options(num_steps):
    options = tiny_options(num_steps)
    options["train"].update(schedule="cosine", warmup_steps=10, label_smoothing=0.1, shift_pixels=1)
    return options


def test_schedule_and_shifts_survive_save_load_and_resume_equals_uninterrupted(tiny_data, tmp_path):
    straight, _ = trainer.train(tiny_data, recipe_options(60), **SILENT)
    options = recipe_options(60)
    options["train"]["num_steps"] = 30  # Stops early; the schedule still spans 60 steps (built from 60 below).
    keras.utils.set_random_seed(0)  # As train() seeds before it builds a model.
    model = proc_mnist.build_model(options["model"])
    trainer.compile_for_training(model, trainer.learning_rate_schedule(recipe_options(60)["train"]))
    half, _ = trainer.train(tiny_data, options, model=model, **SILENT)
    cnn.save_model(half, tmp_path / "model.keras")
    reloaded = cnn.load_trained_model(tmp_path / "model.keras", compile=True)
    schedule = reloaded.optimizer._learning_rate
    assert type(schedule).__name__ == "CosineDecay" and schedule.decay_steps == 50 and schedule.warmup_steps == 10
    resumed, metrics = trainer.train(tiny_data, recipe_options(60), model=reloaded, **SILENT)
    assert metrics["steps"] == 60
    for expected, actual in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    unshifted, _ = trainer.train(tiny_data, {**recipe_options(60), "train": {**recipe_options(60)["train"],
                                                                               "shift_pixels": 0}}, **SILENT)
    assert not np.allclose(unshifted.get_weights()[0], straight.get_weights()[0])  # The shifts did something.


def test_shifts_move_whole_images_by_at_most_the_given_pixels():
    images = np.zeros((3, 6, 6, 1), np.float32)
    images[:, 2, 3, 0] = 1.0
    shifted = np.asarray(trainer._shifted(images, np.array([[1, -2], [0, 0], [-2, 1]], np.int32)))
    assert shifted[0, 3, 1, 0] == 1 and shifted[1, 2, 3, 0] == 1 and shifted[2, 0, 4, 0] == 1
    assert shifted.sum() == 3


def test_flips_mirror_the_flagged_images_left_right():
    images = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4, 1)
    flipped = np.asarray(trainer._flipped(images, np.array([True, False])))
    np.testing.assert_array_equal(flipped[0], images[0, :, ::-1])
    np.testing.assert_array_equal(flipped[1], images[1])


def test_flip_mirrors_about_half_the_batch_per_step_and_leaves_the_shifts_alone():
    import tensorflow as tf

    images = np.random.default_rng(0).random((400, 6, 6, 1)).astype(np.float32)
    targets = np.eye(10, dtype=np.float32)[np.arange(400) % 10]
    optimizer = type("Steps", (), {"iterations": tf.Variable(3, dtype=tf.int64)})()
    indices = tf.range(400)

    def batch(flip, shift_pixels=1):
        return np.asarray(trainer._batch_function(images, targets, 0.0, shift_pixels, 7, optimizer, flip)(indices)[0])

    def mirrored():
        shifted, both = batch(False), batch(True)
        kept = np.all(both == shifted, axis=(1, 2, 3))
        mirror = np.all(both == shifted[:, :, ::-1], axis=(1, 2, 3)) & ~kept
        assert np.all(mirror | kept)  # Each image: as shifted without flips, or that mirrored.
        return mirror

    step_three = mirrored()
    assert 150 < step_three.sum() < 250
    np.testing.assert_array_equal(mirrored(), step_three)  # Drawn from (seed, step): the same again.
    optimizer.iterations.assign(4)
    assert not np.array_equal(mirrored(), step_three)  # Another step, other flips.


# ------------------------------------------------------------------ safety of training


def test_nan_loss_stops_at_once_and_keeps_the_last_finite_weights(tiny_data):
    bad = tiny_data["x_train"].copy()
    first_batches = trainer.batch_indices(len(bad), 20, seed=0, first_step=0, num_steps=40)
    bad[first_batches[7][3]] = np.nan  # First seen at step 7 (counting from 0).
    model, metrics = trainer.train({**tiny_data, "x_train": bad}, tiny_options(40), **SILENT)
    assert metrics["diverged"] is True and metrics["interrupted"] is False
    assert metrics["steps"] == 7 and int(model.optimizer.iterations.numpy()) == 7
    assert metrics["stop_reason"].startswith("diverged at step 8 (")
    assert trainer.weights_are_finite(model)
    reference, _ = trainer.train(tiny_data, tiny_options(7), **SILENT)
    for expected, actual in zip(reference.get_weights(), model.get_weights()):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def strict_json(path):
    def refuse(constant):
        raise ValueError(f"bare {constant} in {path}")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


def test_divergence_exits_2_with_one_line_saves_no_nan_model_and_strict_json(tiny_npz, tmp_path, capsys):
    out = tmp_path / "run"
    config = str(write_config(tmp_path))
    code = proc_mnist.main([config, "--data", str(tiny_npz), "--out", str(out), "--set", "train.learning_rate=1e30",
                            "--set", "data.validation_size=0"])
    assert code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: training diverged at step ")
    assert "lower train.learning_rate" in errors[0]
    metrics = strict_json(out / "metrics.json")
    assert metrics["diverged"] is True and metrics["steps"] >= 1
    assert all(record["val_accuracy"] is None for record in metrics["history"])  # No validation set: null.
    model = cnn.load_trained_model(out / "model.keras", compile=True)
    assert trainer.weights_are_finite(model) and int(model.optimizer.iterations.numpy()) == metrics["steps"]


def test_interrupt_during_the_final_evaluation_still_saves(tiny_npz, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_accuracy, calls = trainer.accuracy, []

    def interrupted_on_the_test_set(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # Validation at steps 20 and 40, then the test set.
            raise KeyboardInterrupt
        return real_accuracy(*args, **kwargs)

    monkeypatch.setattr(trainer, "accuracy", interrupted_on_the_test_set)
    assert proc_mnist.main([str(write_config(tmp_path)), "--data", str(tiny_npz), "--out", str(out)]) == 130
    metrics = strict_json(out / "metrics.json")
    assert metrics["steps"] == 40 and metrics["interrupted"] is True and metrics["test_accuracy"] is None
    assert cnn.load_trained_model(out / "model.keras").output_shape == (None, 10)


def test_interrupt_during_the_save_finishes_it_and_a_second_aborts_cleanly(tiny_npz, tmp_path, monkeypatch):
    handler_before = signal.getsignal(signal.SIGINT)  # Ignored, not the default, where CI starts in the background.
    real_save_model = cnn.save_model
    config = str(write_config(tmp_path))

    def save_with_interrupts(count):
        def save(model, path):
            for _ in range(count):
                os.kill(os.getpid(), signal.SIGINT)  # Handled before the next line runs.
            real_save_model(model, path)
        return save

    monkeypatch.setattr(cnn, "save_model", save_with_interrupts(1))
    out = tmp_path / "once"
    assert proc_mnist.main([config, "--data", str(tiny_npz), "--out", str(out)]) == 130
    assert strict_json(out / "metrics.json")["steps"] == 40
    assert cnn.load_trained_model(out / "model.keras").output_shape == (None, 10)

    monkeypatch.setattr(cnn, "save_model", save_with_interrupts(2))
    out = tmp_path / "twice"
    with pytest.raises(KeyboardInterrupt):
        proc_mnist.main([config, "--data", str(tiny_npz), "--out", str(out)])
    assert not (out / "model.keras").exists() and not list(out.glob(".*"))  # No half-written file.
    assert signal.getsignal(signal.SIGINT) is handler_before  # Handlers restored.


def sessions_run(tiny_npz, tmp_path, monkeypatch):
    """One run in three sessions: interrupted at step 3, at step 25, then finished at 40."""
    out = tmp_path / "run"
    config = str(write_config(tmp_path))
    monkeypatch.setattr(trainer, "TARGET_CALL_SECONDS", 1e-9)
    interrupt_at_call(monkeypatch, 3)
    assert proc_mnist.main([config, "--data", str(tiny_npz), "--out", str(out)]) == 130
    first = strict_json(out / "metrics.json")
    monkeypatch.undo()
    monkeypatch.setattr(trainer, "TARGET_CALL_SECONDS", 1e-9)
    interrupt_at_call(monkeypatch, 22)
    assert proc_mnist.main(["--data", str(tiny_npz), "--out", str(out), "--resume"]) == 130
    second = strict_json(out / "metrics.json")
    monkeypatch.undo()
    assert proc_mnist.main(["--data", str(tiny_npz), "--out", str(out), "--resume"]) == 0
    return out, first, second, strict_json(out / "metrics.json")


def test_resumed_runs_keep_the_whole_history_and_add_up_time(tiny_npz, tmp_path, monkeypatch):
    out, first, second, final = sessions_run(tiny_npz, tmp_path, monkeypatch)
    assert [record["step"] for record in first["history"]] == [3]
    assert [record["step"] for record in second["history"]] == [3, 20, 25]
    assert [record["step"] for record in final["history"]] == [3, 20, 25, 40]
    assert final["sessions"] == 3 and final["steps"] == 40 and final["examples"] == 40 * 20
    session_seconds = second["seconds"] - first["seconds"]
    assert 0 < first["seconds"] < second["seconds"] < final["seconds"] and session_seconds > 0
    np.testing.assert_allclose(final["examples_per_second"], final["examples"] / final["seconds"])
    seconds = [record["seconds"] for record in final["history"]]
    assert seconds == sorted(seconds)  # Later sessions continue the clock.
    assert (out / "training_curve.png").read_bytes()[:4] == b"\x89PNG"


def file_states(folder):
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in folder.rglob("*") if path.is_file()}


def test_resume_with_nothing_left_to_do_touches_no_file(tiny_npz, tmp_path, capsys):
    out = tmp_path / "run"
    assert proc_mnist.main([str(write_config(tmp_path)), "--data", str(tiny_npz), "--out", str(out)]) == 0
    before = file_states(out)
    capsys.readouterr()
    assert proc_mnist.main(["--data", str(tiny_npz), "--out", str(out), "--resume", "--steps", "10"]) == 0
    output = capsys.readouterr().out
    assert "nothing to do" in output and "already at step 40 >= 10" in output
    assert file_states(out) == before


def no_training(*args, **kwargs):
    raise AssertionError("training started")


def test_damaged_metrics_or_model_without_optimizer_refused_before_training(tiny_npz, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert proc_mnist.main([str(write_config(tmp_path)), "--data", str(tiny_npz), "--out", str(out)]) == 0
    monkeypatch.setattr(trainer, "train", no_training)
    resume = ["--data", str(tiny_npz), "--out", str(out), "--resume", "--steps", "60"]
    good_metrics = (out / "metrics.json").read_text()
    for damaged in [good_metrics[:len(good_metrics) // 2], "[]", '{"steps": "many", "seconds": 1, "history": []}']:
        (out / "metrics.json").write_text(damaged)
        with pytest.raises(common.UserError, match="metrics.json is damaged"):
            proc_mnist.main(resume)
    (out / "metrics.json").write_text(good_metrics)
    uncompiled = proc_mnist.build_model(tiny_options()["model"])
    cnn.save_model(uncompiled, out / "model.keras")
    with pytest.raises(common.UserError, match="saved without its optimizer state"):
        proc_mnist.main(resume)


def test_unwritable_output_or_failed_start_leaves_no_folder(tiny_npz, tmp_path, monkeypatch):
    config = str(write_config(tmp_path))
    (tmp_path / "file").write_text("")
    with pytest.raises(common.UserError, match="cannot write to output folder"):
        proc_mnist.main([config, "--data", str(tiny_npz), "--out", str(tmp_path / "file" / "run")])
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:  # As the command runs it: common.run_cli cleans up.
        common.run_cli(lambda: proc_mnist.main([config, "--data", str(tiny_npz), "--out", str(out),
                                                "--set", "train.batch_size=1000"]))
    assert exit_info.value.code == 2 and not out.exists()


def test_sigterm_saves_and_exits_130(tiny_npz, tmp_path):
    config = write_config(tmp_path, num_steps=100000)
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(Path(proc_mnist.__file__)), str(config), "--data", str(tiny_npz),
                                "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("step 40/"):  # Training is under way.
            process.send_signal(signal.SIGTERM)
            break
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    metrics = strict_json(out / "metrics.json")
    assert metrics["interrupted"] is True and 40 <= metrics["steps"] < 100000
    model = cnn.load_trained_model(out / "model.keras", compile=True)
    assert int(model.optimizer.iterations.numpy()) == metrics["steps"]


def test_fused_adam_equals_keras_adam(tiny_data):
    import tensorflow as tf

    options = tiny_options()
    models = []
    for fused in (True, False):
        keras.utils.set_random_seed(0)
        model = trainer.compile_for_training(proc_mnist.build_model(options["model"]),
                                                trainer.learning_rate_schedule(recipe_options(60)["train"]))
        apply = trainer._fused_adam(model.optimizer) if fused else (
            lambda gradients, variables: model.optimizer.apply_gradients(zip(gradients, variables)))
        assert apply is not None
        for step in range(5):
            images = tiny_data["x_train"][step * 20:(step + 1) * 20]
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                    tiny_data["y_train"][step * 20:(step + 1) * 20], model(images)))
            apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        assert int(model.optimizer.iterations.numpy()) == 5
        models.append(model)
    for fused, plain in zip(models[0].get_weights() + [v.numpy() for v in models[0].optimizer.variables],
                            models[1].get_weights() + [v.numpy() for v in models[1].optimizer.variables]):
        np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-7)
    assert not np.allclose(models[0].get_weights()[0], proc_mnist.build_model(options["model"]).get_weights()[0])
    assert trainer._fused_adam(keras.optimizers.SGD()) is None
    assert trainer._fused_adam(keras.optimizers.Adam(amsgrad=True)) is None


def test_resuming_a_run_saved_before_the_recipe_keys_keeps_its_original_recipe(tiny_npz, tmp_path):
    out = tmp_path / "run"
    assert proc_mnist.main([str(write_config(tmp_path)), "--data", str(tiny_npz), "--out", str(out)]) == 0
    old_style = "\n".join(line for line in (out / "config.toml").read_text().splitlines()
                          if line.split(" = ")[0] not in configurator.ORIGINAL_RECIPE)
    (out / "config.toml").write_text(old_style)
    assert "shift_pixels" not in old_style and "[train]" in old_style
    assert configurator.default_config()["train"]["schedule"] != "constant"  # The defaults would change the recipe.
    assert proc_mnist.main(["--data", str(tiny_npz), "--out", str(out), "--resume", "--steps", "60"]) == 0
    section = configurator.load_config(out / "config.toml")["train"]
    assert {key: section[key] for key in configurator.ORIGINAL_RECIPE} == configurator.ORIGINAL_RECIPE


def test_calls_are_sized_by_time_and_end_on_progress_lines(tiny_npz, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trainer, "TARGET_CALL_SECONDS", 1e9)  # As long as allowed: up to the next line.
    calls = interrupt_at_call(monkeypatch, call_number=0)
    assert proc_mnist.main([str(write_config(tmp_path)), "--data", str(tiny_npz), "--out", str(tmp_path / "run")]) == 0
    assert calls == [1, 1, 18, 20]  # The first call traces, the second is timed, then whole blocks.
    output = capsys.readouterr().out
    assert "step 20/40" in output and "step 40/40" in output


def test_resuming_past_the_saved_schedule_says_so(tiny_npz, tmp_path, capsys):
    out = tmp_path / "run"
    config = str(write_config(tmp_path))
    assert proc_mnist.main([config, "--data", str(tiny_npz), "--out", str(out), "--set", "train.schedule=cosine"]) == 0
    assert proc_mnist.main(["--data", str(tiny_npz), "--out", str(out), "--resume", "--steps", "60"]) == 0
    assert "the saved learning-rate schedule ends at step 40; steps after it use its final rate 0" in \
        capsys.readouterr().out


def test_an_interrupted_run_keeps_its_tensorboard_logs_closed(tiny_npz, tmp_path, monkeypatch):
    from conftest import read_scalars

    import tensorflow as tf

    closed, real_create = [], tf.summary.create_file_writer

    def noting_create(log_dir, *args, **kwargs):
        writer = real_create(log_dir, *args, **kwargs)
        real_close = writer.close
        writer.close = lambda: (closed.append(log_dir), real_close())
        return writer

    out = tmp_path / "run"
    monkeypatch.setattr(trainer, "TARGET_CALL_SECONDS", 1e-9)  # Every call one step.
    interrupt_at_call(monkeypatch, 25)
    monkeypatch.setattr(tf.summary, "create_file_writer", noting_create)
    assert proc_mnist.main([str(write_config(tmp_path)), "--data", str(tiny_npz), "--out", str(out)]) == 130
    [session] = closed
    assert Path(session).parent == out / "logs"  # The session's own subfolder.
    assert [step for step, _ in read_scalars(out / "logs")["train/loss"]] == [20]


def test_resuming_on_other_data_is_refused_unless_allowed_and_then_recorded(tiny_npz, tmp_path, capsys):
    from conftest import make_images, read_scalars

    out, other = tmp_path / "run", tmp_path / "other.npz"
    x_train, y_train = make_images(500, seed=7)
    np.savez(other, x_train=x_train, y_train=y_train, x_test=x_train[:50], y_test=y_train[:50])
    config = str(write_config(tmp_path))
    assert proc_mnist.main([config, "--data", str(tiny_npz), "--out", str(out), "--steps", "20"]) == 0
    resume = ["--data", str(other), "--out", str(out), "--resume", "--steps", "40"]
    with pytest.raises(common.UserError, match=f"model {out / 'model.keras'} was trained on {tiny_npz} .* but the data is "
                                        f"{other} .*--allow-other-data"):
        proc_mnist.main(resume)
    capsys.readouterr()
    assert proc_mnist.main([*resume, "--allow-other-data"]) == 0
    assert f"note: --allow-other-data: model {out / 'model.keras'} was trained on {tiny_npz}" in capsys.readouterr().out
    recorded = json.loads((out / "metrics.json").read_text())["data"]
    assert recorded["file"] == str(other) and recorded["model_data"]["file"] == str(tiny_npz)
    assert configurator.load_config(out / "config.toml")["data"]["file"] == str(other)
    # Each session logged to its own folder; together they hold the whole history.
    sessions = sorted((out / "logs").iterdir())
    assert len(sessions) == 2 and all(session.is_dir() for session in sessions)
    assert [step for step, _ in read_scalars(sessions[1])["train/loss"]] == [40]
    assert [step for step, _ in read_scalars(out / "logs")["train/loss"]] == [20, 40]
    # Resumed with no --data: the file the run last recorded (its config's data.file), nothing to refuse.
    assert proc_mnist.main(["--out", str(out), "--resume", "--steps", "60"]) == 0


def test_tensorboard_reads_the_event_files(tiny_data, tmp_path):
    """TensorBoard's own reader (the pinned tensorboard package) loads what training and write_images write."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    options = tiny_options(40)
    options["train"]["log_every"] = 20
    images = np.random.default_rng(0).uniform(0, 1, (2, 12, 9)).astype(np.float32)
    with common.summary_writer(tmp_path / "logs") as writer:
        _, metrics = trainer.train(tiny_data, options, writer=writer, **SILENT)
        common.write_images(writer, 7, "label_3/images", images)
    accumulator = event_accumulator.EventAccumulator(str(tmp_path / "logs"),
                                                     size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    # tf.summary.write with the scalars plugin's metadata: TensorBoard files them as tensors of that plugin.
    scalar_tags = {"train/loss", "train/val_accuracy", "train/learning_rate", "train/examples_per_second"}
    assert set(accumulator.PluginTagToContent("scalars")) == scalar_tags
    assert set(accumulator.PluginTagToContent("images")) == {"label_3/images"}
    assert set(accumulator.Tags()["tensors"]) == scalar_tags | {"label_3/images"}

    def values(tag):
        return [(event.step, float(tensor_util.make_ndarray(event.tensor_proto))) for event in accumulator.Tensors(tag)]

    history = metrics["history"]
    assert [record["step"] for record in history] == [20, 40]
    for tag, key in (("train/loss", "loss"), ("train/val_accuracy", "val_accuracy")):
        np.testing.assert_allclose(values(tag), [(record["step"], record[key]) for record in history], rtol=1e-6)
    assert values("train/learning_rate") == [(20, pytest.approx(1e-2)), (40, pytest.approx(1e-2))]
    assert all(rate > 0 for _, rate in values("train/examples_per_second"))
    [image_event] = accumulator.Tensors("label_3/images")
    width, height, *encoded = tensor_util.make_ndarray(image_event.tensor_proto)
    assert image_event.step == 7 and (width, height) == (b"9", b"12") and len(encoded) == 2
    assert all(png.startswith(b"\x89PNG") for png in encoded)
