"""The attack suite: the backwork losses, the statistics, ART's attacks and the study's use of them."""
import json

import numpy as np
import pytest

import attacks
import backwork_cost
import backwork_loop
import cnn
import common
import configurator
import figures
import preprocess_data
from common import UserError
from helpers import quick_study_arguments, record_retraining

LOSS_OPTIONS = {"margin_kappa": 20.0}


def loss_of(logits, labels, loss):
    import tensorflow as tf

    return backwork_cost.label_loss(tf.constant(logits), tf.constant(labels), {**LOSS_OPTIONS, "loss": loss})


def logits_gradient(logits, labels, loss):
    import tensorflow as tf

    logits = tf.constant(logits)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        total = tf.reduce_sum(backwork_cost.label_loss(logits, tf.constant(labels), {**LOSS_OPTIONS, "loss": loss}))
    return tape.gradient(total, logits).numpy()


@pytest.mark.parametrize("loss", configurator.BACKWORK_LOSSES)
def test_each_loss_gradient_matches_finite_differences(loss):
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(0, 2, (5, 4)), np.array([0, 1, 2, 3, 1])
    gradient = logits_gradient(logits, labels, loss)
    numeric = np.zeros_like(logits)
    step = 1e-6
    for index in np.ndindex(logits.shape):
        plus, minus = logits.copy(), logits.copy()
        plus[index] += step
        minus[index] -= step
        numeric[index] = (loss_of(plus, labels, loss).numpy().sum() - loss_of(minus, labels, loss).numpy().sum()) / (
            2 * step)
    np.testing.assert_allclose(gradient, numeric, atol=1e-6)
    assert np.abs(gradient).max() > 0.05  # Not a trivially flat comparison.


def test_losses_have_their_closed_forms():
    logits, labels = np.array([[2.0, 0.5, -1.0], [0.0, 30.0, 1.0]]), np.array([1, 1])
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(loss_of(logits, labels, "probability"), 1 - probabilities[:, 1], rtol=1e-6)
    np.testing.assert_allclose(loss_of(logits, labels, "log_probability"), -np.log(probabilities[:, 1]), rtol=1e-6, atol=1e-12)
    # Margin: 2 - 0.5 = 1.5; the second leads by 29, clamped at -kappa = -20.
    np.testing.assert_allclose(loss_of(logits, labels, "margin"), [1.5, -20.0])


def test_a_saturated_softmax_stops_only_the_probability_loss(trained_tiny):
    """Through a real network: where p(label) < 1e-6 the probability loss has (almost) no input gradient."""
    import tensorflow as tf

    model = cnn.load_trained_model(trained_tiny[0])
    logits_model = cnn.logits_model(model)
    images = tf.constant(np.random.default_rng(1).uniform(0, 1, (64, 12, 12, 1)).astype(np.float32))
    logits = logits_model(images).numpy()
    labels = logits.argmin(axis=1)  # Each image's least likely class.
    saturated = np.flatnonzero(cnn.predict(model, images.numpy())[np.arange(64), labels] < 1e-6)
    assert len(saturated) >= 3, "the tiny model should be sure enough to saturate some images"
    norms = {}
    for loss in configurator.BACKWORK_LOSSES:
        chosen = tf.gather(images, saturated)
        with tf.GradientTape() as tape:
            tape.watch(chosen)
            value = tf.reduce_sum(backwork_cost.label_loss(logits_model(chosen), tf.constant(labels[saturated]),
                                                          {**LOSS_OPTIONS, "loss": loss}))
        norms[loss] = np.linalg.norm(tape.gradient(value, chosen).numpy().reshape(len(saturated), -1), axis=1)
    assert norms["probability"].max() < 1e-4
    assert norms["log_probability"].min() > 1e-2 and norms["margin"].min() > 1e-2


def test_backwork_with_the_margin_loss_fools_a_tiny_model(tiny_data, trained_tiny):
    options = {"backwork": {"num_examples": 2, "max_num_steps": 60, "min_num_steps": 0, "save_freq": 5,
                            "nearest_every": 5, "loss": "margin", "learning_rate": 0.05}}
    results = backwork_loop.get_faulty_input_layer(tiny_data, options, str(trained_tiny[0]), labels=[3, 7],
                                                  progress=lambda line: None)
    for label, result in results.items():
        assert result["options"]["loss"] == "margin"
        assert np.all(result["probs"][:, label] >= 0.999) and np.all(result["steps_to_reach"] >= 0)


def test_wilson_interval_against_reference_values():
    # Reference values from the closed form (Wilson 1927) at z = 1.96.
    assert attacks.wilson_interval(0, 80) == pytest.approx((0.0, 0.04582), abs=1e-5)
    assert attacks.wilson_interval(80, 80) == pytest.approx((0.95418, 1.0), abs=1e-5)
    assert attacks.wilson_interval(40, 80) == pytest.approx((0.39297, 0.60703), abs=1e-5)
    assert attacks.wilson_interval(0, 0) == (0.0, 1.0)


