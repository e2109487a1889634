import json

import numpy as np
import pytest

import cnn
import cnn_backwork
import configurator
import preprocess_data
import results_format
import trainer
from common import UserError
from conftest import fake_backwork_results
from helpers import QUICK_ATTACKS, quick_study_arguments, record_retraining, write_results


def test_random_augmentation_adds_uniform_labels_and_shuffles(tiny_data):
    augmented = preprocess_data.augment_random_data(tiny_data, num_blank=30, num_noise=20, seed=1)
    targets = augmented["y_train"]
    assert len(augmented["x_train"]) == len(tiny_data["x_train"]) + 50 and targets.shape == (450, 10)
    uniform = np.all(np.isclose(targets, 0.1), axis=1)
    assert uniform.sum() == 50 and not np.all(uniform[-50:])  # Shuffled in, not appended.
    blank = np.all(augmented["x_train"] == 0, axis=(1, 2, 3))
    assert blank.sum() == 30 and np.all(uniform[blank])
    np.testing.assert_array_equal(augmented["x_test"], tiny_data["x_test"])
    np.testing.assert_array_equal(augmented["y_val"], tiny_data["y_val"])
    real = ~uniform
    np.testing.assert_allclose(targets[real].sum(axis=1), 1.0)
    assert sorted(targets[real].argmax(axis=1)) == sorted(tiny_data["y_train"])


def test_augment_data_adds_every_label_s_final_images(tiny_data, tmp_path):
    augmented = preprocess_data.augment_data(tiny_data, write_results(tmp_path), seed=0)
    assert len(augmented["x_train"]) == len(tiny_data["x_train"]) + 30
    assert np.all(np.isclose(augmented["y_train"], 0.1), axis=1).sum() == 30


