"""Guided backpropagation and input-gradient saliency: what the network looks at.

    python guided_backprop.py --model runs/default/model.keras
                              [--images test | runs/default/backwork/results_3.pkl] [--num 8]
                              [--label L] [--method guided|vanilla|both] [--smooth N]
                              [--out DIR] [--data PATH] [CONFIG] [--set saliency.key=value ...]

vanilla_gradient is the gradient of one class score (the logits layer, before softmax) with
respect to the input; guided_backprop is the same gradient with the rule of Springenberg et
al. (2014) at every ReLU; smooth_grad averages either over noisy copies of the images
(Smilkov et al. 2017); salient_features turns a map into what the figure shows.
The script writes saliency_<images>.pkl (images, labels, probs and one array of maps per
method; read it with results_format.load_results) and saliency_<images>.png, named after what was
explained (saliency_test, saliency_results_3, ...), in saliency/ next to the model unless
--out says otherwise. Defaults live in
the [saliency] section of configs/default.toml.
"""
import argparse
import functools
import time
from pathlib import Path

import numpy as np

import cnn
import common
import configurator
import datasets
import results_format
from common import UserError
from configurator import SALIENCY_METHODS, SCALES, SIGNS

# Noisy images per SmoothGrad call: enough to keep the CPU busy, little enough for memory
# (the default network holds about 0.5 MB of activations per 28x28 image going back).
SMOOTH_BATCH_SIZE = 512

# ---------------------------------------------------------------------------- gradients


@functools.cache
def _guided_relu():
    """ReLU whose backward pass follows the guided rule (built on first use: TF loads lazily)."""
    import tensorflow as tf

    @tf.custom_gradient
    def guided_relu(inputs):
        def backward(upstream):
            # Pass a gradient only where the unit was active going forward and the gradient
            # coming back is positive, so that no negative evidence reaches the image.
            return upstream * tf.cast((inputs > 0) & (upstream > 0), upstream.dtype)

        return tf.nn.relu(inputs), backward

    return guided_relu


def _guided_layer(layer):
    """A copy of layer with its ReLU, if any, made guided; a nonlinearity the rule lacks is refused.

    Used as clone_model's clone_function: it sees every layer between the input and the
    logits, so activations inside Conv2D and Dense, Activation layers and ReLU layers are
    all caught. Max pooling, batch normalisation and dropout (inference) need no change.
    """
    from keras import layers

    refuse = (f"layer {layer.name} {{}}; guided backpropagation is defined for plain ReLUs only, "
              "so use the vanilla gradient (--method vanilla) or a model with relu activations")
    if isinstance(layer, layers.ReLU):
        if (layer.negative_slope, layer.max_value, layer.threshold) != (0.0, None, 0.0):
            raise UserError(refuse.format("is a leaky, capped or shifted ReLU"))
        return layers.Activation(_guided_relu(), name=layer.name)
    if isinstance(layer, (layers.LeakyReLU, layers.PReLU, layers.ELU, layers.Softmax)):
        raise UserError(refuse.format(f"is a {type(layer).__name__} layer"))
    copy = cnn.input_gradient_layer(layer)
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", repr(activation))
    if activation is None or name == "linear":
        return copy
    if name != "relu":
        raise UserError(refuse.format(f"uses activation {name}"))
    copy.activation = _guided_relu()
    return copy


def _score_model(model):
    """The model up to its class scores (the logits layer), sharing its layers and weights; for a classifier
    combined with a discriminator (ProoD), the classifier's scores, which decide its class."""
    if cnn.is_combined(model):
        import keras

        return keras.Model(model.input, model.get_layer(cnn.CLASS_LOGITS).output)
    try:
        return cnn.logits_model(model)
    except ValueError:
        raise UserError(f"model {model.name} has no layer named 'logits'; "
                        "use a model built by cnn.build_model") from None


