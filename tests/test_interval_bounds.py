"""interval_bounds: the certified bound holds at every point of the ball we can find, is exact where it
must be (eps = 0, one dense layer), grows with eps, and refuses in one line what it cannot bound."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cnn
import interval_bounds
from common import UserError
from conftest import IMAGE_SIZE, make_images, tiny_topology

SLACK = 1e-5  # Float32 rounding: the bound is computed by other operations than the model's forward pass.


def randomise(model, seed, gain=2.0):
    """Random weights large enough for confident outputs, and batch norms with moving statistics
    and some negative scales (which swap the ends of an interval)."""
    from keras import layers

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            channels = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.3, 1.5, channels) * rng.choice([-1, 1], channels))
            layer.beta.assign(rng.normal(0, 0.5, channels))
            layer.moving_mean.assign(rng.normal(0, 0.5, channels))
            layer.moving_variance.assign(rng.uniform(0.2, 2.0, channels))
        elif layer.get_weights():
            kernel, *rest = layer.get_weights()
            fan_in = int(np.prod(kernel.shape[:-1]))
            layer.set_weights([rng.normal(0, gain / np.sqrt(fan_in), kernel.shape)]
                              + [rng.normal(0, 0.3, bias.shape) for bias in rest])
    return model


def hand_built_model(seed=0):
    """Layers build_model does not make: a strided VALID convolution with its own activation, average
    pooling, batch norm after pooling, leaky_relu, a Dense with softplus, and 4 logits (3 classes and "none")."""
    import keras
    from keras import layers

    inputs = keras.Input((9, 8, 2), name="input")
    x = layers.Conv2D(4, 3, strides=2, padding="valid", activation="elu", name="conv1_conv")(inputs)
    x = layers.AveragePooling2D(2, padding="same", name="conv1_pool")(x)
    x = layers.BatchNormalization(name="conv1_bn")(x)
    x = layers.Activation("leaky_relu", name="conv1")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(6, activation="softplus", name="fc1")(x)
    x = layers.Dropout(0.3, name="fc1_dropout")(x)
    logits = layers.Dense(4, name="logits")(x)
    outputs = layers.Activation("softmax", name="softmax")(logits)
    return randomise(keras.Model(inputs, outputs), seed)


def global_pooling_model(seed=0):
    """Max pooling over the whole image into a sigmoid layer, 3 classes."""
    import keras
    from keras import layers

    inputs = keras.Input((6, 6, 1), name="input")
    x = layers.Conv2D(5, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.GlobalMaxPooling2D(name="pool")(x)
    x = layers.Dense(4, activation="sigmoid", name="fc1")(x)
    logits = layers.Dense(3, name="logits")(x)
    return randomise(keras.Model(inputs, layers.Activation("softmax", name="softmax")(logits)), seed, gain=4.0)


def relu_model():
    return randomise(cnn.build_model(tiny_topology()), seed=1)


def batch_norm_model():
    """build_model's batch norm, dropout, tanh convolutions and sigmoid dense layer."""
    topology = tiny_topology(batch_norm=True, dropout=0.5, fc_act_fn="sigmoid")
    for conv in topology["conv_layers"]:
        conv["act_fn"] = "tanh"
    return randomise(cnn.build_model(topology), seed=2, gain=4.0)


MODELS = {"relu": relu_model, "batch_norm": batch_norm_model, "hand_built": hand_built_model,
          "global_pooling": global_pooling_model}


def ood_images(model, count=3, seed=0):
    """Uniform noise, dim noise (its ball is clipped at 0) and a bright-bar image (clipped at 1)."""
    rng = np.random.default_rng(seed)
    shape = model.input_shape[1:]
    images = [rng.uniform(0, 1, shape), rng.uniform(0, 0.2, shape)]
    if shape == (IMAGE_SIZE, IMAGE_SIZE, 1):
        images.append(make_images(1, seed)[0][0][..., None] / 255)
    else:
        images.append(np.where(rng.uniform(0, 1, shape) < 0.3, 1.0, 0.0))
    return np.array(images[:count], np.float32)


def ball(images, eps):
    return np.clip(images - eps, 0, 1), np.clip(images + eps, 0, 1)