def test_attack_row_from_synthetic_steps():
    row = attacks.attack_row([5, -1, 20, 100, 7], [0.1, 0.9, 0.3, 0.5, 0.2], budget=50, unit="steps")
    # 100 is past the budget: fooled are 5, 20 and 7.
    assert row["fooled"] == 3 and row["count"] == 5 and row["fooled_fraction"] == 0.6
    assert row["median_steps"] == 7 and row["distance"] == pytest.approx(0.2)
    assert row["interval"] == pytest.approx(list(attacks.wilson_interval(3, 5)))
    assert row["interval"][0] < 0.6 < row["interval"][1]
    never = attacks.attack_row([-1, -1], [0.1, 0.2], budget=10, unit="steps")
    assert never["fooled"] == 0 and never["median_steps"] is None and never["distance"] is None


def test_roc_numbers_against_a_hand_computed_case():
    digits, others = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.35, 0.5, 0.2])
    # Pairs (other above digit): 0.35 beats 3, 0.5 beats 4, 0.2 beats 1 and ties 1 -> 8.5 of 12.
    assert attacks.roc_auc(digits, others) == pytest.approx(8.5 / 12)
    measured = attacks.separation(digits, others)
    # 99% of four digits pass only at the largest digit score; above it only 0.5 is rejected.
    assert measured["threshold"] == 0.4 and measured["rejected"] == pytest.approx(1 / 3)
    assert measured["digits_kept"] == 1.0
    false, true = attacks.roc_curve(digits, others)
    assert false[0] == 0 and true[-1] == 1 and false[-1] == 1
    assert np.trapezoid(true, false) == pytest.approx(8.5 / 12)


def test_none_score_is_the_extra_class_or_one_minus_the_top_class():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.2, 0.2, 0.6]])
    np.testing.assert_allclose(attacks.none_scores(probabilities, 3), [0.3, 0.4])
    np.testing.assert_allclose(attacks.none_scores(probabilities, 2), [0.1, 0.6])


def test_art_attacks_fool_a_tiny_model_from_noise(trained_tiny, tiny_data):
    model = cnn.load_trained_model(trained_tiny[0])
    images, targets = attacks.starts(tiny_data, [2, 5], 3, seed=0)
    # The same starts as backwork's first images with that seed.
    first = backwork_loop.initial_images(tiny_data["x_train"][:1], 3, np.random.default_rng([0, 5]), False)
    np.testing.assert_array_equal(images[3:], first)
    for final, steps in [attacks.run_pgd(model, images, targets, 0.999, 300, 0.02, progress=lambda line: None),
                         attacks.run_square(model, images, targets, 0.999, 300, 0, progress=lambda line: None)]:
        assert np.all(steps > 0)
        assert np.all(cnn.target_probabilities(model, final, targets) >= 0.999)
        assert final.min() >= 0 and final.max() <= 1
    # A step of nothing moves no image: the broken attack the sanity row exists for.
    _, steps = attacks.run_pgd(model, images, targets, 0.999, 20, 1e-12, progress=lambda line: None)
    assert np.all(steps < 0)


def study_report(out):
    return json.loads((out / "report.json").read_text())


def test_suite_study_reports_every_attack_with_intervals_and_convergence(trained_tiny, tiny_npz, tmp_path,
                                                                         capsys, monkeypatch):
    arguments = quick_study_arguments(trained_tiny, tiny_npz, tmp_path) + [
        "--transfer-from", str(trained_tiny[0]), "--ood", str(tiny_npz), "--set", "augment.pgd_step_size=1e-12",
        "--set", "backwork.max_num_steps=60", "--set", "augment.square_queries=300"]
    assert preprocess_data.main(arguments) == 0
    report = study_report(tmp_path / "aug")
    captured = capsys.readouterr()
    # The deliberately broken PGD (a step of 1e-12) fails the sanity row, loudly, and is left out.
    assert "MISCONFIGURED ATTACK: pgd" in captured.err and "pgd" in report["misconfigured_attacks"]
    original, retrained = report["rounds"]
    assert original["attacks"]["pgd"]["misconfigured"] is True and retrained["attacks"]["pgd"]["misconfigured"]
    assert "MISCONFIGURED" in captured.out
    expected = {"probability", "log_probability", "margin", "square", "transfer_original_heldout",
                "transfer_independent_model"}
    # Any attack but the broken one may fail the sanity row with these tiny budgets; it is marked in every round.
    for metrics in report["rounds"]:
        assert set(metrics["attacks"]) == expected | {"pgd"}
        assert {name for name, row in metrics["attacks"].items() if row.get("misconfigured")} == set(
            report["misconfigured_attacks"])
        assert metrics["strongest_attack"]["attack"] not in report["misconfigured_attacks"]
    for metrics in report["rounds"]:
        rows = metrics["attacks"]
        for name in set(rows) - {"pgd"}:
            row = rows[name]
            assert row["count"] == 20 and 0 <= row["fooled"] <= 20  # 2 starts x 10 classes
            low, high = row["interval"]
            assert low <= row["fooled_fraction"] <= high
        convergence = rows[attacks.strongest_loss(rows)]["convergence"]
        assert set(convergence["fooled_within"]) == {"60", "120", "240"} and isinstance(convergence["converged"], bool)
        assert metrics["strongest_attack"]["attack"] in rows
        best = metrics["strongest_attack"]
        fooled = round(best["fooled_fraction"] * 20)
        assert best["interval"] == pytest.approx(list(attacks.wilson_interval(fooled, 20)))
        assert set(metrics["none_separation"]) >= {"ood", "noise_and_blank", "heldout", "attack_margin"}
    # On the undefended model the working attacks fool (about) everything, and its own images transfer.
    assert all(original["attacks"][name]["fooled_fraction"] >= attacks.SANITY_FRACTION
               for name in ("margin", "square", "transfer_original_heldout"))
    assert retrained["train_on"] in configurator.BACKWORK_LOSSES
    assert report["backwork"]["loss"] == "margin" and report["transfer_from"] == str(trained_tiny[0])
    # The figure's words follow the data: digits for MNIST, images for any other dataset.
    for dataset, real, none_of in [("mnist", "test digits", "that are no digit"),
                                   ("fashion_mnist", "test images", "of none of its classes")]:
        texts = report_figure_texts(report, tmp_path / f"{dataset}.png", dataset, monkeypatch)
        assert any(f'"none" score against {real}' in text for text in texts)
        assert f"how sure the model is of images {none_of}" in texts
        assert (dataset == "mnist") == any("digit" in text for text in texts)


