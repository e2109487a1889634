import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cnn
import common
import datasets
import guided_backprop
import proc_mnist
import results_format
from conftest import IMAGE_SIZE, fake_backwork_results, tiny_topology


def random_images(num_images, seed=0, size=IMAGE_SIZE):
    return np.random.default_rng(seed).random((num_images, size, size, 1)).astype(np.float32)


def tiny_model(seed=0, **changes):
    import keras

    keras.utils.set_random_seed(seed)
    return proc_mnist.build_model(tiny_topology(**changes))


# ------------------------------------------- guided maps against a hand-written backward pass


def every_relu_model(seed=0):
    """5x5 input; a ReLU inside Conv2D, an Activation layer, inside Dense and a ReLU layer."""
    import keras
    from keras import layers

    inputs = keras.Input((5, 5, 1))
    x = layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)  # (3, 3, 4)
    x = layers.Flatten()(x)  # (36,)
    x = layers.Activation("relu", name="fc1_act")(layers.Dense(16, name="fc1")(x))
    x = layers.Dense(12, activation="relu", name="fc2")(x)
    x = layers.ReLU(name="fc3_relu")(layers.Dense(10, name="fc3")(x))
    logits = layers.Dense(3, name="logits")(x)
    model = keras.Model(inputs, layers.Activation("softmax", name="softmax")(logits))
    rng = np.random.default_rng(seed)
    # Biases lean positive so that most units are active and gradients reach the image.
    model.set_weights([rng.normal(0.2 if weight.ndim == 1 else 0.0, 0.5, weight.shape).astype(np.float32)
                       for weight in model.get_weights()])
    return model


def numpy_input_gradient(weights, image, label, guided):
    """The forward and backward pass of every_relu_model for one (5, 5, 1) image, in NumPy."""
    kernel, conv_bias, w1, b1, w2, b2, w3, b3, w4, _ = weights
    corners = [(row, column) for row in range(3) for column in range(3)]
    patches = np.stack([image[row:row + 3, column:column + 3] for row, column in corners])  # (9, 3, 3, 1)
    conv = np.einsum("pabc,abcf->pf", patches, kernel) + conv_bias  # (positions, filters)
    z1 = np.maximum(conv, 0).reshape(-1) @ w1 + b1
    z2 = np.maximum(z1, 0) @ w2 + b2
    z3 = np.maximum(z2, 0) @ w3 + b3

    def through_relu(gradient, pre_activation):
        keep = pre_activation > 0
        return gradient * (keep & (gradient > 0) if guided else keep)

    gradient = w4[:, label]  # d logit / d relu(z3)
    gradient = w3 @ through_relu(gradient, z3)
    gradient = w2 @ through_relu(gradient, z2)
    gradient = w1 @ through_relu(gradient, z1)  # (positions * filters,)
    gradient = through_relu(gradient.reshape(conv.shape), conv)  # (positions, filters)
    image_gradient = np.zeros_like(image)
    for position, (row, column) in enumerate(corners):
        image_gradient[row:row + 3, column:column + 3] += kernel @ gradient[position]
    return image_gradient


def test_guided_maps_equal_a_numpy_backward_pass():
    model = every_relu_model(seed=1)
    images = random_images(6, size=5)
    labels = np.array([0, 1, 2, 0, 1, 2])
    guided = guided_backprop.guided_backprop(model, images, labels)
    vanilla = guided_backprop.vanilla_gradient(model, images, labels)
    weights = model.get_weights()
    for index, (image, label) in enumerate(zip(images, labels)):
        np.testing.assert_allclose(guided[index], numpy_input_gradient(weights, image, label, True),
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(vanilla[index], numpy_input_gradient(weights, image, label, False),
                                   rtol=1e-4, atol=1e-6)
    # The guided rule must have changed something, or the comparison above proves nothing.
    assert (np.abs(guided).reshape(6, -1).max(axis=1) > 0).all()
    assert not np.allclose(guided, vanilla, atol=1e-3)


def test_vanilla_maps_match_finite_differences():
    model = tiny_model()
    # A step small enough not to cross a ReLU or max-pool kink, large enough for float32.
    images, labels, step = random_images(2), np.array([3, 7]), 1e-3
    gradients = guided_backprop.vanilla_gradient(model, images, labels)
    # Every pixel nudged up and down, all in one batch: (images, pixels, 2, H, W, 1).
    nudges = np.eye(IMAGE_SIZE * IMAGE_SIZE, dtype=np.float32).reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 1) * step
    nudged = images[:, None, None] + np.stack([nudges, -nudges], axis=1)[None]
    scores = np.asarray(cnn.logits_model(model)(nudged.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 1)))
    scores = scores.reshape(2, -1, 2, 10)[np.arange(2), :, :, labels]  # (images, pixels, 2)
    differences = (scores[..., 0] - scores[..., 1]) / (2 * step)
    np.testing.assert_allclose(gradients.reshape(2, -1), differences, atol=1e-3 * np.abs(differences).max())
    # Without labels it explains the predicted class.
    predicted = np.asarray(model(images)).argmax(axis=1)
    np.testing.assert_array_equal(guided_backprop.vanilla_gradient(model, images),
                                  guided_backprop.vanilla_gradient(model, images, predicted))