@functools.lru_cache(maxsize=4)
def _gradient_function(model, guided):
    """A compiled (images, labels) -> input gradients for model, built once per model.

    The gradients run on a clone of the model's layers up to the logits, with a
    one-channel first convolution that takes its input gradient faster
    (cnn.input_gradient_layer) and, for guided gradients, guided ReLUs; model
    itself never changes. The clone's weights are copied from model's inside every call:
    a few milliseconds next to the backward pass, and the maps stay right if model is
    trained further.
    """
    import keras
    import tensorflow as tf

    scores = _score_model(model)
    copy_layer = _guided_layer if guided else cnn.input_gradient_layer
    network = keras.models.clone_model(scores, clone_function=copy_layer, recursive=True)
    weight_pairs = list(zip(network.weights, scores.weights))
    if any(tuple(copy.shape) != tuple(original.shape) for copy, original in weight_pairs):
        raise RuntimeError(f"the clone of {model.name} does not mirror its weights")

    # One graph for any batch size; XLA is off because its CPU convolutions are slower.
    signature = [tf.TensorSpec([None, *model.input_shape[1:]], tf.float32), tf.TensorSpec([None], tf.int32)]

    @tf.function(input_signature=signature, jit_compile=False)
    def gradients(images, labels):  # (batch, H, W, C), (batch,) where -1 means the predicted class
        for copy, original in weight_pairs:
            copy.assign(original)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(images)
            class_scores = network(images, training=False)  # (batch, classes)
            predicted = tf.argmax(class_scores, axis=-1, output_type=tf.int32)
            labels = tf.where(labels < 0, predicted, labels)
            chosen = tf.gather(class_scores, labels, axis=1, batch_dims=1)  # (batch,)
        # In inference mode the images of a batch do not interact, so the gradient of the
        # sum of their scores holds each image's own gradient.
        return tape.gradient(chosen, images)

    return gradients


def _checked_images(model, images):
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1:] != tuple(model.input_shape[1:]):
        raise UserError(f"images of shape {images.shape} do not fit the model, which takes "
                        f"(N, {', '.join(map(str, model.input_shape[1:]))})")
    return images


def _checked_labels(model, labels, num_images):
    """labels as an int32 array (N,): None becomes -1 (the predicted class), an int is repeated."""
    if labels is None:
        return np.full(num_images, -1, np.int32)
    labels = np.asarray(labels)
    if labels.ndim == 0:
        labels = np.full(num_images, labels)
    num_classes = model.output_shape[-1]
    if (labels.shape != (num_images,) or not np.issubdtype(labels.dtype, np.integer)
            or labels.min(initial=0) < 0 or labels.max(initial=0) >= num_classes):
        raise UserError(f"labels must be one class in 0-{num_classes - 1} per image ({num_images}), "
                        f"not {labels!r}")
    return labels.astype(np.int32)


def _class_gradients(model, images, labels, guided):
    images = _checked_images(model, images)
    labels = _checked_labels(model, labels, len(images))
    return _gradient_function(model, guided)(images, labels).numpy()


def vanilla_gradient(model, images, labels=None):
    """Gradient of each image's class score (before softmax) with respect to the image.

    images (N, H, W, C) float; labels an int, one int per image, or None for the predicted
    class. Returns maps shaped like images. The softmax is left out because at a probability
    of 0.999 its gradient all but vanishes.
    """
    return _class_gradients(model, images, labels, guided=False)


def guided_backprop(model, images, labels=None):
    """vanilla_gradient, but each ReLU passes back only positive gradients of active units.

    Works on a clone with guided ReLUs (model is left as it is); refuses with UserError a
    model with another nonlinear activation, for which the rule is not defined.
    """
    return _class_gradients(model, images, labels, guided=True)


METHODS = {"vanilla": vanilla_gradient, "guided": guided_backprop}


