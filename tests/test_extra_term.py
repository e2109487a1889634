"""The trainer's plug-in for defences: an extra loss term on an extra batch, in the same step."""
import numpy as np
import pytest

import cnn
import trainer
from common import UserError
from conftest import IMAGE_SIZE, tiny_options, tiny_topology

SILENT = {"progress": lambda line: None}


def test_uniform_label_loss_is_the_cross_entropy_against_the_uniform_label():
    logits = np.array([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0], [10.0, 0.0, -10.0]], np.float32)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -log_softmax.mean(axis=1)  # -sum_k (1/K) log p_k
    np.testing.assert_allclose(np.asarray(trainer.uniform_label_loss(logits)), expected, rtol=1e-6)
    # Smallest (log K, its gradient zero) exactly at the uniform output, large when confident.
    assert abs(expected[1] - np.log(3)) < 1e-6 and expected.min() == expected[1] and expected[2] > 5


def noise_term(count, weight, seen_steps=None):
    """An ExtraTerm that draws count uniform-noise images per step (seeded by the step) towards the uniform label."""
    import tensorflow as tf

    def draw(step):
        if seen_steps is not None:
            seen_steps.append(step)
        return tf.random.stateless_uniform([count, IMAGE_SIZE, IMAGE_SIZE, 1], tf.stack([tf.constant(7, tf.int64), step]))

    return trainer.ExtraTerm(draw=draw, loss=lambda logits, images: trainer.uniform_label_loss(logits), weight=weight)


def test_the_step_loss_is_class_cross_entropy_plus_the_weighted_extra_loss(tiny_data):
    import tensorflow as tf

    model = cnn.build_model(tiny_topology())
    trainer.compile_for_training(model, 1e-3)
    term = noise_term(5, weight=0.5)
    images, labels = tiny_data["x_train"][:8], tiny_data["y_train"][:8]
    targets = trainer.to_targets(labels, 10)
    loss, gradients = trainer._gradient_function(model, None, False, term)(tf.constant(images), tf.constant(targets))

    # By hand: the two batches through the model separately (no batch norm, no dropout: the same numbers).
    extra = term.draw(tf.constant(0, tf.int64))
    scores = cnn.logits_model(model)
    with tf.GradientTape() as tape:
        class_logits, extra_logits = scores(images), scores(extra)
        class_loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(targets, class_logits))
        extra_loss = tf.reduce_mean(tf.reduce_logsumexp(extra_logits, axis=1) - tf.reduce_mean(extra_logits, axis=1))
        expected = class_loss + 0.5 * extra_loss
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    assert float(0.5 * extra_loss) > 1e-3  # The extra term is a real part of the loss here.
    for actual, wanted in zip(gradients, tape.gradient(expected, model.trainable_variables)):
        np.testing.assert_allclose(np.asarray(actual), np.asarray(wanted), rtol=1e-4, atol=1e-6)


def test_a_zero_weight_term_trains_exactly_as_no_term(tiny_data):
    plain, _ = trainer.train(tiny_data, tiny_options(num_steps=10), **SILENT)
    with_term, _ = trainer.train(tiny_data, tiny_options(num_steps=10), extra_term=noise_term(4, 0.0), **SILENT)
    for expected, actual in zip(plain.get_weights(), with_term.get_weights()):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7)


def test_training_noise_towards_the_uniform_label_flattens_the_output_on_noise(tiny_data):
    rng = np.random.default_rng(3)
    fresh_noise = rng.uniform(0, 1, (200, IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    plain, plain_metrics = trainer.train(tiny_data, tiny_options(num_steps=150), **SILENT)
    defended, metrics = trainer.train(tiny_data, tiny_options(num_steps=150), extra_term=noise_term(20, 1.0), **SILENT)
    plain_confidence = cnn.predict(plain, fresh_noise).max(axis=1).mean()
    defended_confidence = cnn.predict(defended, fresh_noise).max(axis=1).mean()
    assert plain_confidence > 0.5 and defended_confidence < 0.2  # 0.1 is the uniform output of 10 classes.
    assert metrics["test_accuracy"] > 0.9  # The class images are still learnt.


def test_the_draw_sees_the_optimizer_step_so_a_resumed_run_draws_the_same(tiny_data):
    steps = []
    model = cnn.build_model(tiny_topology())
    trainer.compile_for_training(model, 1e-3)
    run_steps = trainer.make_train_function(model, tiny_data["x_train"], trainer.to_targets(tiny_data["y_train"], 10),
                                            extra_term=noise_term(2, 1.0, steps))
    run_steps(trainer.batch_indices(len(tiny_data["x_train"]), 20, 0, 0, 3))
    assert len(steps) == 1 and steps[0].dtype.name == "int64"  # Traced once, in the graph: a tensor, not a number.
    assert int(model.optimizer.iterations.numpy()) == 3


def test_an_extra_term_with_a_distribution_strategy_is_refused(tiny_data):
    import tensorflow as tf

    model = cnn.build_model(tiny_topology())
    trainer.compile_for_training(model, 1e-3)
    with pytest.raises(UserError, match='extra loss term .* set train.distribute = "none"'):
        trainer.make_train_function(model, tiny_data["x_train"], trainer.to_targets(tiny_data["y_train"], 10),
                                    strategy=tf.distribute.get_strategy(), extra_term=noise_term(2, 1.0))
