"""ProoD (defences.with_discriminator, cnn.combine_with_discriminator): the combined model equals its formula,
saves and loads in plain Keras, keeps the classifier's accuracy, its certified bound holds above every sampled
and attacked point, the discriminator's loss by hand, training it lowers the certified confidence on noise, and
the scripts run it or refuse it in one line."""
import json

import numpy as np
import pytest

import backwork_cost
import cnn
import configurator
import defences
import interval_bounds
import ood_sets
import preprocess_data
import proc_mnist
import trainer
from common import UserError
from conftest import IMAGE_SIZE, tiny_options, tiny_topology
from helpers import quick_study_arguments

SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 1)
SILENT = {"progress": lambda line: None}


def softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def random_discriminator(classifier, images, seed=0):
    """build_discriminator's model with random logits, scaled so that s_in - s_out has mean 0 and spread 1 on
    images: p(in) spread over (0, 1), not saturated, so that both parts of the mixture count."""
    discriminator = cnn.build_discriminator(classifier)
    layer = discriminator.get_layer("logits")
    kernel = np.random.default_rng(seed).normal(0, 1, layer.kernel.shape).astype(np.float32)
    layer.set_weights([kernel, np.zeros(2, np.float32)])
    difference = np.diff(np.asarray(cnn.logits_model(discriminator)(images)), axis=1)[:, 0]
    layer.set_weights([kernel / difference.std(), np.array([difference.mean(), 0], np.float32) / difference.std()])
    return discriminator


@pytest.fixture(scope="module")
def classifier(trained_tiny):
    return cnn.load_trained_model(trained_tiny[0])


@pytest.fixture(scope="module")
def combined(classifier, tiny_data):
    images = np.concatenate([tiny_data["x_test"][:20], ood_sets.noise_images("uniform", 20, SHAPE, seed=3)])
    discriminator = random_discriminator(classifier, images)
    return cnn.combine_with_discriminator(classifier, discriminator), discriminator


def test_the_discriminator_starts_from_the_classifier_s_features(classifier):
    discriminator = cnn.build_discriminator(classifier)
    assert discriminator.output_shape == (None, 2)
    for layer in classifier.layers:
        if layer.name not in ("logits",) and layer.get_weights():
            for mine, theirs in zip(discriminator.get_layer(layer.name).get_weights(), layer.get_weights()):
                np.testing.assert_array_equal(mine, theirs)
    interval_bounds.check_model_supported(discriminator)  # A chain the bounds and the trainer take.


def test_the_combined_model_is_p_in_times_the_classifier_plus_the_rest_spread_evenly(classifier, combined,
                                                                                       tiny_data):
    model, discriminator = combined
    images = np.concatenate([tiny_data["x_test"][:20], ood_sets.noise_images("uniform", 20, SHAPE, seed=3)])
    q = softmax(cnn.logits_model(classifier)(images))
    in_out = softmax(cnn.logits_model(discriminator)(images))
    expected = in_out[:, 1:2] * q + in_out[:, 0:1] / 10
    assert 0.05 < in_out[:, 1].min() and in_out[:, 1].max() < 0.95  # Both parts of the mixture count.
    np.testing.assert_allclose(cnn.predict(model, images), expected, atol=1e-6)
    # Its logits are log p(y|x): their softmax is p itself, so attacks and backwork read it as any model.
    np.testing.assert_allclose(np.exp(np.asarray(cnn.logits_model(model)(images), np.float64)), expected, rtol=1e-5)
    assert np.array_equal(cnn.predict(model, images).argmax(axis=1), q.argmax(axis=1))  # The classifier decides.