def report_figure_texts(report, path, dataset, monkeypatch):
    """Every title and axis label of the report figure drawn from a report's rounds."""
    drawn = []
    monkeypatch.setattr(common, "save_figure", lambda figure, path: drawn.append(figure))
    figures.plot_report(report["rounds"], "uniform", path, None, dataset)
    texts = [drawn[0]._suptitle.get_text()]
    for axis in drawn[0].axes:
        texts += [axis.get_title(), axis.get_xlabel(), axis.get_ylabel()]
    common.pyplot().close(drawn[0])
    return texts


def test_control_retrains_on_the_original_examples_alone(trained_tiny, tiny_npz, tmp_path, monkeypatch):
    trained_on = []
    record_retraining(monkeypatch, lambda data: trained_on.append(len(data["x_train"])))
    arguments = quick_study_arguments(trained_tiny, tiny_npz, tmp_path) + [
        "--target", "control", "--set", 'augment.attacks=["margin"]']
    assert preprocess_data.main(arguments) == 0
    assert trained_on == [400]  # The 400 training examples (500 less 100 for validation), nothing added.
    report = study_report(tmp_path / "aug")
    assert report["target"] == "control" and set(report["rounds"][1]["attacks"]) == {"margin"}


def test_fooling_images_of_another_backwork_setting_are_refused(trained_tiny, tiny_npz, tmp_path):
    arguments = quick_study_arguments(trained_tiny, tiny_npz, tmp_path) + ["--set", "backwork.loss=probability"]
    with pytest.raises(UserError, match=r"made with backwork.loss = 'margin' \(the study's: 'probability'\).*"
                                        r"--set backwork.loss=\"margin\""):
        preprocess_data.main(arguments)
    assert not (tmp_path / "aug").exists()


def test_difficulty_budgets_past_the_backwork_budget_are_dropped_with_a_note(capsys):
    config = configurator.default_config()
    config["backwork"]["max_num_steps"] = 100
    assert preprocess_data.drop_unreachable_budgets(config)["augment"]["difficulty_budgets"] == [25, 50, 100]
    assert "[200, 400] are left out" in capsys.readouterr().out
    config["backwork"]["max_num_steps"] = 10
    with pytest.raises(UserError, match="exceeds backwork.max_num_steps = 10"):
        preprocess_data.drop_unreachable_budgets(config)


def test_unknown_attack_and_train_on_names_are_one_line():
    with pytest.raises(UserError, match="augment.attacks .* must be a list of distinct names"):
        configurator.load_config(None, ['augment.attacks=["pgd", "fgsm"]'])
    with pytest.raises(UserError, match="augment.train_on"):
        configurator.load_config(None, ["augment.train_on=pgd"])
    with pytest.raises(UserError, match="backwork.loss"):
        configurator.load_config(None, ["backwork.loss=hinge"])
    assert attacks.ATTACKS == configurator.ATTACKS


@pytest.mark.parametrize("overrides,message", [
    (['augment.attacks=["pgd", "square"]'], "has no backwork loss, so no round would have fooling images"),
    (['augment.attacks=["margin"]', "augment.train_on=probability"], "train_on = 'probability' is not in"),
])
def test_a_suite_that_leaves_a_round_nothing_to_train_on_is_refused(tmp_path, overrides, message):
    arguments = ["--results", "r", "--model", str(tmp_path / "model.keras")]
    for override in overrides:
        arguments += ["--set", override]
    with pytest.raises(UserError, match=message):
        preprocess_data.resolve_config(preprocess_data.parse_arguments(arguments))