def test_batch_norm_and_dropout_model_gives_finite_repeatable_maps():
    model = tiny_model(batch_norm=True, dropout=0.5)
    rng = np.random.default_rng(1)
    for layer in model.layers:  # Trained-looking statistics, some variances all but zero.
        if layer.name.endswith("_bn"):
            gamma, beta, mean, variance = layer.get_weights()
            variance = rng.choice([1e-9, 0.01, 4.0], variance.shape).astype(np.float32)
            layer.set_weights([gamma * 1.5, beta + 0.1, rng.normal(0, 0.5, mean.shape).astype(np.float32), variance])
    images = random_images(5)
    for method in (guided_backprop.guided_backprop, guided_backprop.vanilla_gradient):
        maps = method(model, images)
        assert np.isfinite(maps).all() and np.abs(maps).max() > 0
        # Dropout is off and batch norm uses its moving statistics: the same maps every time,
        # and an image's map does not depend on the rest of its batch.
        np.testing.assert_array_equal(maps, method(model, images))
        np.testing.assert_allclose(method(model, images[:1]), maps[:1], atol=1e-5 * np.abs(maps).max())


def test_trained_model_is_left_unchanged(trained_tiny):
    path, _ = trained_tiny
    model = cnn.load_trained_model(path)
    images = random_images(4)
    weights, activations = model.get_weights(), [getattr(layer, "activation", None) for layer in model.layers]
    vanilla_before = guided_backprop.vanilla_gradient(model, images)
    guided_backprop.guided_backprop(model, images)
    guided_backprop.smooth_grad(guided_backprop.guided_backprop, model, images, num_samples=2)
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)
    assert activations == [getattr(layer, "activation", None) for layer in model.layers]
    # Its ReLUs still pass negative gradients back: the vanilla maps are as before.
    np.testing.assert_array_equal(vanilla_before, guided_backprop.vanilla_gradient(model, images))


def test_guided_maps_follow_the_model_weights():
    model = tiny_model()
    images = random_images(3)
    before = guided_backprop.guided_backprop(model, images, 2)
    logits = model.get_layer("logits")
    logits.set_weights([weight * 2 for weight in logits.get_weights()])
    # Doubled class scores double the gradient and keep its signs, hence the guided masks.
    np.testing.assert_allclose(guided_backprop.guided_backprop(model, images, 2), 2 * before, rtol=1e-5)


@pytest.mark.parametrize("changes,layer", [
    ({"fc_act_fn": "tanh"}, "fc1_act"),
    ({"conv_layers": [{**tiny_topology()["conv_layers"][0], "act_fn": "elu"},
                      tiny_topology()["conv_layers"][1]]}, "conv1_act"),
])
def test_unsupported_activation_is_refused(changes, layer):
    model = tiny_model(**changes)
    with pytest.raises(common.UserError, match=f"layer {layer} uses activation"):
        guided_backprop.guided_backprop(model, random_images(2))
    assert np.isfinite(guided_backprop.vanilla_gradient(model, random_images(2))).all()