def smooth_grad(method, model, images, labels=None, num_samples=25, noise_level=0.15, seed=0):
    """SmoothGrad: the average of method's maps over num_samples noisy copies of each image.

    method is vanilla_gradient or guided_backprop (or any function of the same signature).
    The noise is Gaussian with standard deviation noise_level times each image's value range
    (max - min). Without labels every copy explains the class predicted for the clean image,
    so that noise which flips the prediction does not mix two classes' maps.
    """
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise UserError(f"SmoothGrad needs at least 1 noisy sample per image, not {num_samples!r}")
    if not noise_level >= 0:
        raise UserError(f"SmoothGrad's noise level must be 0 or more, not {noise_level!r}")
    images = _checked_images(model, images)
    if labels is None:
        labels = cnn.predict(model, images).argmax(axis=1)
    labels = _checked_labels(model, labels, len(images))
    rng = np.random.default_rng(seed)
    spread = np.ptp(images, axis=(1, 2, 3), keepdims=True)  # (N, 1, 1, 1)
    # Noisy copies travel in batches of about SMOOTH_BATCH_SIZE images: one call where memory
    # allows. The noise is drawn in the same order whatever the batching, so results agree.
    copies_per_call = max(1, SMOOTH_BATCH_SIZE // max(1, len(images)))
    total = np.zeros_like(images)
    for first in range(0, num_samples, copies_per_call):
        copies = min(copies_per_call, num_samples - first)
        noise = rng.standard_normal((copies, *images.shape), dtype=np.float32)  # (copies, N, H, W, C)
        noisy = (images + noise * (noise_level * spread)).reshape(-1, *images.shape[1:])
        maps = method(model, noisy, np.tile(labels, copies))  # (copies * N, H, W, C)
        total += maps.reshape(copies, *images.shape).sum(axis=0)
    return total / num_samples


# ------------------------------------------------------------------------------ display


def salient_features(maps, images=None, sign="both", top_k=0, scale="normalize", multiply_by_input=False):
    """Turn saliency maps (N, H, W, C) into what is shown, each map on its own.

    sign: "positive" keeps the positive part, "negative" the size of the negative part (the
    most negative pixels score highest), "both" the signed map.
    top_k: keep only the k values of each map largest in size (0 keeps all).
    scale: "normalize" divides each map by its largest size (values in [0, 1], or [-1, 1]
    with both signs), "binary" gives 1 where a value is kept and 0 elsewhere, "none" leaves it.
    multiply_by_input: multiply by images; with "binary" this shows the input's top-k pixels.
    """
    maps = np.asarray(maps, dtype=np.float32)
    if sign not in SIGNS:
        raise UserError(f"sign {sign!r} is unknown; use one of {', '.join(SIGNS)}")
    if scale not in SCALES:
        raise UserError(f"scale {scale!r} is unknown; use one of {', '.join(SCALES)}")
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise UserError(f"top_k must be a count of pixels, 0 or more (0 keeps all), not {top_k!r}")
    if multiply_by_input and images is None:
        raise UserError("multiply_by_input needs the images the maps belong to")
    kept = {"positive": np.maximum(maps, 0), "negative": np.maximum(-maps, 0), "both": maps.copy()}[sign]
    flat = kept.reshape(len(kept), -1)  # (N, pixels), a view of our own copy
    num_dropped = flat.shape[1] - top_k
    if top_k and num_dropped > 0:
        # argpartition picks exactly num_dropped values per map even where values tie.
        smallest = np.argpartition(np.abs(flat), num_dropped - 1, axis=1)[:, :num_dropped]
        np.put_along_axis(flat, smallest, 0.0, axis=1)
    if scale == "normalize":
        largest = np.abs(flat).max(axis=1, keepdims=True)  # (N, 1)
        flat /= np.where(largest > 0, largest, 1.0)
    elif scale == "binary":
        flat = (flat != 0).astype(np.float32)
    features = flat.reshape(maps.shape)
    return features * np.asarray(images, np.float32) if multiply_by_input else features


def _channels_to_display(array, is_map):
    """(H, W, C) -> what imshow takes: grey (H, W), or RGB for a colour input image."""
    if array.shape[-1] == 1:
        return array[..., 0]
    return array.sum(axis=-1) if is_map or array.shape[-1] != 3 else array


# What the colours of each method's maps mean, written under the figure.
COLOUR_MEANING = {
    "vanilla": "vanilla: red = making the pixel brighter raises the class score, blue = lowers it",
    "guided": "guided: red = positive evidence passed back through active ReLUs "
              "(blue only from the first convolution, which no ReLU precedes)",
}


def plot_saliency(path, images, maps, row_titles, feature_options, title):
    """One row per image: the input, then each method's map as salient_features shows it.

    Each map is scaled to its own largest value; a colour bar under each column says what
    its colours mean, and the input column's label names the image and its class.
    """
    columns = [("input", images)] + [(name, salient_features(values, images, **feature_options))
                                     for name, values in maps.items()]
    figure, axes = common.pyplot().subplots(len(images), len(columns), squeeze=False,
                                            figsize=(2.3 * len(columns), 2.0 * len(images) + 1.2))
    for column, (name, values) in enumerate(columns):
        for row in range(len(images)):
            axis, shown = axes[row, column], _channels_to_display(values[row], is_map=column > 0)
            if column == 0:
                picture = axis.imshow(shown, cmap="gray", vmin=0, vmax=max(1.0, float(shown.max())))
                axis.set_ylabel(row_titles[row], fontsize=7, rotation=0, ha="right", va="center")
            else:
                largest = float(np.abs(shown).max()) or 1.0
                # Signed maps get a diverging map centred on zero, one-signed maps a ramp.
                signed = bool((shown < 0).any()) or feature_options["sign"] == "both"
                picture = axis.imshow(shown, cmap="bwr" if signed else "inferno",
                                      vmin=-largest if signed else 0, vmax=largest)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(name.replace("_smooth", "\nSmoothGrad"), fontsize=9)
        if column > 0:
            bar = figure.colorbar(picture, ax=axes[:, column], orientation="horizontal", fraction=0.04, pad=0.02)
            low, high = bar.mappable.get_clim()
            bar.set_ticks([low, high], labels=["\u2212" if low < 0 else "0", "+"], fontsize=7)
    legend = [COLOUR_MEANING[name] for name in ("vanilla", "guided") if name in maps]
    legend.append("each map is scaled to its own largest value; SmoothGrad averages maps of noisy copies"
                  + (f"; showing the {feature_options['sign']} part only" if feature_options["sign"] != "both" else ""))
    figure.text(0.5, 0.005, "\n".join(legend), ha="center", va="bottom", fontsize=7)
    figure.suptitle(title, fontsize=10)
    common.save_figure(figure, path)


# ------------------------------------------------------------------------------- main


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description="Saliency maps (input gradient, guided backpropagation) "
                                                 "of a model trained by proc_mnist.py.")
    configurator.add_common_arguments(parser, "saliency")
    parser.add_argument("--model", required=True, help="model.keras written by proc_mnist.py")
    parser.add_argument("--images", help='"test" for test images, or a backwork results .pkl (saliency.images)')
    parser.add_argument("--num", type=int, help="how many images to explain (saliency.num)")
    parser.add_argument("--label", type=int, help="class to explain, and with test images only images "
                                                  "of that class (saliency.label; default: the predicted class)")
    parser.add_argument("--method", choices=SALIENCY_METHODS, help="which maps to compute (saliency.method)")
    parser.add_argument("--smooth", type=int, metavar="N", help="also SmoothGrad over N noisy copies "
                                                                "(saliency.smooth_samples; 0 turns it off)")
    parser.add_argument("--out", help="output folder (default: saliency/ next to the model)")
    return parser.parse_args(argv)


