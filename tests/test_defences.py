"""defences: each term's loss by hand, ACET's attack inside its ball, GOOD's bound above every attack, an
outlier pool apart from the evaluation's sets, training that lowers confidence on noise, and one-line errors."""
import json

import numpy as np
import pytest

import cnn
import configurator
import defences
import ood_sets
import preprocess_data
import proc_mnist
import trainer
from common import UserError
from conftest import IMAGE_SIZE, tiny_options, tiny_topology
from helpers import quick_study_arguments, record_retraining

SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 1)
SILENT = {"progress": lambda line: None}


def new_model():
    """A tiny model without batch norm or dropout: its training pass is its inference pass, as a hand check needs."""
    model = cnn.build_model(tiny_topology())
    return trainer.compile_for_training(model, 1e-3)


def log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def test_every_study_target_with_a_term_has_a_defence():
    assert set(defences.TERMS) | set(defences.CLASSIFIER_KEPT) == set(configurator.DEFENCE_TERMS) == set(defences.PARAMETERS)
    assert set(configurator.DEFENCE_TERMS) < set(configurator.DEFENCES)


@pytest.mark.parametrize("method, weight", [("outlier_exposure", 0.5), ("acet", 1.0)])
def test_the_step_loss_is_class_cross_entropy_plus_the_weighted_uniform_label_loss(tiny_data, method, weight):
    """By hand in NumPy: the class half's cross-entropy plus weight x the extra half's cross-entropy against 1/K."""
    import tensorflow as tf

    model = new_model()
    term = defences.make_term(method, model, tiny_data["x_train"], {"outlier_batch": 6, "attack_steps": 3}, 100)
    assert term.weight == weight  # The paper's, from configs/default.toml.
    images, labels = tiny_data["x_train"][:8], tiny_data["y_train"][:8]
    targets = trainer.to_targets(labels, 10)
    loss, _ = trainer._gradient_function(model, None, False, term)(tf.constant(images), tf.constant(targets))

    extra = term.draw(tf.constant(0, tf.int64)).numpy()  # Stateless: the step's batch again.
    assert extra.shape == (6, *SHAPE) and extra.min() >= 0 and extra.max() <= 1
    scores = cnn.logits_model(model)
    class_part = -(log_softmax(scores(images)) * targets).sum(axis=1).mean()
    uniform_part = -log_softmax(scores(extra)).mean(axis=1).mean()  # -sum_k (1/K) log p_k
    assert uniform_part > np.log(10) + 1e-4  # Not at its minimum: the term is a real part of the loss.
    np.testing.assert_allclose(float(loss), class_part + weight * uniform_part, rtol=1e-5)


def test_outlier_exposure_draws_rows_of_its_pool_by_seed_and_step(tiny_data):
    import tensorflow as tf

    parameters = {"outlier_batch": 16, "seed": 3}
    term = defences.outlier_exposure(new_model(), tiny_data["x_train"], parameters)
    pool = defences.outlier_pool(SHAPE, seed=3, source_images=tiny_data["x_train"]).reshape(defences.POOL_SIZE, -1)
    first, again, second = (term.draw(tf.constant(step, tf.int64)).numpy().reshape(16, -1) for step in (5, 5, 6))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, second)
    for row in np.concatenate([first, second]):
        assert np.any(np.all(pool == row, axis=1))


def one_dense_layer_model():
    """Flatten -> Dense(3) logits -> softmax: its interval bound on logit differences is exact and known by hand."""
    import keras
    from keras import layers

    inputs = keras.Input((4, 4, 1))
    logits = layers.Dense(3, name="logits")(layers.Flatten()(inputs))
    model = keras.Model(inputs, layers.Activation("softmax")(logits))
    rng = np.random.default_rng(0)
    model.get_layer("logits").set_weights([rng.normal(0, 1, (16, 3)), rng.normal(0, 1, 3)])
    return model