@pytest.mark.parametrize("make_layer,message", [
    (lambda layers: layers.LeakyReLU(name="odd"), "layer odd is a LeakyReLU layer"),
    (lambda layers: layers.ReLU(max_value=6.0, name="odd"), "layer odd is a leaky, capped or shifted ReLU"),
])
def test_other_relu_layers_are_refused(make_layer, message):
    import keras
    from keras import layers

    inputs = keras.Input((2, 2, 1))
    hidden = make_layer(layers)(layers.Dense(3)(layers.Flatten()(inputs)))
    model = keras.Model(inputs, layers.Dense(2, name="logits")(hidden))
    with pytest.raises(common.UserError, match=message):
        guided_backprop.guided_backprop(model, np.ones((1, 2, 2, 1)))


# ---------------------------------------------------------------------------- SmoothGrad


def test_smooth_grad_without_noise_is_the_plain_method():
    model = tiny_model()
    images = random_images(3)
    for method in (guided_backprop.vanilla_gradient, guided_backprop.guided_backprop):
        smoothed = guided_backprop.smooth_grad(method, model, images, num_samples=3, noise_level=0.0)
        np.testing.assert_allclose(smoothed, method(model, images), rtol=1e-5, atol=1e-8)


def test_smooth_grad_averages_noisy_copies(monkeypatch):
    model = tiny_model()
    images = random_images(3)
    plain = guided_backprop.guided_backprop(model, images)

    def smooth(seed, **options):
        return guided_backprop.smooth_grad(guided_backprop.guided_backprop, model, images, num_samples=4,
                                           noise_level=0.2, seed=seed, **options)

    first = smooth(seed=0)
    assert first.shape == images.shape and not np.allclose(first, plain, atol=1e-4)
    np.testing.assert_allclose(smooth(seed=0), first, rtol=1e-6)
    assert not np.allclose(smooth(seed=1), first, atol=1e-4)
    # Noisy copies split over many calls give the same maps as one big batch.
    monkeypatch.setattr(guided_backprop, "SMOOTH_BATCH_SIZE", 3)
    np.testing.assert_allclose(smooth(seed=0), first, rtol=1e-5, atol=1e-7)
    # Explicit labels are explained for every noisy copy.
    assert not np.allclose(smooth(seed=0, labels=[0, 0, 0]), smooth(seed=0, labels=[1, 1, 1]), atol=1e-4)


def test_smooth_grad_of_a_linear_model_is_its_plain_gradient():
    import keras

    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1))
    model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(keras.layers.Flatten()(inputs)))
    images = random_images(2)
    # The gradient of a linear score is the same everywhere, so the average of the noisy maps
    # (not their sum) equals it, however loud the noise.
    smoothed = guided_backprop.smooth_grad(guided_backprop.vanilla_gradient, model, images, [4, 5],
                                           num_samples=5, noise_level=1.0)
    np.testing.assert_allclose(smoothed, guided_backprop.vanilla_gradient(model, images, [4, 5]), rtol=1e-5)


# ----------------------------------------------------------------------- salient features


def test_salient_features_keeps_signs_top_k_and_scales():
    maps = np.array([[1.0, -4.0, 2.0, -0.5, 3.0, 0.0]], np.float32).reshape(1, 1, 6, 1)
    features = guided_backprop.salient_features

    def values(**options):
        return features(maps, **options).ravel().tolist()

    assert values(sign="positive", scale="none") == [1, 0, 2, 0, 3, 0]
    assert values(sign="negative", scale="none") == [0, 4, 0, 0.5, 0, 0]
    assert values(sign="both", scale="normalize") == [0.25, -1, 0.5, -0.125, 0.75, 0]
    assert values(sign="both", top_k=2, scale="none") == [0, -4, 0, 0, 3, 0]
    assert values(sign="positive", top_k=2, scale="binary") == [0, 0, 1, 0, 1, 0]
    images = np.arange(6, dtype=np.float32).reshape(maps.shape)
    assert features(maps, images, sign="both", top_k=3, scale="binary",
                    multiply_by_input=True).ravel().tolist() == [0, 1, 2, 0, 4, 0]
    np.testing.assert_array_equal(maps.ravel(), [1.0, -4.0, 2.0, -0.5, 3.0, 0.0])  # Input left alone.


def test_salient_features_top_k_keeps_exactly_k_per_image():
    maps = np.random.default_rng(0).normal(size=(5, 8, 8, 1)).astype(np.float32)
    maps[0] = 1.0  # All tied: still exactly k.
    features = guided_backprop.salient_features(maps, top_k=7, scale="binary")
    assert (features.reshape(5, -1).sum(axis=1) == 7).all()
    normalized = guided_backprop.salient_features(maps, sign="positive")
    assert normalized.min() == 0 and np.allclose(normalized.reshape(5, -1).max(axis=1), 1)