def sampled_points(images, eps, rng, num_uniform=200, num_corners=50):
    """(N, num_uniform + num_corners, ...): uniform points of each ball in the box and random corners of it."""
    lower, upper = ball(images, eps)
    shape = (len(images), num_uniform + num_corners, *images.shape[1:])
    fraction = rng.uniform(0, 1, shape)
    fraction[:, num_uniform:] = fraction[:, num_uniform:] < 0.5  # Corners: each pixel at one end.
    return (lower[:, None] + fraction * (upper - lower)[:, None]).astype(np.float32)


def pgd_points(model, images, eps, rng, num_steps=30):
    """(N, K * num_steps, ...): every iterate of sign-gradient ascent on log p_k, for every class k,
    projected into each ball; the strongest simple attack on the bound."""
    import tensorflow as tf

    classes = model.output_shape[-1]
    lower, upper = (np.repeat(bound, classes, axis=0) for bound in ball(images, eps))  # (N K, ...)
    points = tf.constant(lower + rng.uniform(0, 1, lower.shape).astype(np.float32) * (upper - lower))
    targets = np.tile(np.arange(classes), len(images))
    logits = cnn.logits_model(model)
    iterates = []
    for _ in range(num_steps):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(points)
            log_probabilities = tf.nn.log_softmax(logits(points, training=False))
            chosen = tf.gather(log_probabilities, targets, axis=1, batch_dims=1)
        step = eps / 8 * tf.sign(tape.gradient(chosen, points))
        points = tf.clip_by_value(points + step, lower, upper)
        iterates.append(points.numpy().reshape(len(images), classes, *images.shape[1:]))
    return np.concatenate(iterates, axis=1)


def outputs_at(model, points):
    """Probabilities and logits at points (N, M, ...), each (N, M, K)."""
    flat = points.reshape(-1, *points.shape[2:])
    probabilities = cnn.predict(model, flat)
    logits = cnn.predict(cnn.logits_model(model), flat)
    return (probabilities.reshape(*points.shape[:2], -1), logits.reshape(*points.shape[:2], -1))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bounds_hold_at_sampled_corner_and_attacked_points(name):
    model = MODELS[name]()
    rng = np.random.default_rng(3)
    images = ood_images(model)
    for eps in (0.05, 0.3):
        bounds = interval_bounds.probability_upper_bounds(model, images, eps)
        lower, upper = interval_bounds.logit_bounds(model, images, eps)
        points = np.concatenate([sampled_points(images, eps, rng), pgd_points(model, images, eps, rng)], axis=1)
        probabilities, logits = outputs_at(model, points)
        assert np.all(probabilities <= bounds[:, None] + SLACK), f"{name}, eps {eps}"
        logit_slack = SLACK * (1 + np.abs(logits))
        assert np.all(lower[:, None] - logit_slack <= logits) and np.all(logits <= upper[:, None] + logit_slack)
        # Not vacuous: the attack moved each class's probability above the centre's.
        centre = cnn.predict(model, images)
        assert np.all(probabilities.max(axis=1) >= centre) and np.any(probabilities.max(axis=1) > centre + 1e-3)
    # Not vacuous: at a small radius the bound on the top class is below 1 for some image.
    assert interval_bounds.confidence_upper_bounds(model, images, 0.01).min() < 0.99


