import numpy as np
import pytest

import cnn
import proc_mnist
from conftest import tiny_topology


def reference_size(size, window, stride, padding):
    """Output length by counting window positions, the way the op defines it."""
    if padding == "VALID":
        return len(range(0, size - window + 1, stride))
    return len(range(0, size, stride))


@pytest.mark.parametrize("size,window,stride,padding", [
    (28, 5, 1, "SAME"), (28, 5, 2, "SAME"), (13, 3, 2, "SAME"), (28, 5, 1, "VALID"),
    (13, 3, 2, "VALID"), (7, 2, 3, "VALID"), (4, 5, 1, "VALID"), (1, 2, 2, "SAME"),
])
def test_spatial_size_matches_window_count(size, window, stride, padding):
    assert cnn._spatial_size(size, window, stride, padding) == reference_size(size, window, stride, padding)


def test_layer_shapes_follow_padding_and_strides():
    topology = tiny_topology(
        image_dim_size=[13, 11, 2],
        conv_layers=[{"filter": [3, 3, 2, 4], "strides": [1, 2, 1, 1], "padding": "VALID", "act_fn": "relu"},
                     {"filter": [2, 2, 4, 5], "strides": [1, 1, 2, 1], "padding": "SAME", "act_fn": "tanh"}],
        pool_layers=[{"filter": [1, 2, 2, 1], "strides": [1, 2, 2, 1], "padding": "SAME"}, None],
        num_fc_units=[7, 3])
    model = proc_mnist.build_model(topology)
    height = reference_size(reference_size(13, 3, 2, "VALID"), 2, 2, "SAME")
    width = reference_size(reference_size(11, 3, 1, "VALID"), 2, 2, "SAME")
    assert model.get_layer("conv1").output.shape[1:] == (height, width, 4)
    assert model.get_layer("conv2").output.shape[1:] == (reference_size(height, 2, 1, "SAME"),
                                                          reference_size(width, 2, 2, "SAME"), 5)
    assert model.get_layer("fc1").output.shape[1:] == (7,)
    assert model.get_layer("fc2").output.shape[1:] == (3,)
    assert model.get_layer("logits").output.shape[1:] == (10,)
    probabilities = np.asarray(model(np.random.rand(2, 13, 11, 2).astype("float32")))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def im2col_convolution(images, kernel, bias, stride, padding):
    """A NumPy reference for tf.nn.conv2d: gather every window as a row, then one matmul."""
    window_h, window_w, _, _ = kernel.shape
    if padding == "SAME":
        out_h, out_w = -(-images.shape[1] // stride), -(-images.shape[2] // stride)
        pad_h = max((out_h - 1) * stride + window_h - images.shape[1], 0)
        pad_w = max((out_w - 1) * stride + window_w - images.shape[2], 0)
        images = np.pad(images, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    out_h = (images.shape[1] - window_h) // stride + 1
    out_w = (images.shape[2] - window_w) // stride + 1
    columns = np.stack([
        images[:, y * stride:y * stride + window_h, x * stride:x * stride + window_w, :].reshape(len(images), -1)
        for y in range(out_h) for x in range(out_w)], axis=1)  # (batch, positions, window)
    output = columns @ kernel.reshape(-1, kernel.shape[-1]) + bias
    return output.reshape(len(images), out_h, out_w, -1)


@pytest.mark.parametrize("padding,stride", [("SAME", 1), ("VALID", 2), ("SAME", 2)])
def test_conv_layer_matches_numpy_im2col(padding, stride):
    import keras

    topology = tiny_topology(
        image_dim_size=[9, 9, 3],
        conv_layers=[{"filter": [3, 3, 3, 5], "strides": [1, stride, stride, 1], "padding": padding,
                      "act_fn": "relu"}],
        pool_layers=[None])
    model = proc_mnist.build_model(topology)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 9, 9, 3)).astype(np.float32)
    conv = model.get_layer("conv1_conv")
    conv.set_weights([rng.normal(size=(3, 3, 3, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32)])
    kernel, bias = conv.get_weights()
    block = keras.Model(model.input, model.get_layer("conv1").output)
    expected = np.maximum(im2col_convolution(images, kernel, bias, stride, padding), 0)
    np.testing.assert_allclose(np.asarray(block(images)), expected, rtol=1e-4, atol=1e-4)


def numpy_input_gradient(upstream, kernel, padding):
    """A NumPy reference: every output position sends upstream x kernel back to the pixels it read."""
    batch, out_h, out_w, _ = upstream.shape
    window_h, window_w, channels, _ = kernel.shape
    top, left = ((window_h - 1) // 2, (window_w - 1) // 2) if padding == "SAME" else (0, 0)
    in_h, in_w = (out_h, out_w) if padding == "SAME" else (out_h + window_h - 1, out_w + window_w - 1)
    padded = np.zeros((batch, in_h + window_h - 1, in_w + window_w - 1, channels))
    for y in range(out_h):
        for x in range(out_w):  # Output (y, x) read padded rows y.. and columns x.. of one window.
            padded[:, y:y + window_h, x:x + window_w, :] += np.einsum("bo,hwio->bhwi", upstream[:, y, x, :], kernel)
    return padded[:, top:top + in_h, left:left + in_w, :]


@pytest.mark.parametrize("padding,window", [("SAME", (5, 5)), ("SAME", (4, 3)), ("VALID", (5, 5)), ("VALID", (2, 3))])
def test_single_channel_input_gradient_matches_numpy(padding, window):
    import tensorflow as tf

    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(*window, 1, 6))
    out_h, out_w = (7, 8) if padding == "SAME" else (7 - window[0] + 1, 8 - window[1] + 1)
    upstream = rng.normal(size=(3, out_h, out_w, 6))
    ours = cnn.single_channel_input_gradient(tf.constant(upstream), tf.constant(kernel), padding)
    assert ours.shape == (3, 7, 8, 1)
    np.testing.assert_allclose(ours.numpy(), numpy_input_gradient(upstream, kernel, padding), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("padding,window", [("SAME", 3), ("VALID", 4)])
def test_input_gradient_model_gives_the_models_outputs_and_gradients(padding, window):
    import tensorflow as tf

    topology = tiny_topology()
    topology["conv_layers"][0] = {"filter": [window, window, 1, 4], "strides": [1, 1, 1, 1], "padding": padding,
                                  "act_fn": "relu"}
    model = cnn.logits_model(proc_mnist.build_model(topology))
    fast = cnn.input_gradient_model(model)
    assert type(fast.get_layer("conv1_conv")).__name__ == "SingleChannelConv2D"
    assert fast.get_layer("conv2_conv") is model.get_layer("conv2_conv")  # The rest is shared, not copied.
    rng = np.random.default_rng(2)
    images = tf.constant(rng.uniform(size=(4, *model.input_shape[1:])).astype(np.float32))
    weights = tf.constant(rng.normal(size=(4, 10)).astype(np.float32))

    def gradients(network):
        kernel = network.get_layer("conv1_conv").kernel
        with tf.GradientTape() as tape:
            tape.watch(images)
            outputs = network(images, training=False)
            total = tf.reduce_sum(weights * outputs)
        return [outputs, *tape.gradient(total, [images, kernel])]

    (outputs, image_gradient, kernel_gradient), expected = gradients(fast), gradients(model)
    np.testing.assert_array_equal(outputs.numpy(), expected[0].numpy())
    np.testing.assert_allclose(image_gradient.numpy(), expected[1].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kernel_gradient.numpy(), expected[2].numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(expected[1].numpy()).max() > 1e-3  # A gradient that means something.


@pytest.mark.parametrize("changes", [
    {"image_dim_size": [12, 12, 3], "conv_layers": [{"filter": [3, 3, 3, 4], "strides": [1, 1, 1, 1],
                                                     "padding": "SAME", "act_fn": "relu"}], "pool_layers": [None]},
    {"conv_layers": [{"filter": [3, 3, 1, 4], "strides": [1, 2, 2, 1], "padding": "SAME", "act_fn": "relu"}],
     "pool_layers": [None]},
])
def test_input_gradient_model_keeps_other_convolutions(changes):
    model = proc_mnist.build_model(tiny_topology(**changes))
    fast = cnn.input_gradient_model(model)
    assert fast.get_layer("conv1_conv") is model.get_layer("conv1_conv")


def test_names_reach_every_cost_layer():
    model = proc_mnist.build_model(tiny_topology(batch_norm=True, dropout=0.5))
    names = {layer.name for layer in model.layers}
    assert {"input", "conv1", "conv2", "fc1", "logits", "softmax", "conv1_bn", "fc1_bn"} <= names
    # fc1 is the value before its activation: it can be negative, unlike its ReLU.
    assert type(model.get_layer("fc1")).__name__ == "Dense"


def test_saved_model_loads_without_custom_objects(tmp_path):
    import keras

    model = proc_mnist.build_model(tiny_topology(batch_norm=True))
    path = tmp_path / "model.keras"
    cnn.save_model(model, path)
    loaded = keras.models.load_model(path)
    images = np.random.rand(3, 12, 12, 1).astype("float32")
    np.testing.assert_allclose(np.asarray(loaded(images)), np.asarray(model(images)), rtol=1e-5, atol=1e-6)
    assert not list(tmp_path.glob(".*")), "the temporary file was left behind"


@pytest.mark.parametrize("changes,message", [
    ({"conv_layers": [{"filter": [3, 3, 2, 4], "strides": [1, 1, 1, 1], "padding": "SAME", "act_fn": "relu"},
                      {"filter": [3, 3, 4, 6], "strides": [1, 1, 1, 1], "padding": "SAME", "act_fn": "relu"}]},
     "conv layer 1: filter in-channels 2 do not match the 1 channels"),
    ({"pool_layers": [None]}, "2 conv layers but 1 pool layers"),
    ({"conv_layers": [{"filter": [3, 3, 1, 4], "strides": [1, 1, 1, 1], "padding": "FULL", "act_fn": "relu"},
                      {"filter": [3, 3, 4, 6], "strides": [1, 1, 1, 1], "padding": "SAME", "act_fn": "relu"}]},
     "conv layer 1: padding 'FULL' is unknown"),
    ({"conv_layers": [{"filter": [3, 3, 1, 4], "strides": [1, 1, 1, 1], "padding": "SAME", "act_fn": "relux"},
                      {"filter": [3, 3, 4, 6], "strides": [1, 1, 1, 1], "padding": "SAME", "act_fn": "relu"}]},
     "conv layer 1: activation 'relux' is unknown"),
    ({"conv_layers": [{"filter": [13, 13, 1, 4], "strides": [1, 1, 1, 1], "padding": "VALID", "act_fn": "relu"},
                      {"filter": [3, 3, 4, 6], "strides": [1, 1, 1, 1], "padding": "SAME", "act_fn": "relu"}]},
     "shrinks to 0x0"),
    ({"num_fc_units": [16, 0]}, "num_fc_units"),
    ({"conv_layers": [3, {"filter": [3, 3, 4, 6]}]}, "model.conv_layers = .* must be a list of at most 64 tables"),
    ({"conv_layers": [{"filter": [3, 3, 1, 10**6], "strides": [1, 1, 1, 1], "padding": "SAME"},
                      {"filter": [3, 3, 4, 6], "strides": [1, 1, 1, 1], "padding": "SAME"}]},
     "conv layer 1: filter must be four ints between 1 and 4096"),
    ({"num_fc_units": 10**7}, "must be one or more sizes between 1 and 65536"),
])
def test_impossible_topologies_name_the_layer_and_fix(changes, message):
    with pytest.raises(ValueError, match=message):
        proc_mnist.build_model(tiny_topology(**changes))


def test_callable_activation_and_square_int_size():
    import keras

    model = proc_mnist.build_model(tiny_topology(
        image_dim_size=12,
        conv_layers=[{"filter": [3, 3, 1, 4], "strides": [1, 1, 1, 1], "padding": "SAME",
                      "act_fn": keras.activations.elu}], pool_layers=[{}], num_fc_units=8))
    assert model.input_shape == (None, 12, 12, 1)
    assert model.get_layer("conv1").output.shape[1:] == (12, 12, 4)  # {} means no pooling.