def resolve_config(args):
    """Defaults (the model's [data]), then the config file and --set, then the flags, each checked as merged."""
    base = configurator.model_data_config(args.model) if args.config is None else None
    flags = {"images": args.images, "num": args.num, "label": args.label, "method": args.method,
             "smooth_samples": args.smooth}
    return configurator.resolve_cli_config(args, "saliency", base=base, flags={"saliency": flags})


def load_test_images(data, label, num):
    """The first num test images of data (of class label unless it is -1) and their labels."""
    images, labels = data["x_test"], data["y_test"]
    if label >= 0:
        if not (labels == label).any():
            raise UserError(f"no test image has label {label}; the labels run from {labels.min()} "
                            f"to {labels.max()}, so choose --label among them")
        images, labels = images[labels == label], labels[labels == label]
    return images[:num], labels[:num]


def load_backwork_images(path, num):
    """The first num images of a cnn_backwork.py results file, the label they were made for, the
    file's provenance (the file itself), and the data it was backworked from (its "data", or None)."""
    results = results_format.load_results(path)  # Checks every field: finite images in [0, 1], a valid label.
    if results["kind"] != "backwork":
        raise UserError(f"{path} holds {results['kind']} results, not backworked images; give a "
                        "results_<label>.pkl written by cnn_backwork.py")
    images = common.with_channel(results["images"])  # (N, H, W) -> (N, H, W, 1)
    provenance = {"dataset": None, "file": str(path), "sha256": datasets.file_sha256(path), "download": False}
    made_from = results.get("data") if isinstance(results.get("data"), dict) else None
    return images[:num], np.full(len(images[:num]), results["label"]), provenance, made_from


def output_name(source, label):
    """saliency_<what was explained>, so that explaining other images never replaces a figure."""
    if source == "test":
        return "saliency_test" if label < 0 else f"saliency_test_class{label}"
    return f"saliency_{Path(source).stem}" + ("" if label < 0 else f"_class{label}")


def _timed(name, num_images, function, *arguments, note=""):
    start = time.perf_counter()
    result = function(*arguments)
    seconds = time.perf_counter() - start
    print(f"{name}: {num_images} images in {seconds:.2f}s ({num_images / seconds:.1f} images/s{note})")
    return result