def test_the_combined_model_saves_and_loads_in_plain_keras(classifier, combined, tiny_data, tmp_path):
    import keras

    model, _ = combined
    cnn.save_model(model, tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")  # safe_mode on, no custom objects.
    images = tiny_data["x_test"][:16]
    np.testing.assert_allclose(cnn.predict(loaded, images), cnn.predict(model, images), atol=1e-7)
    assert cnn.is_combined(loaded) and not cnn.is_combined(cnn.build_model(tiny_topology()))
    # Backwork compares the classifier's layers: conv{i} and fc{j} are its, never the discriminator's.
    assert backwork_cost.cost_layer_names(loaded) == ["input", "conv1", "conv2", "fc1"]
    for name in ("conv1", "fc1"):  # The classifier's own activations.
        np.testing.assert_allclose(keras.Model(loaded.input, loaded.get_layer(name).output)(images),
                                   keras.Model(classifier.input, classifier.get_layer(name).output)(images), atol=1e-6)
    assert cnn.input_gradient_model(loaded)(images).shape == (16, 10)


def test_saliency_of_the_combined_model_is_its_classifier_s(classifier, combined, tiny_data):
    import guided_backprop

    model, _ = combined
    images, labels = tiny_data["x_test"][:6], tiny_data["y_test"][:6]
    for method in (guided_backprop.guided_backprop, guided_backprop.vanilla_gradient):
        np.testing.assert_allclose(method(model, images, labels), method(classifier, images, labels), atol=1e-6)


@pytest.mark.parametrize("eps", [0.1, 0.005])
def test_the_certified_bound_lies_above_every_sampled_and_attacked_point(combined, tiny_data, eps):
    import tensorflow as tf

    model, _ = combined
    rng = np.random.default_rng(5)
    points = np.concatenate([ood_sets.noise_images("uniform", 12, SHAPE, seed=4), tiny_data["x_test"][:12]])
    bounds = interval_bounds.probability_upper_bounds(model, points, eps)  # (N, 10)
    log_top = interval_bounds.log_confidence_upper_bounds(model, points, eps)
    np.testing.assert_allclose(np.exp(log_top), bounds.max(axis=1), rtol=1e-5)
    worst = np.zeros_like(bounds)
    for _ in range(30):  # Random points of the ball and its corners.
        offsets = rng.choice([-eps, eps], points.shape) if rng.random() < 0.5 else rng.uniform(-eps, eps, points.shape)
        worst = np.maximum(worst, cnn.predict(model, np.clip(points + offsets, 0, 1).astype(np.float32)))
    lower, upper = np.clip(points - eps, 0, 1), np.clip(points + eps, 0, 1)
    attacked = defences.attack_in_ball(cnn.logits_model(model), tf.constant(points), eps, 30, eps / 4,
                                       tf.constant([0, 7], tf.int64)).numpy()
    assert np.all(attacked >= lower - 1e-6) and np.all(attacked <= upper + 1e-6)
    worst = np.maximum(worst, cnn.predict(model, attacked))
    assert np.all(worst <= bounds + 1e-5)
    if eps < 0.01:
        assert np.median(bounds.max(axis=1)) < 0.99  # Not the trivial bound.
    # At eps = 0 the bound is the model's output.
    np.testing.assert_allclose(interval_bounds.probability_upper_bounds(model, points, 0.0),
                               cnn.predict(model, points), atol=1e-5)
    with pytest.raises(UserError, match="combines a classifier with a discriminator"):
        interval_bounds.logit_bounds(model, points, eps)


def test_the_discriminator_loss_is_the_out_cross_entropy_at_the_bound_by_hand():
    """One dense layer of two outputs: upper(s_in - s_out) over the ball is known in closed form."""
    import keras
    from keras import layers

    inputs = keras.Input((4, 4, 1))
    logits = layers.Dense(2, name="logits")(layers.Flatten()(inputs))
    model = keras.Model(inputs, layers.Activation("softmax", name="softmax")(logits))
    rng = np.random.default_rng(2)
    kernel, bias = rng.normal(0, 1, (16, 2)), rng.normal(0, 1, 2)
    model.get_layer("logits").set_weights([kernel, bias])
    images = rng.uniform(0, 1, (6, 4, 4, 1)).astype(np.float32)
    eps = 0.2
    lower, upper = np.clip(images - eps, 0, 1).reshape(6, -1), np.clip(images + eps, 0, 1).reshape(6, -1)
    weights = kernel[:, 1] - kernel[:, 0]
    worst = bias[1] - bias[0] + (upper + lower) / 2 @ weights + (upper - lower) / 2 @ np.abs(weights)
    expected = np.log1p(np.exp(worst))
    np.testing.assert_allclose(defences.discriminator_loss(model, images, eps).numpy(), expected, rtol=1e-5)


def test_training_the_discriminator_lowers_the_certified_confidence_on_noise_and_keeps_accuracy(classifier,
                                                                                                 tiny_data):
    config = configurator.merge_config(configurator.default_config(), tiny_options(num_steps=120), "test")
    # The tiny task's digits are a bar on faint noise: a ball wider than 0.05 around noise reaches them.
    config["defence"].update(outlier_batch=20, eps=0.05, outlier_sources=["noise", "letters"])
    model, metrics = defences.with_discriminator(classifier, tiny_data, config, **SILENT)
    noise = np.concatenate([ood_sets.noise_images(family, 100, SHAPE, seed=9) for family in ("uniform", "gaussian")])
    before = interval_bounds.confidence_upper_bounds(classifier, noise, 0.05)
    after = interval_bounds.confidence_upper_bounds(model, noise, 0.05)
    assert np.median(before) > 0.9 and np.median(after) < 0.3, (np.median(before), np.median(after))
    assert metrics["test_accuracy"] == trainer.accuracy(classifier, tiny_data["x_test"], tiny_data["y_test"])
    assert metrics["in_fraction"] > 0.9  # The test digits stay "in".
    assert metrics["steps"] == 120


def test_the_box_attacked_share_is_noise_moved_towards_in_anywhere_in_the_image_box(classifier, tiny_data):
    import tensorflow as tf

    images = np.concatenate([tiny_data["x_test"][:20], ood_sets.noise_images("uniform", 20, SHAPE, seed=3)])
    discriminator = random_discriminator(classifier, images)
    parameters = {"outlier_batch": 8, "box_attack_fraction": 0.5, "attack_steps": 5, "attack_step_size": 0.1,
                  "outlier_sources": ["noise", "letters"], "ramp_fraction": 0.0}
    step = tf.constant(3, tf.int64)
    drawn = defences.prood(discriminator, tiny_data["x_train"], parameters).draw(step).numpy()
    plain = defences.prood(discriminator, tiny_data["x_train"], {**parameters, "box_attack_fraction": 0.0})
    np.testing.assert_array_equal(drawn[:4], plain.draw(step).numpy()[4:])  # The pool's part, as ProoD draws it.
    sources = tf.constant(defences._permutation_sources(tiny_data["x_train"], 0))
    starts = defences.noise_batch(defences._key(0, step, defences.NOISE_STREAM), 4, SHAPE, sources).numpy()
    attacked = drawn[4:]
    assert attacked.min() >= 0 and attacked.max() <= 1
    assert np.abs(attacked - starts).max() > 0.3  # No ball holds it: 5 steps of 0.1 move a pixel up to 0.5.
    p_in = lambda batch: softmax(cnn.logits_model(discriminator)(batch))[:, 1]
    assert np.all(p_in(attacked) > p_in(starts)), (p_in(starts), p_in(attacked))


def test_training_on_box_attacked_noise_leaves_a_whole_box_attack_less_room(classifier, tiny_data):
    import keras

    config = configurator.merge_config(configurator.default_config(), tiny_options(num_steps=120), "test")
    config["defence"].update(outlier_batch=20, eps=0.05, outlier_sources=["noise", "letters"], attack_steps=5,
                             attack_step_size=0.1)
    starts = ood_sets.noise_images("uniform", 100, SHAPE, seed=9)
    reached = {}
    for fraction in (0.0, 0.5):
        config["defence"]["box_attack_fraction"] = fraction
        model, metrics = defences.with_discriminator(classifier, tiny_data, config, **SILENT)
        assert metrics["in_fraction"] > 0.9  # The test digits stay "in" either way.
        scores = keras.Model(model.input, model.get_layer(cnn.DISCRIMINATOR_PREFIX + "logits").output)
        attacked = defences.ascend(scores, starts, 0.0, 1.0, 40, 0.05, defences.in_log_probability)
        reached[fraction] = np.median(softmax(scores(attacked))[:, 1])
    # A longer attack than training's (40 steps, not 5) finds less "in" where training saw attacked noise.
    assert reached[0.5] < 0.5 * reached[0.0], reached


def test_a_collapsed_discriminator_is_reported_loudly(capsys):
    defences._warn_if_collapsed(0.0, 0.3)  # Fashion-MNIST's: p(in) = 0.5 for every image.
    assert "PROOD DISCRIMINATOR COLLAPSED: it calls 0.0% of the test images \"in\"" in capsys.readouterr().err
    defences._warn_if_collapsed(0.979, 0.3)  # MNIST's, seed 2.
    assert capsys.readouterr().err == ""


def test_proc_mnist_trains_the_classifier_then_its_discriminator(tiny_npz, tmp_path):
    import keras

    config = configurator.merge_config(configurator.default_config(), tiny_options(20), "test")
    config["data"]["validation_size"], config["train"]["log_every"] = 100, 10
    config["defence"].update(method="prood", outlier_batch=8)
    (tmp_path / "prood.toml").write_text(configurator.dump_toml(config))
    assert proc_mnist.main([str(tmp_path / "prood.toml"), "--data", str(tiny_npz), "--out", str(tmp_path / "run")]) == 0
    assert cnn.is_combined(keras.models.load_model(tmp_path / "run" / "model.keras"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["discriminator"]["steps"] == 20 and metrics["steps"] == 20


def test_a_study_with_target_prood_keeps_the_classifier_and_judges_the_combined_model(trained_tiny, tiny_npz,
                                                                                      tmp_path):
    arguments = quick_study_arguments(trained_tiny, tiny_npz, tmp_path) + ["--target", "prood", "--set",
                                                                          "defence.outlier_batch=8"]
    assert preprocess_data.main(arguments) == 0
    report = json.loads((tmp_path / "aug" / "report.json").read_text())
    assert report["complete"] and report["target"] == "prood" and report["rounds"][1]["train_steps"] == 5
    assert report["rounds"][1]["evaluation"]["ball"]["uniform"]["certified"] is not None
    assert 0 <= report["rounds"][1]["discriminator_in_fraction"] <= 1
    assert cnn.is_combined(cnn.load_trained_model(tmp_path / "aug" / "model.keras"))


@pytest.mark.parametrize("flags, message", [
    (["--rounds", "2"], "--target prood trains its discriminator once, beside the classifier; use --rounds 1"),
    (["--from-scratch"], "--target prood keeps the classifier as it is; drop --from-scratch"),
])
def test_prood_refuses_what_it_cannot_do_in_one_line(tmp_path, flags, message):
    args = preprocess_data.parse_arguments(["--results", "r", "--model", str(tmp_path / "model.keras"),
                                            "--target", "prood", *flags])
    with pytest.raises(UserError, match=message):
        preprocess_data.resolve_config(args)


def test_proc_mnist_refuses_prood_in_mixed_precision_before_training(tiny_npz, tmp_path):
    config = configurator.merge_config(configurator.default_config(), tiny_options(20), "test")
    config["data"]["validation_size"] = 100
    config["defence"]["method"] = "prood"
    config["train"].update(mixed_precision="mixed_bfloat16", mixed_precision_force=True)
    (tmp_path / "prood.toml").write_text(configurator.dump_toml(config))
    with pytest.raises(UserError, match="defence 'prood' bounds its discriminator in float32"):
        proc_mnist.main([str(tmp_path / "prood.toml"), "--data", str(tiny_npz), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "model.keras").exists()