def test_confidence_is_the_top_bound_over_the_classes_asked_for():
    model = hand_built_model()  # 3 classes and a "none" output.
    images = ood_images(model)
    bounds = interval_bounds.probability_upper_bounds(model, images, 0.1)
    assert bounds.shape == (3, 4) and bounds.dtype == np.float64  # Judged in float64 (the module's Precision).
    np.testing.assert_array_equal(interval_bounds.confidence_upper_bounds(model, images, 0.1), bounds.max(axis=1))
    np.testing.assert_array_equal(interval_bounds.confidence_upper_bounds(model, images, 0.1, num_classes=3),
                                  bounds[:, :3].max(axis=1))
    with pytest.raises(UserError, match="num_classes 5 must be an int in 1-4"):
        interval_bounds.confidence_upper_bounds(model, images, 0.1, num_classes=5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_at_eps_zero_the_bounds_are_the_model_outputs(name):
    model = MODELS[name]()
    images = ood_images(model)
    lower, upper = interval_bounds.logit_bounds(model, images, 0)
    logits = cnn.predict(cnn.logits_model(model), images)
    np.testing.assert_allclose(lower, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(upper, logits, rtol=1e-5, atol=1e-5)
    probabilities = cnn.predict(model, images)
    assert probabilities.max() > 2 / probabilities.shape[1]  # Far from uniform: the comparison means something.
    np.testing.assert_allclose(interval_bounds.probability_upper_bounds(model, images, 0.0), probabilities,
                               rtol=1e-5, atol=1e-6)


def dense_model(kernel, bias):
    """Input -> Dense "logits" -> softmax, with the given weights."""
    import keras
    from keras import layers

    inputs = keras.Input((len(kernel),))
    logits = layers.Dense(len(bias), name="logits")(inputs)
    model = keras.Model(inputs, layers.Activation("softmax", name="softmax")(logits))
    model.get_layer("logits").set_weights([np.array(kernel, np.float32), np.array(bias, np.float32)])
    return model


def sigmoid(value):
    return 1 / (1 + np.exp(-value))


def test_one_dense_layer_two_classes_is_exact_by_hand():
    # z0 - z1 = 3 v1 - 2 v2 + 0.5 (columns (2, -1) and (-1, 1), biases 0.5 and 0), so p0 = sigmoid(z0 - z1).
    model = dense_model([[2, -1], [-1, 1]], [0.5, 0])
    images = np.array([[0.5, 0.5], [0.9, 0.1]], np.float32)
    bounds = interval_bounds.probability_upper_bounds(model, images, 0.25)
    # Ball of (0.5, 0.5): v in [0.25, 0.75]^2; max z0 - z1 = 2.25 - 0.5 + 0.5, max z1 - z0 = -(0.75 - 1.5 + 0.5).
    # Ball of (0.9, 0.1), clipped: v1 in [0.65, 1], v2 in [0, 0.35]; max z0 - z1 = 3.5, min = 1.95 - 0.7 + 0.5.
    expected = [[sigmoid(2.25), sigmoid(0.25)], [sigmoid(3.5), sigmoid(-1.75)]]
    np.testing.assert_allclose(bounds, expected, rtol=1e-6)
    # Exact: the box corner that attains each difference attains the bound.
    corners = np.array([[0.75, 0.25], [0.25, 0.75], [1, 0], [0.65, 0.35]], np.float32)
    attained = cnn.predict(model, corners)
    np.testing.assert_allclose([attained[0, 0], attained[1, 1], attained[2, 0], attained[3, 1]],
                               np.ravel(expected), rtol=1e-6)
    lower, upper = interval_bounds.logit_bounds(model, images[:1], 0.25)  # z0 = 2 v1 - v2 + 0.5, z1 = v2 - v1.
    np.testing.assert_allclose(np.concatenate([lower, upper]), [[0.25, -0.5], [1.75, 0.5]], rtol=1e-6)


def test_a_bound_that_is_exactly_the_bias_survives_large_cancelling_inputs():
    """A dead ProoD discriminator's case: after a ReLU, inputs in [0, ~300] meet weights whose difference
    is never positive, so max (z1 - z0) over the box is the bias difference, attained at lower = 0. Written
    as centre * W + radius * |W|, float32 lost 5e-4 of it to cancellation, below the attained value."""
    import tensorflow as tf
    from keras import layers

    rng = np.random.default_rng(0)
    layer = layers.Dense(2)
    layer.build((None, 1024))
    first = rng.uniform(-0.05, 0.05, 1024)
    layer.set_weights([np.stack([first, first - rng.uniform(0, 0.05, 1024)], axis=1).astype(np.float32),
                       np.array([0.0, -7e-6], np.float32)])
    upper = tf.constant(rng.uniform(0, 300, (4, 1024)), tf.float32)
    differences = interval_bounds._logit_difference_bounds(layer, tf.zeros_like(upper), upper).numpy()
    np.testing.assert_allclose(differences[:, 1, 0], -7e-6, atol=1e-9)  # Exact: every term is 0.


def reference_logit_bounds(kernels, biases, lower, upper):
    """Interval bounds of Dense -> relu -> ... -> Dense logits in NumPy float64: the formulas by hand."""
    for index, (kernel, bias) in enumerate(zip(kernels, biases)):
        centre, radius = (upper + lower) / 2, (upper - lower) / 2
        centre, radius = centre @ kernel + bias, radius @ np.abs(kernel)
        lower, upper = centre - radius, centre + radius
        if index < len(kernels) - 1:
            lower, upper = np.maximum(lower, 0), np.maximum(upper, 0)
    return lower, upper


def test_judging_bounds_keep_their_precision_where_a_hidden_layer_cancels():
    """A wide hidden layer with large weights: its centre and radius products (~10^4) cancel into small
    bounds. In float32 (a training loss's dtype) rounding moves them by 1e-3 or more; the judging entries
    (float64) agree with a float64 NumPy reference to 1e-9."""
    import keras
    import tensorflow as tf
    from keras import layers

    rng = np.random.default_rng(5)
    inputs = keras.Input((784,))
    hidden = layers.Dense(64, activation="relu", name="fc1")(inputs)
    logits = layers.Dense(3, name="logits")(hidden)
    model = keras.Model(inputs, layers.Activation("softmax", name="softmax")(logits))
    kernels = [rng.normal(0, 100, (784, 64)).astype(np.float32), rng.normal(0, 1, (64, 3)).astype(np.float32)]
    biases = [rng.normal(0, 10, 64).astype(np.float32), rng.normal(0, 1, 3).astype(np.float32)]
    for layer, kernel, bias in zip(model.layers[1:3], kernels, biases):
        layer.set_weights([kernel, bias])
    images = rng.uniform(0, 1, (5, 784)).astype(np.float32)
    eps = 0.01
    box = tuple(np.clip(images + sign * np.float32(eps), 0, 1).astype(np.float64) for sign in (-1, 1))
    expected = reference_logit_bounds([k.astype(np.float64) for k in kernels],
                                      [b.astype(np.float64) for b in biases], *box)
    judged = interval_bounds.logit_bounds(model, images, eps)
    assert all(bound.dtype == np.float64 for bound in judged)
    np.testing.assert_allclose(np.concatenate(judged), np.concatenate(expected), rtol=0, atol=1e-9)
    # The test can tell: the same bounds in float32 (the tensor entries given float32 boxes) are off.
    steps, logits_layer = interval_bounds.check_model_supported(model)
    float32_box = interval_bounds._propagate(steps, *(tf.constant(end, tf.float32) for end in box))
    float32_upper = interval_bounds._bound_dense(logits_layer, *float32_box)[1].numpy()
    assert np.abs(float32_upper - expected[1]).max() > 1e-4


def test_one_dense_layer_three_classes_against_every_corner():
    kernel = [[1.0, -2.0, 0.5], [0.5, 1.0, -1.0], [-1.0, 0.0, 2.0]]
    bias = [0.1, -0.2, 0.3]
    model = dense_model(kernel, bias)
    image = np.array([[0.5, 0.2, 0.95]], np.float32)
    bounds = interval_bounds.probability_upper_bounds(model, image, 0.1)
    # Each difference z_k - z_j is linear, so its maximum over the box is at one of its 8 corners.
    lower, upper = ball(image[0], 0.1)
    corners = np.array([[(lower, upper)[bit >> axis & 1][axis] for axis in range(3)] for bit in range(8)])
    logits = corners @ np.array(kernel) + np.array(bias)  # (8, 3)
    difference_upper = (logits[:, :, None] - logits[:, None, :]).max(axis=0)  # [k, j] = max z_k - z_j
    expected = 1 / np.exp(-difference_upper).sum(axis=1)
    np.testing.assert_allclose(bounds[0], expected, rtol=1e-6)
    # Tighter than softmax bounds from the logit intervals alone (upper z_k against lower z_j).
    logit_lower, logit_upper = logits.min(axis=0), logits.max(axis=0)
    lowest_differences = logit_lower[None, :] - logit_upper[:, None]  # [k, j] = lower z_j - upper z_k
    np.fill_diagonal(lowest_differences, 0)  # z_k - z_k is 0 whatever the intervals.
    loose = 1 / np.exp(lowest_differences).sum(axis=1)
    assert np.all(bounds[0] <= loose + 1e-7) and np.any(bounds[0] < loose - 1e-3)


def test_a_bigger_ball_never_gives_a_smaller_bound():
    model = relu_model()
    images = ood_images(model)
    radii = [0.0, 0.01, 0.05, 0.1, 0.3, 1.0]
    bounds = np.array([interval_bounds.probability_upper_bounds(model, images, eps) for eps in radii])
    assert np.all(np.diff(bounds, axis=0) >= -1e-7)
    assert np.all(bounds <= 1) and bounds[1].max() < bounds[-1].max()
    np.testing.assert_array_equal(bounds[-1][0], bounds[-1][1])  # At eps 1 every ball is the whole box.


@pytest.mark.parametrize("changes, message", [
    ({"fc_act_fn": "gelu"}, "layer 'fc1_act' uses activation 'gelu', which is not monotone"),
    ({"fc_act_fn": "swish"}, "layer 'fc1_act' uses activation 'silu', which is not monotone"),
])
def test_a_non_monotone_activation_is_refused_in_one_line(changes, message):
    model = cnn.build_model(tiny_topology(**changes))
    with pytest.raises(UserError, match=message) as refusal:
        interval_bounds.check_model_supported(model)
    assert "\n" not in str(refusal.value) and "such as relu" in str(refusal.value)
    with pytest.raises(UserError, match=message):
        interval_bounds.probability_upper_bounds(model, ood_images(model), 0.1)


def test_a_conv_with_a_non_monotone_activation_is_refused():
    topology = tiny_topology()
    topology["conv_layers"][0]["act_fn"] = "mish"
    with pytest.raises(UserError, match="layer 'conv1_act' uses activation 'mish'"):
        interval_bounds.check_model_supported(cnn.build_model(topology))


def unsupported_models():
    import keras
    from keras import layers

    inputs = keras.Input((4,))
    normalised = layers.LayerNormalization(name="norm")(inputs)
    yield r"layer 'norm' \(LayerNormalization\) has no interval bound; use the layers", keras.Model(
        inputs, layers.Activation("softmax")(layers.Dense(3, name="logits")(normalised)))
    hidden = layers.Dense(4, name="hidden")(inputs)
    branched = layers.Add(name="skip")([inputs, hidden])
    yield "layer 'skip' of model .* does not simply follow", keras.Model(
        inputs, layers.Activation("softmax")(layers.Dense(3)(branched)))
    yield "does not end in a Dense layer of logits followed by a softmax", cnn.logits_model(relu_model())


@pytest.mark.parametrize("index", range(3))
def test_an_unsupported_model_is_refused_in_one_line(index):
    message, model = list(unsupported_models())[index]
    with pytest.raises(UserError, match=message) as refusal:
        interval_bounds.check_model_supported(model)
    assert "\n" not in str(refusal.value)


@pytest.mark.parametrize("eps", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), "wide", None, True])
def test_a_radius_outside_zero_to_one_is_refused_in_one_line(eps):
    with pytest.raises(UserError, match=r"eps .* is not an l-infinity radius in \(0, 1\]; set eps") as refusal:
        interval_bounds.check_radius(eps)
    assert "\n" not in str(refusal.value)