def compute_maps(model, images, labels, options):
    """Every map the options ask for, by name (vanilla, guided and their *_smooth), timed."""
    methods = ["vanilla", "guided"] if options["method"] == "both" else [options["method"]]
    maps = {}
    for name in methods:
        maps[name] = _timed(name, len(images), METHODS[name], model, images, labels,
                            note=", building its graph included")
        if options["smooth_samples"]:
            maps[f"{name}_smooth"] = _timed(
                f"{name}_smooth", len(images), smooth_grad, METHODS[name], model, images, labels,
                options["smooth_samples"], options["smooth_noise"], options["seed"])
    return maps


def main(argv=None):
    args = parse_arguments(argv)
    cnn.check_model_file(args.model)
    config = resolve_config(args)
    options = config["saliency"]
    from_test_set = options["images"] == "test"
    if from_test_set:
        data = configurator.load_data(args, config)
        # The model's own data, or --allow-other-data (noted, and recorded in the saliency file's "data").
        provenance = configurator.check_model_data(args.model, data["provenance"], args.allow_other_data)
        images, image_labels = load_test_images(data, options["label"], options["num"])
        data_classes, dataset = datasets.count_classes(data), datasets.provenance_dataset(provenance)
    elif options["images"].endswith(".pkl"):
        images, image_labels, provenance, made_from = load_backwork_images(options["images"], options["num"])
        # Backworked from the model's data (any model's: transfer), or --allow-other-data.
        made_from = configurator.check_model_data(args.model, made_from, args.allow_other_data,
                                                  what=f"the data the images of {options['images']} were made from")
        if made_from and "model_data" in made_from:
            provenance = {**provenance, "model_data": made_from["model_data"]}
        data_classes = None  # A backwork file's model is whatever made it, so only the shape is checked.
        dataset = datasets.provenance_dataset(made_from) or datasets.provenance_dataset(
            configurator.model_data_record(args.model))
    else:
        raise UserError(f"--images {options['images']!r} is neither 'test' nor a backwork results .pkl")
    model = cnn.load_trained_model(args.model, images, num_classes=data_classes)
    num_classes = model.output_shape[-1]
    if options["label"] >= num_classes:
        raise UserError(f"--label {options['label']} is not a class of model {args.model}, whose "
                        f"classes are 0-{num_classes - 1}")
    if image_labels.max(initial=-1) >= num_classes:  # Backworked images of another model's class.
        raise UserError(f"{options['images']} holds images made for class {image_labels.max()}, which model "
                        f"{args.model} (classes 0-{num_classes - 1}) does not have; explain them with the model "
                        "they were made from")
    probabilities = cnn.predict(model, images)  # (N, classes)
    if not np.isfinite(probabilities).all():  # Before the work: every map would be of NaN too.
        raise UserError(f"model {args.model} gives NaN or infinite probabilities for these images (its weights "
                        "are finite but its outputs overflow: a run that diverged?); retrain it, with a lower "
                        "train.learning_rate")
    out_dir = common.ensure_writable_dir(args.out or Path(args.model).parent / "saliency")
    name = output_name(options["images"], options["label"])
    labels = (np.full(len(images), options["label"]) if options["label"] >= 0
              else probabilities.argmax(axis=1))
    print(f"explaining {len(images)} images from {options['images']} with {options['method']} "
          f"(SmoothGrad: {options['smooth_samples'] or 'off'}); output in {out_dir / name}.pkl and .png")
    if (out_dir / f"{name}.pkl").exists():
        print(f"replacing the earlier {out_dir / name}.pkl and .png")
    maps = compute_maps(model, images, labels, options)
    results = {"images": images, "labels": labels.astype(np.int64), "probs": probabilities.astype(np.float32),
               "image_labels": image_labels.astype(np.int64), "model": str(args.model),
               "source": options["images"], "options": dict(options), "data": provenance, **maps}
    results_format.save_results(out_dir / f"{name}.pkl", results, kind="saliency")
    tag, names = "class" if from_test_set else "made for", datasets.class_names(dataset, num_classes)
    titles = [f"{tag} {names[image_label]}\nexplained: {names[label]}\np = {probabilities[row, label]:.4g}"
              for row, (image_label, label) in enumerate(zip(image_labels, labels))]
    feature_options = {key: options[key] for key in ("sign", "top_k", "scale", "multiply_by_input")}
    source = "test images" if from_test_set else f"backworked images of {options['images']}"
    title = f"what model {args.model} looks at: input gradients of the class score, {source}"
    plot_saliency(out_dir / f"{name}.png", images, maps, titles, feature_options, title)
    print(f"saved {out_dir / name}.pkl and {out_dir / name}.png")
    return 0


if __name__ == "__main__":
    common.run_cli(main)