def test_good_loss_by_hand_the_bound_for_the_lowest_bounds_the_logit_spread_for_the_rest():
    model = one_dense_layer_model()
    kernel, bias = model.get_layer("logits").get_weights()
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 1, (5, 4, 4, 1)).astype(np.float32)
    logits = rng.normal(0, 3, (5, 3)).astype(np.float32)  # The training pass's: the spread comes from these.
    eps = 0.1
    lower, upper = np.clip(images - eps, 0, 1).reshape(5, -1), np.clip(images + eps, 0, 1).reshape(5, -1)
    centre, radius = (upper + lower) / 2, (upper - lower) / 2
    bounds = np.zeros(5)
    for k in range(3):
        for j in range(3):
            weights = kernel[:, k] - kernel[:, j]  # upper(z_k - z_j) = (b_k - b_j) + w . c + |w| . r
            bounds = np.maximum(bounds, bias[k] - bias[j] + centre @ weights + radius @ np.abs(weights))
    spreads = logits.max(axis=1) - logits.min(axis=1)
    lowest = np.argsort(bounds)[:3]  # floor(0.6 * 5) = 3 images get the bound.
    chosen = np.where(np.isin(np.arange(5), lowest), bounds, spreads)
    expected = np.log1p(chosen ** 2 / 2)
    actual = defences.good_loss(model, logits, images, eps, certified_fraction=0.6).numpy()
    assert not np.allclose(bounds, spreads)  # The two choices differ, so the split is tested.
    np.testing.assert_allclose(actual, expected, rtol=1e-5)


def test_good_ramps_eps_from_zero_over_its_fraction_of_the_steps(tiny_data):
    import tensorflow as tf

    model = new_model()
    term = defences.good(model, tiny_data["x_train"], {"outlier_batch": 8, "ramp_fraction": 0.5, "eps": 0.2},
                         num_steps=100)
    assert term.weight == 0.3
    images = term.draw(tf.constant(0, tf.int64))
    logits = cnn.logits_model(model)(images)
    for step, eps in [(0, 0.0), (25, 0.1), (50, 0.2), (90, 0.2)]:
        model.optimizer.iterations.assign(step)
        np.testing.assert_allclose(term.loss(logits, images).numpy(),
                                   defences.good_loss(model, logits, images, eps, 0.8).numpy(), rtol=1e-5)
    # At eps = 0 the bound is the logit spread itself: every image has the clean loss.
    model.optimizer.iterations.assign(0)
    spread = tf.reduce_max(logits, axis=1) - tf.reduce_min(logits, axis=1)
    np.testing.assert_allclose(term.loss(logits, images).numpy(), np.log1p(spread.numpy() ** 2 / 2), rtol=1e-4)


def acet_noise(tiny_data, count=64, seed=0):
    import tensorflow as tf

    sources = tf.constant(tiny_data["x_train"][:200])
    return defences.noise_batch(tf.constant([seed, 1], tf.int64), count, SHAPE, sources)


def max_confidence(model, images):
    return cnn.predict(model, np.asarray(images)).max(axis=1)


def test_noise_batches_are_noise_in_the_unit_box_the_same_for_the_same_key(tiny_data):
    noise = acet_noise(tiny_data).numpy()
    assert noise.shape == (64, *SHAPE) and noise.min() >= 0 and noise.max() <= 1
    np.testing.assert_array_equal(noise, acet_noise(tiny_data).numpy())
    assert not np.array_equal(noise, acet_noise(tiny_data, seed=1).numpy())
    stretched = np.isclose(noise.min(axis=(1, 2, 3)), 0) & np.isclose(noise.max(axis=(1, 2, 3)), 1)
    assert 0 < stretched.mean() < 1  # Some blurred and stretched, some not.


def test_acet_s_attack_raises_the_confidence_of_its_noise_and_stays_in_the_ball(trained_tiny, tiny_data):
    import tensorflow as tf

    model = cnn.load_trained_model(trained_tiny[0])
    noise = acet_noise(tiny_data)
    attacked = defences.attack_in_ball(cnn.logits_model(model), noise, 0.3, 10, 0.075,
                                       tf.constant([0, 2], tf.int64)).numpy()
    assert np.abs(attacked - noise.numpy()).max() <= 0.3 + 1e-6 and attacked.min() >= 0 and attacked.max() <= 1
    before, after = max_confidence(model, noise), max_confidence(model, attacked)
    assert after.mean() > before.mean() + 0.05 and np.mean(after > before) > 0.8

    # The term's draw is that attack on that step's noise: inside the ball of the same noise.
    term = defences.acet(model, tiny_data["x_train"], {"outlier_batch": 16, "eps": 0.1})
    drawn = term.draw(tf.constant(7, tf.int64)).numpy()
    sources = tf.constant(defences._permutation_sources(tiny_data["x_train"], 0))
    step_noise = defences.noise_batch(defences._key(0, 7, defences.NOISE_STREAM), 16, SHAPE, sources).numpy()
    distance = np.abs(drawn - step_noise).max()
    assert 0.05 < distance <= 0.1 + 1e-6