@pytest.mark.parametrize("options,message", [
    ({"sign": "up"}, "sign 'up' is unknown"),
    ({"scale": "log"}, "scale 'log' is unknown"),
    ({"top_k": -1}, "top_k must be"),
    ({"multiply_by_input": True}, "needs the images"),
])
def test_salient_features_refuses_bad_options(options, message):
    with pytest.raises(common.UserError, match=message):
        guided_backprop.salient_features(np.zeros((1, 2, 2, 1)), **options)


# ------------------------------------------------------------------------- command line


def test_command_line_writes_maps_and_figure(trained_tiny, tiny_npz, tmp_path, capsys):
    path, _ = trained_tiny
    out = tmp_path / "saliency"
    arguments = ["--model", str(path), "--data", str(tiny_npz), "--num", "3", "--smooth", "2", "--out", str(out)]
    assert guided_backprop.main(arguments) == 0
    results = results_format.load_results(out / "saliency_test.pkl")
    assert {"images", "labels", "probs", "vanilla", "guided", "vanilla_smooth", "guided_smooth"} <= set(results)
    test_images = datasets.load_dataset(tiny_npz)["x_test"][:3]
    np.testing.assert_array_equal(results["images"], test_images)
    assert results["probs"].shape == (3, 10)
    np.testing.assert_array_equal(results["labels"], results["probs"].argmax(axis=1))
    for name in ("vanilla", "guided", "vanilla_smooth", "guided_smooth"):
        assert results[name].shape == test_images.shape and np.isfinite(results[name]).all()
    model = cnn.load_trained_model(path)
    np.testing.assert_allclose(results["guided"], guided_backprop.guided_backprop(model, test_images), rtol=1e-5)
    assert (out / "saliency_test.png").read_bytes()[:4] == b"\x89PNG"
    assert "guided_smooth: 3 images" in capsys.readouterr().out


def test_command_line_picks_test_images_of_a_label(trained_tiny, tiny_npz, tmp_path):
    path, _ = trained_tiny
    arguments = ["--model", str(path), "--data", str(tiny_npz), "--label", "4", "--num", "2",
                 "--method", "guided", "--out", str(tmp_path)]
    assert guided_backprop.main(arguments) == 0
    results = results_format.load_results(tmp_path / "saliency_test_class4.pkl")
    assert results["image_labels"].tolist() == [4, 4] and results["labels"].tolist() == [4, 4]
    assert "vanilla" not in results and results["guided"].shape == (2, IMAGE_SIZE, IMAGE_SIZE, 1)


def test_command_line_explains_backworked_images(trained_tiny, tmp_path):
    path, _ = trained_tiny
    backwork = tmp_path / "results_3.pkl"
    results_format.save_results(backwork, fake_backwork_results(3, shape=(4, IMAGE_SIZE, IMAGE_SIZE)))
    assert guided_backprop.main(["--model", str(path), "--images", str(backwork), "--method", "vanilla"]) == 0
    results = results_format.load_results(path.parent / "saliency" / "saliency_results_3.pkl")  # Next to the model.
    assert results["vanilla"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 1)
    assert results["image_labels"].tolist() == [3] * 4
    with pytest.raises(common.UserError, match="--label 10 is not a class of model"):
        guided_backprop.main(["--model", str(path), "--images", str(backwork), "--label", "10"])


@pytest.mark.parametrize("arguments,message", [
    (["--label", "12"], "no test image has label 12"),
    (["--images", "missing.pkl"], "results file missing.pkl does not exist"),
    (["--set", "saliency.sign=up"], "saliency.sign must be one of"),
    (["--num", "0"], "saliency.num = 0 must be between 1 and 100000"),
    (["--model", str(Path(common.__file__).parent / "README.md")], "is not a Keras model archive"),
])
def test_user_mistakes_end_in_one_line(arguments, message, trained_tiny, tiny_npz, tmp_path):
    path, _ = trained_tiny
    command = [sys.executable, str(Path(guided_backprop.__file__)), "--model", str(path),
               "--data", str(tiny_npz), "--out", str(tmp_path / "out"), *arguments]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