def test_the_bound_functions_refuse_bad_radii_and_images_but_take_eps_zero():
    model = global_pooling_model()
    images = ood_images(model)
    assert interval_bounds.check_radius(1) == 1.0 and interval_bounds.check_radius(0, allow_zero=True) == 0.0
    for eps in (-0.1, float("nan"), 2):
        with pytest.raises(UserError, match=r"radius in \[0, 1\]"):
            interval_bounds.probability_upper_bounds(model, images, eps)
    with pytest.raises(UserError, match=r"pixels in \[0, 1\]"):
        interval_bounds.probability_upper_bounds(model, images * 2, 0.1)
    with pytest.raises(UserError, match="do not fit the model"):
        interval_bounds.probability_upper_bounds(model, images[:, :5], 0.1)
    assert interval_bounds.probability_upper_bounds(model, images[:0], 0.1).shape == (0, 3)


def test_batches_give_the_same_bounds_as_one_call():
    model = global_pooling_model()
    images = np.random.default_rng(4).uniform(0, 1, (7, 6, 6, 1)).astype(np.float32)
    whole = interval_bounds.probability_upper_bounds(model, images, 0.1)
    np.testing.assert_allclose(interval_bounds.probability_upper_bounds(model, images, 0.1, batch_size=3), whole,
                               rtol=1e-6)