@pytest.mark.parametrize("trained, eps", [(True, 0.3), (False, 0.01)])
def test_the_certified_bound_lies_above_the_attacked_confidence(trained_tiny, tiny_data, trained, eps):
    """Trained, the model is confident and the bound over a 0.3-ball is 1; untrained, it is unsure and the
    bound over a 0.01-ball is below 1: above every attacked point either way."""
    import tensorflow as tf

    import interval_bounds

    model = cnn.load_trained_model(trained_tiny[0]) if trained else new_model()
    images = np.concatenate([acet_noise(tiny_data, 32).numpy(), tiny_data["x_test"][:32]])
    attacked = defences.attack_in_ball(cnn.logits_model(model), tf.constant(images), eps, 40, eps / 4,
                                       tf.constant([0, 3], tf.int64)).numpy()
    clean, confidence = max_confidence(model, images), max_confidence(model, attacked)
    lower, upper = (tf.constant(np.clip(images + sign * eps, 0, 1)) for sign in (-1, 1))
    tight = np.exp(interval_bounds.confidence_bound_tensor(model, lower, upper).numpy())
    spread = interval_bounds.logit_difference_bounds_tensor(model, lower, upper).numpy().max(axis=(1, 2))
    goods = np.exp(spread) / 10  # GOOD's loss lowers this: p_max <= exp(max upper(z_k - z_j)) / K.
    assert np.all(np.maximum(clean, confidence) <= tight + 1e-5) and np.all(tight <= goods + 1e-5)
    assert confidence.mean() > clean.mean()  # Not a trivial comparison: the attack found more confident points ...
    if not trained:
        assert tight.max() < 0.9, tight.max()  # ... and the bound is not 1.


def row_keys(images):
    return {row.tobytes() for row in np.asarray(images, np.float32).reshape(len(images), -1)}


def sorted_pixel_keys(images):
    """Each image's pixels sorted: equal for an image and any permutation of it."""
    return {row.tobytes() for row in np.sort(np.asarray(images, np.float32).reshape(len(images), -1), axis=1)}