@pytest.mark.parametrize("kwargs,message", [
    ({"labels": range(9)}, r"no results for labels \[9\].*--labels 9"),
    ({"shape": (3, 8, 8)}, r"shape \(8, 8, 1\)"),
    ({"num_classes": 11}, "has 11 classes, the model 10"),
])
def test_mismatched_results_are_refused(tiny_data, tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        preprocess_data.augment_data(tiny_data, write_results(tmp_path, **kwargs))


def test_difficulty_fractions_from_a_synthetic_steps_array():
    results = {0: {"steps_to_reach": np.array([1, 25, 26, 100]), "steps": 400},
               1: {"steps_to_reach": np.array([-1, 399, 50, 401]), "steps": 401}}
    measured = preprocess_data.difficulty(results, budgets=[25, 50, 100, 400])
    # Sorted: 1, 25, 26, 50, 100, 399, 401, never.
    assert measured["fooled_within"] == {"25": 2 / 8, "50": 4 / 8, "100": 5 / 8, "400": 6 / 8}
    assert measured["fooled_fraction"] == 7 / 8 and measured["median_steps_to_fool"] == 75.0
    assert measured["backwork_steps"] == 401
    never = preprocess_data.difficulty({0: {"steps_to_reach": np.array([-1, -1, 5]), "steps": 9}}, [10])
    assert never["median_steps_to_fool"] is None and never["fooled_within"] == {"10": 1 / 3}


def test_transfer_numbers_equal_a_direct_predict(trained_tiny, tmp_path):
    model = cnn.load_trained_model(trained_tiny[0])
    results = results_format.load_label_results(write_results(tmp_path, labels=[2, 7]))
    numbers = preprocess_data.fooling_numbers(model, results, cap=0.999, prefix="transfer")
    direct = np.concatenate([np.asarray(model(results[label]["images"][..., None]))[:, label] for label in (2, 7)])
    assert numbers["transfer_mean_p"] == pytest.approx(direct.mean(), rel=1e-5)
    assert numbers["transfer_above_0.5"] == np.mean(direct > 0.5)
    assert numbers["transfer_at_cap"] == np.mean(direct >= 0.999)


def test_extra_class_model_keeps_the_old_weights_and_has_one_more_output(trained_tiny, tiny_data):
    original = cnn.load_trained_model(trained_tiny[0])
    wider = preprocess_data.with_extra_class(original)
    assert wider.output_shape == (None, 11) and [layer.name for layer in wider.layers] == \
        [layer.name for layer in original.layers]
    for layer in original.layers:
        for old, new in zip(layer.get_weights(), wider.get_layer(layer.name).get_weights()):
            if layer.name == "logits":
                new = new[..., :-1]
            np.testing.assert_array_equal(old, new)
    logits = cnn.logits_model
    images = tiny_data["x_test"][:5]
    np.testing.assert_allclose(np.asarray(logits(wider)(images))[:, :10], np.asarray(logits(original)(images)),
                               rtol=1e-5, atol=1e-6)
    targets = preprocess_data.none_targets(3, 10, "extra_class")
    assert targets.shape == (3, 11) and (targets.argmax(axis=1) == 10).all()


def test_one_round_end_to_end_lowers_confidence_on_trained_fooling_images(trained_tiny, tiny_npz, tmp_path, capsys):
    config = tmp_path / "quick.toml"
    config.write_text("[data]\nvalidation_size = 100\n"
                      "[train]\nlearning_rate = 0.01\nbatch_size = 20\nlog_every = 50\n"
                      "[backwork]\nnum_examples = 2\nmax_num_steps = 50\nmin_num_steps = 25\nlearning_rate = 0.05\n"
                      "[augment]\nnum_blank = 20\nnum_noise = 20\nnum_eval_noise = 50\n")
    model_path = str(trained_tiny[0])
    backwork_dir = tmp_path / "backwork"
    assert cnn_backwork.main([str(config), "--model", model_path, "--data", str(tiny_npz),
                              "--out", str(backwork_dir)]) == 0
    out = tmp_path / "aug"
    assert preprocess_data.main([str(config), "--results", str(backwork_dir), "--model", model_path,
                                 "--data", str(tiny_npz), "--out", str(out), "--steps", "100", *QUICK_ATTACKS]) == 0
    report = json.loads((out / "report.json").read_text())
    original, retrained = report["rounds"]
    assert retrained["train_steps"] == 100 and retrained["num_fooling_images_trained"] == 20
    assert retrained["trained_fooling_top_prob"] < original["trained_fooling_top_prob"]
    assert retrained["noise_top_prob"] < 0.5
    assert 0 <= retrained["fooled_fraction"] <= 1 and set(retrained["fooled_within"]) == {"25", "50"}
    assert 0 <= retrained["heldout_mean_p"] <= 1 and 0 <= retrained["fresh_on_original_mean_p"] <= 1
    assert report["complete"] is True and report["target"] == "uniform"
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    for folder in ("round1/backwork", "heldout"):
        assert len(list((out / folder).glob("results_*.pkl"))) == 10
        assert (out / folder / "backwork.png").read_bytes()[:4] == b"\x89PNG"
    assert cnn.load_trained_model(out / "model.keras").output_shape == (None, 10)
    assert "round  test acc" in capsys.readouterr().out


def test_from_scratch_retrains_the_same_architecture_afresh(trained_tiny, tiny_data):
    original = cnn.load_trained_model(trained_tiny[0])
    config = configurator.default_config()
    config["train"].update(num_steps=20, log_every=10, batch_size=20, learning_rate=0.01)
    config["augment"].update(from_scratch=True, retrain_steps=999)
    model, metrics = preprocess_data.retrain(original, tiny_data, config, 1, progress=lambda line: None)
    assert metrics["steps"] == 20  # train.num_steps, not retrain_steps.
    assert [layer.name for layer in model.layers] == [layer.name for layer in original.layers]
    assert not np.allclose(model.get_layer("fc1").get_weights()[0], original.get_layer("fc1").get_weights()[0])
    config["augment"].update(from_scratch=False, retrain_steps=15)
    continued, metrics = preprocess_data.retrain(original, tiny_data, config, 1, progress=lambda line: None)
    assert metrics["steps"] == 15 and continued is original


# The attack suite with tiny budgets: every attack runs, in seconds.
@pytest.mark.parametrize("stop,expected", [("interrupted", KeyboardInterrupt), ("diverged", UserError)])
def test_a_stopped_retraining_ends_the_study_with_an_incomplete_report(trained_tiny, tiny_npz, tmp_path,
                                                                       monkeypatch, stop, expected):
    def stopped_training(data, config, model, progress, extra_term=None):
        return model, {"steps": 3, "seconds": 0.1, "interrupted": stop == "interrupted",
                       "diverged": stop == "diverged"}

    monkeypatch.setattr(trainer, "train", stopped_training)
    with pytest.raises(expected):
        preprocess_data.main(quick_study_arguments(trained_tiny, tiny_npz, tmp_path))
    report = json.loads((tmp_path / "aug" / "report.json").read_text())
    assert report["complete"] is False and [metrics["round"] for metrics in report["rounds"]] == [0]
    assert not (tmp_path / "aug" / "round1").exists() and not (tmp_path / "aug" / "model.keras").exists()


def test_retraining_starts_from_the_config_the_model_was_trained_with(trained_tiny, tmp_path):
    import shutil

    (tmp_path / "run").mkdir()
    shutil.copy(trained_tiny[0], tmp_path / "run" / "model.keras")
    trained_with = configurator.load_config(None, ["train.learning_rate=0.0123", "train.batch_size=7"])
    (tmp_path / "run" / "config.toml").write_text(configurator.dump_toml(trained_with))
    args = preprocess_data.parse_arguments(["--results", "r", "--model", str(tmp_path / "run" / "model.keras")])
    config = preprocess_data.resolve_config(args)
    assert config["train"]["learning_rate"] == 0.0123 and config["train"]["batch_size"] == 7
    given = tmp_path / "given.toml"
    given.write_text("[train]\nbatch_size = 9\n")
    args = preprocess_data.parse_arguments([str(given), "--results", "r", "--model",
                                            str(tmp_path / "run" / "model.keras")])
    assert preprocess_data.resolve_config(args)["train"]["batch_size"] == 9  # A given config wins.


def test_an_older_model_is_retrained_on_its_own_recipe_not_on_todays_defaults(tmp_path):
    """A config.toml saved before the recipe keys existed means the original recipe, for every reader.

    The rounds study once read it with load_config, which fills in today's defaults (a cosine
    schedule, random shifts): an older model was then retrained on a recipe it never had.
    """
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.keras").write_bytes(b"")  # resolve_config only reads the config beside it.
    old_style = "\n".join(line for line in configurator.dump_toml(configurator.default_config()).splitlines()
                          if line.split(" = ")[0] not in configurator.ORIGINAL_RECIPE)
    (tmp_path / "run" / "config.toml").write_text(old_style)
    defaults = configurator.default_config()["train"]
    assert any(defaults[key] != value for key, value in configurator.ORIGINAL_RECIPE.items())  # Not trivial.
    args = preprocess_data.parse_arguments(["--results", "r", "--model", str(tmp_path / "run" / "model.keras")])
    section = preprocess_data.resolve_config(args)["train"]
    assert {key: section[key] for key in configurator.ORIGINAL_RECIPE} == configurator.ORIGINAL_RECIPE
    saved = configurator.saved_config(tmp_path / "run" / "config.toml")["train"]
    assert {key: saved[key] for key in configurator.ORIGINAL_RECIPE} == configurator.ORIGINAL_RECIPE


def test_results_file_instead_of_folder_and_bad_images_are_one_line(tiny_data, tmp_path):
    write_results(tmp_path)
    with pytest.raises(UserError, match="not the file .*results_0.pkl; use --results"):
        preprocess_data.augment_data(tiny_data, tmp_path / "results_0.pkl")
    broken = {**fake_backwork_results(4), "format_version": 2, "kind": "backwork"}
    broken["images"][0, 0, 0] = np.nan
    import pickle

    (tmp_path / "results_4.pkl").write_bytes(pickle.dumps(results_format._encode(broken, "results")))
    with pytest.raises(UserError, match="results_4.pkl: field 'images' holds NaN"):
        preprocess_data.augment_data(tiny_data, tmp_path)


def test_extra_class_study_never_trains_on_the_held_out_set(trained_tiny, tiny_npz, tmp_path, monkeypatch):
    trained_on = []
    record_retraining(monkeypatch, lambda data: trained_on.append(data["x_train"]))
    arguments = quick_study_arguments(trained_tiny, tiny_npz, tmp_path)
    arguments += ["--target", "extra_class", "--rounds", "2"]
    assert preprocess_data.main(arguments) == 0
    report = json.loads((tmp_path / "aug" / "report.json").read_text())
    assert report["target"] == "extra_class" and [m["round"] for m in report["rounds"]] == [0, 1, 2]
    assert all(0 <= m["heldout_none_prob"] <= 1 for m in report["rounds"][1:])
    assert cnn.load_trained_model(tmp_path / "aug" / "model.keras").output_shape == (None, 11)
    heldout = results_format.final_images(results_format.load_label_results(tmp_path / "aug" / "heldout"))
    assert len(trained_on) == 2
    for training_images in trained_on:
        flat = training_images.reshape(len(training_images), -1)
        for image in heldout.reshape(len(heldout), -1):
            assert not np.any(np.all(flat == image, axis=1))
    # The second round trained on the first round's fresh images: they must be in its set.
    fresh = results_format.final_images(results_format.load_label_results(tmp_path / "aug" / "round1" / "backwork"))
    assert np.any(np.all(trained_on[1].reshape(len(trained_on[1]), -1) == fresh[0].ravel(), axis=1))


def test_held_out_seed_equal_to_the_backwork_seed_is_refused_before_any_work(tmp_path):
    args = preprocess_data.parse_arguments(["--results", "r", "--model", str(tmp_path / "model.keras"),
                                            "--set", "augment.heldout_seed=0", "--set", "backwork.seed=0"])
    with pytest.raises(UserError, match="augment.heldout_seed must differ from backwork.seed"):
        preprocess_data.resolve_config(args)