def test_a_mixed_precision_model_is_bounded_in_float32():
    with cnn.precision_policy("mixed_bfloat16"):
        model = global_pooling_model()
    assert cnn.precision_of(model) == "mixed_bfloat16"
    images = ood_images(model)
    float32 = cnn.float32_model(model)
    bounds = interval_bounds.probability_upper_bounds(model, images, 0.0)
    assert bounds.dtype == np.float64  # The float32 copy's weights, judged in float64.
    np.testing.assert_allclose(bounds, cnn.predict(float32, images), rtol=1e-5, atol=1e-6)


def test_every_activation_called_monotone_is_monotone():
    import keras

    grid = np.linspace(-8, 8, 4001, dtype=np.float32)
    for name in interval_bounds.MONOTONE_ACTIVATIONS:
        values = np.asarray(keras.activations.get(name)(grid))
        # TensorFlow's float32 tanh steps back by up to 3e-7 near +-1: rounding, far inside SLACK.
        assert np.all(np.diff(values) >= -1e-6), name
    for name in ("gelu", "silu", "mish", "hard_silu"):  # The check can tell.
        assert np.any(np.diff(np.asarray(keras.activations.get(name)(grid))) < 0), name


def test_importing_the_module_loads_no_tensorflow():
    # A command that refuses a bad eps must answer before TensorFlow loads (tests/test_layout.py).
    code = "import sys, interval_bounds; print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(interval_bounds.__file__).parent,
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_the_tensor_entries_equal_the_numpy_bounds_and_have_gradients_in_the_weights():
    """confidence_bound_tensor is confidence_upper_bounds as TensorFlow ops (a training loss takes its gradient)."""
    import tensorflow as tf

    model = batch_norm_model()
    images = ood_images(model)
    lower, upper = (tf.constant(bound) for bound in ball(images, 0.1))
    with tf.GradientTape() as tape:
        log_bounds = interval_bounds.confidence_bound_tensor(model, lower, upper)  # (N,)
        differences = interval_bounds.logit_difference_bounds_tensor(model, lower, upper)  # (N, K, K)
        total = tf.reduce_sum(log_bounds)
    expected = interval_bounds.confidence_upper_bounds(model, images, 0.1)
    np.testing.assert_allclose(np.exp(log_bounds.numpy()), expected, rtol=1e-5)
    assert differences.shape == (len(images), 10, 10)
    assert np.allclose(np.diagonal(differences.numpy(), axis1=1, axis2=2), 0)  # z_k - z_k = 0.
    gradients = tape.gradient(total, model.trainable_variables)
    assert all(gradient is not None for gradient in gradients)
    assert sum(float(tf.reduce_sum(tf.abs(gradient))) for gradient in gradients) > 0  # Not a constant.