def test_the_outlier_pool_holds_no_image_of_the_evaluation_s_sets(tiny_data):
    assert not set(ood_sets.TRAINING_FONTS) & set(ood_sets.EVALUATION_FONTS)
    assert not set(ood_sets.font_files(ood_sets.TRAINING_FONTS)) & set(ood_sets.font_files(ood_sets.EVALUATION_FONTS))
    size = 900
    pool = defences.outlier_pool(SHAPE, seed=0, source_images=tiny_data["x_train"], size=size)
    evaluation_letters = np.concatenate([ood_sets.letters(1000, SHAPE, seed)[0] for seed in range(3)])
    test_images = tiny_data["x_test"]
    assert not row_keys(pool) & row_keys(evaluation_letters)
    assert not row_keys(pool) & row_keys(test_images)
    assert not sorted_pixel_keys(pool) & sorted_pixel_keys(test_images)  # No permuted test image either.
    # The checks would catch a pool of the evaluation's kind: letters of the same fonts repeat, and
    # a pool that permuted test images matches them once sorted.
    shared_fonts = ood_sets.letters(size // 3, SHAPE, 5, ood_sets.EVALUATION_FONTS)[0]
    assert row_keys(shared_fonts) & row_keys(evaluation_letters)
    wrong_pool = defences.outlier_pool(SHAPE, ["noise"], seed=0, source_images=test_images, size=size)
    assert sorted_pixel_keys(wrong_pool) & sorted_pixel_keys(test_images)


def test_each_source_fills_its_share_of_the_pool_in_the_unit_box(tiny_data):
    for sources in (["photos"], ["letters"], ["noise"], ["photos", "letters", "noise"]):
        pool = defences.outlier_pool(SHAPE, sources, seed=1, source_images=tiny_data["x_train"], size=30)
        assert pool.shape == (30, *SHAPE) and pool.dtype == np.float32 and 0 <= pool.min() and pool.max() <= 1
        assert len(row_keys(pool)) == 30 and pool.std() > 0.05
    colour = defences.photo_crops(4, (10, 14, 3), seed=0)
    assert colour.shape == (4, 10, 14, 3) and not np.allclose(colour[..., 0], colour[..., 1])


@pytest.fixture(scope="module")
def plain_model(tiny_data):
    return trainer.train(tiny_data, tiny_options(num_steps=100), **SILENT)[0]


@pytest.mark.parametrize("method", ["outlier_exposure", "acet", "good"])
def test_training_with_each_defence_lowers_its_confidence_on_fresh_noise(tiny_data, plain_model, method):
    model = cnn.build_model(tiny_topology())
    trainer.compile_for_training(model, 1e-2)
    # GOOD80 costs a tiny model its classes in 100 steps (the bound at eps = 0.3 is loose); GOOD50 keeps them.
    parameters = {"outlier_batch": 20, "attack_steps": 5, "certified_fraction": 0.5}
    term = defences.make_term(method, model, tiny_data["x_train"], parameters, num_steps=100)
    defended, metrics = trainer.train(tiny_data, tiny_options(num_steps=100), model=model, extra_term=term, **SILENT)
    fresh = np.concatenate([ood_sets.noise_images(family, 100, SHAPE, seed=9)
                            for family in ("uniform", "low_frequency")])
    plain, after = max_confidence(plain_model, fresh).mean(), max_confidence(defended, fresh).mean()
    assert plain > 0.5 and after < plain - 0.2, (plain, after)
    assert metrics["test_accuracy"] > 0.8  # The classes are still learnt.


def test_batch_norm_frozen_runs_a_training_call_as_inference_and_restores_the_layers(tiny_data):
    model = cnn.build_model(tiny_topology(batch_norm=True))
    images = tiny_data["x_train"][:16]
    assert not np.allclose(model(images, training=True), model(images, training=False), atol=1e-4)
    with cnn.batch_norm_frozen(model):
        np.testing.assert_allclose(model(images, training=True), model(images, training=False), atol=1e-6)
        assert not any("_bn" in variable.path for variable in model.trainable_variables)
    assert all(layer.trainable for layer in cnn.batch_norm_layers(model)) and len(cnn.batch_norm_layers(model)) == 3


def test_a_bound_defence_trains_a_batch_norm_model_as_it_is_judged(tiny_data):
    """The bounds use the moving statistics, so GOOD trains with them: had the class loss run on batch
    statistics, the bound term could flatten the network at inference unseen (Fashion-MNIST: 10%)."""
    model, _ = trainer.train(tiny_data, tiny_options(num_steps=40, batch_norm=True), **SILENT)
    before = {layer.name: layer.get_weights() for layer in cnn.batch_norm_layers(model)}
    kernel = model.get_layer("conv1_conv").kernel.numpy().copy()
    model = trainer.compile_for_training(model, 1e-2)  # A fresh optimizer, as a study round's.
    term = defences.good(model, tiny_data["x_train"], {"outlier_batch": 8}, num_steps=20)
    assert term.frozen_batch_norm
    defended, metrics = trainer.train(tiny_data, tiny_options(num_steps=20, batch_norm=True), model=model,
                                      extra_term=term, **SILENT)
    assert metrics["steps"] == 20 and not np.allclose(kernel, defended.get_layer("conv1_conv").kernel.numpy())
    for layer in cnn.batch_norm_layers(defended):  # Statistics, scale and offset as they were; trainable again.
        assert layer.trainable
        for was, now in zip(before[layer.name], layer.get_weights()):
            np.testing.assert_array_equal(was, now)


def test_a_bound_defence_refuses_batch_norm_that_never_saw_data(tiny_data):
    model = trainer.compile_for_training(cnn.build_model(tiny_topology(batch_norm=True)), 1e-3)
    with pytest.raises(UserError, match="defence 'good' trains with batch normalisation frozen .* conv1_bn's were "
                                        "never measured .* --target good"):
        defences.good(model, tiny_data["x_train"], {"outlier_batch": 8}, num_steps=20)
    assert defences.outlier_exposure(model, tiny_data["x_train"], {"outlier_batch": 8}).frozen_batch_norm is False


def test_proc_mnist_trains_a_defence_from_scratch_and_resumes_it(tiny_npz, tmp_path, monkeypatch):
    terms, real_train = [], trainer.train_prepared

    def recording_train(*args, extra_term=None, **kwargs):
        terms.append(extra_term)
        return real_train(*args, extra_term=extra_term, **kwargs)

    monkeypatch.setattr(trainer, "train_prepared", recording_train)
    config = configurator.merge_config(configurator.default_config(), tiny_options(20), "test")
    config["data"]["validation_size"], config["train"]["log_every"] = 100, 10
    config["defence"].update(method="acet", outlier_batch=8, attack_steps=2)
    (tmp_path / "acet.toml").write_text(configurator.dump_toml(config))
    run = ["--data", str(tiny_npz), "--out", str(tmp_path / "run")]
    assert proc_mnist.main([str(tmp_path / "acet.toml"), *run]) == 0
    assert proc_mnist.main([*run, "--resume", "--steps", "30"]) == 0  # The saved config names the defence.
    assert [term.weight for term in terms] == [1.0, 1.0]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 30
    assert configurator.saved_config(tmp_path / "run" / "config.toml")["defence"]["method"] == "acet"


@pytest.mark.parametrize("override, message", [
    ("defence.eps=0", r"defence.eps = 0.0 must be in \(0, 1\]"),
    ("defence.eps=1.5", r"defence.eps = 1.5 must be in \(0, 1\]"),
    ("defence.acet_weight=-1", "defence.acet_weight = -1.0 must be 0 or more"),
    ("defence.outlier_exposure_weight=nan", "defence.outlier_exposure_weight = nan must be a finite number"),
    ("defence.method=mixup", "defence.method 'mixup' is unknown"),
    ("defence.outlier_sources=[\"cifar\"]", "defence.outlier_sources"),
])
def test_a_bad_defence_value_is_one_line(override, message):
    with pytest.raises(UserError, match=message):
        configurator.load_config(None, [override])


def test_a_defence_function_checks_its_parameters_by_the_same_rules(tiny_data):
    with pytest.raises(UserError, match=r"defences.acet: defence.eps = 2.0 must be in \(0, 1\]"):
        defences.acet(new_model(), tiny_data["x_train"], {"eps": 2.0})
    with pytest.raises(UserError, match="unknown key defence.steps"):
        defences.good(new_model(), tiny_data["x_train"], {"steps": 3}, num_steps=10)


def test_a_defence_with_a_distribution_strategy_is_refused_before_any_work(tmp_path):
    with pytest.raises(UserError, match="defence 'acet' draws its extra batch .* set train.distribute = \"none\""):
        proc_mnist.main(["--set", "defence.method=acet", "--set", "train.distribute=mirrored", "--out", str(tmp_path)])
    args = preprocess_data.parse_arguments(["--results", "r", "--model", str(tmp_path / "model.keras"),
                                            "--target", "good", "--set", "train.distribute=mirrored"])
    with pytest.raises(UserError, match="defence 'good' draws its extra batch"):
        preprocess_data.resolve_config(args)


def test_a_missing_outlier_source_is_one_line(monkeypatch):
    import sklearn.datasets

    def missing(*args, **kwargs):
        raise OSError("No such file or directory: 'china.jpg'")

    monkeypatch.setattr(sklearn.datasets, "load_sample_images", missing)
    with pytest.raises(UserError, match="outlier source \"photos\" needs scikit-learn's sample photos.*china.jpg"):
        defences.outlier_pool(SHAPE, ["photos"], size=10)


def test_a_study_with_target_acet_retrains_with_its_term_and_adds_no_image(trained_tiny, tiny_npz, tmp_path,
                                                                           monkeypatch):
    trained_on, terms = [], []
    record_retraining(monkeypatch, lambda data: trained_on.append(len(data["x_train"])))
    real_train = trainer.train

    def recording_train(*args, extra_term=None, **kwargs):
        terms.append(extra_term)
        return real_train(*args, extra_term=extra_term, **kwargs)

    monkeypatch.setattr(trainer, "train", recording_train)
    arguments = quick_study_arguments(trained_tiny, tiny_npz, tmp_path)
    arguments += ["--target", "acet", "--set", "defence.outlier_batch=8", "--set", "defence.attack_steps=3"]
    assert preprocess_data.main(arguments) == 0
    report = json.loads((tmp_path / "aug" / "report.json").read_text())
    assert report["target"] == "acet" and report["complete"] and [m["round"] for m in report["rounds"]] == [0, 1]
    assert trained_on == [400]  # The training set alone, as the control's: no fooling, blank or noise image.
    assert len(terms) == 1 and terms[0].weight == 1.0
    assert report["rounds"][1]["train_steps"] == 5
    saved = configurator.saved_config(tmp_path / "aug" / "config.toml")
    assert saved["augment"]["target"] == "acet" and saved["defence"]["attack_steps"] == 3