def test_the_log_bound_is_the_log_of_the_bound():
    model = relu_model()
    images = ood_images(model)
    for eps in (0.01, 0.3):
        log_bounds = interval_bounds.log_confidence_upper_bounds(model, images, eps, batch_size=2)
        bounds = interval_bounds.confidence_upper_bounds(model, images, eps)
        np.testing.assert_allclose(np.exp(log_bounds), bounds, rtol=1e-5)
        assert np.all(log_bounds <= 0)


def test_the_bounds_bench_runs_at_a_tiny_size(tmp_path, capsys):
    import importlib.util

    import configurator
    from conftest import tiny_options

    bench = Path(__file__).resolve().parents[1] / "bench" / "bench_bounds.py"
    spec = importlib.util.spec_from_file_location("bench_bounds", bench)
    bench_bounds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_bounds)
    config = tmp_path / "tiny.toml"
    config.write_text(configurator.dump_toml({"model": tiny_options()["model"]}))
    bench_bounds.main(["--config", str(config), "--points", "5", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("CPU: ") and "5 uniform-noise points, eps 0.3" in lines[1]
    text = "\n".join(lines)
    for words in ("judging bounds (float64)", "training bounds (float32)", "ratio float64 time / float32 time",
                  "largest |difference|"):
        assert words in text

