"""Backwork inputs: find images a trained CNN is sure about that look like nothing to us.

    python cnn_backwork.py --model runs/default/model.keras [CONFIG] [--data PATH]
                           [--labels 3 | 0-9 | 1,4,7] [--num-examples 8] [--out DIR] [--seed N]

For a label l, a batch of images x (pixels in [0, 1]) is optimised with Adam on

    cost = sum over cost layers k (the input, each conv block, each fc pre-activation) of
             layer_cost_coeffs[k] * (reference_cost_coeff / reference_distance_k
                                   + batch_cost_coeff / batch_distance_k)
         + layer_cost_coeffs[-1] * mean(1 - p(l | x))

reference_distance_k is the mean squared distance of each image's layer-k activations to
those of its nearest training example of label l (averaged over the batch), and
batch_distance_k the mean over pairs of different images in the batch. The probability
term pulls the images into the label; the distance terms push them away from anything
the label looks like at every layer, most strongly at the higher layers.

Each label writes results_{label}.pkl (read them with common.load_results) to the output
folder (default: backwork/ beside the model), plus backwork.png and worst_training.png.
"""
import argparse
import re
import time
from pathlib import Path

import numpy as np

import common
import proc_mnist
from common import UserError

# Keeps 1 / distance finite when an image lands on a training example or on another image.
DISTANCE_EPSILON = 1e-6

# ------------------------------------------------------------------------------ costs


def cost_layer_names(model):
    """The layers the cost compares: the input, every conv block, every fc pre-activation."""
    names = [layer.name for layer in model.layers]

    def numbered(prefix):
        found = [name for name in names if re.fullmatch(rf"{prefix}\d+", name)]
        return sorted(found, key=lambda name: int(name[len(prefix):]))

    if "logits" not in names:
        raise UserError("the model has no 'logits' layer; backwork needs a model built by proc_mnist.py")
    return ["input"] + numbered("conv") + numbered("fc")


def default_layer_cost_coeffs(num_cost_layers):
    """The original weighting: logspace(-n, -1, n), the last (probability) weight times 100."""
    count = num_cost_layers + 1
    coefficients = np.logspace(-count, -1, count)
    coefficients[-1] *= 100
    return coefficients.astype(np.float32)


def layer_coefficients(options, num_cost_layers):
    given = options["layer_cost_coeffs"]
    if not given:
        return default_layer_cost_coeffs(num_cost_layers)
    if len(given) != num_cost_layers + 1:
        raise UserError(f"backwork.layer_cost_coeffs has {len(given)} values but the model has "
                        f"{num_cost_layers} cost layers plus the probability term; give "
                        f"{num_cost_layers + 1} values or [] for the default")
    return np.asarray(given, np.float32)


def feature_model(model):
    """A model returning every cost layer's activations (but the input) and the logits."""
    import keras

    names = cost_layer_names(model)[1:] + ["logits"]
    return keras.Model(model.input, [model.get_layer(name).output for name in names])


def flat_features(features_model, images):
    """Every cost layer's activations flattened to (batch, size), the input first, and the logits."""
    import tensorflow as tf

    outputs = features_model(images, training=False)
    flat = [tf.reshape(images, (tf.shape(images)[0], -1))]
    flat += [tf.reshape(output, (tf.shape(output)[0], -1)) for output in outputs[:-1]]
    return flat, outputs[-1]


def squared_distances(rows, references, reference_norms):
    """Mean squared distance between each row (N, D) and each reference (R, D): (N, R).

    Expands |a - b|^2 = |a|^2 + |b|^2 - 2 a.b so that the only large product is one
    matrix multiply: the (N, R, D) difference tensor is never built.
    """
    import tensorflow as tf

    row_norms = tf.reduce_sum(tf.square(rows), axis=1, keepdims=True)  # (N, 1)
    products = tf.matmul(rows, references, transpose_b=True)  # (N, R)
    distances = row_norms + reference_norms[tf.newaxis, :] - 2.0 * products
    # Rounding can leave a tiny negative value where the true distance is zero.
    return tf.maximum(distances, 0.0) / tf.cast(tf.shape(rows)[1], rows.dtype)


def reference_distance(rows, references, reference_norms):
    """Mean over the batch of each row's distance to its nearest reference.

    The search for the nearest reference needs no gradient; the distance to the one found
    is then computed directly, which is exact (no cancellation) and makes the backward
    pass a gather of N references instead of a second (N, R) x (R, D) product.
    """
    import tensorflow as tf

    nearest = tf.argmin(tf.stop_gradient(squared_distances(rows, references, reference_norms)), axis=1)
    return tf.reduce_mean(tf.square(rows - tf.gather(references, nearest)))


def batch_distance(rows):
    """Mean distance between different rows of the batch (each row's distance to itself left out)."""
    import tensorflow as tf

    count = tf.shape(rows)[0]
    distances = squared_distances(rows, rows, tf.reduce_sum(tf.square(rows), axis=1))  # (N, N)
    off_diagonal = 1.0 - tf.eye(count, dtype=rows.dtype)
    pairs = tf.cast(count * (count - 1), rows.dtype)
    return tf.reduce_sum(distances * off_diagonal) / pairs


def reference_features(features_model, images, max_examples, seed, batch_size=500):
    """The label's training images at every cost layer: [(activations (R, D), squared norms (R,))].

    Also returns their logits (R, classes), from which the worst-classified are picked.
    """
    import tensorflow as tf

    if max_examples and len(images) > max_examples:
        images = images[np.random.default_rng(seed).choice(len(images), max_examples, replace=False)]
    chunks = [flat_features(features_model, images[start:start + batch_size])
              for start in range(0, len(images), batch_size)]
    layers = [tf.concat([flat[index] for flat, _ in chunks], axis=0) for index in range(len(chunks[0][0]))]
    logits = tf.concat([chunk_logits for _, chunk_logits in chunks], axis=0)
    return [(layer, tf.reduce_sum(tf.square(layer), axis=1)) for layer in layers], images, logits.numpy()


def worst_classified(images, logits, label, count=8):
    """The count training images given the lowest probability of their label, and their probabilities."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)
    order = np.argsort(probabilities[:, label])[:count]
    return images[order], probabilities[order]


def make_cost_function(features_model, references, label, coefficients, options, distance=None):
    """cost(images) -> (cost, label probabilities), the formula in the module docstring.

    distance replaces reference_distance (bench/bench_backwork.py passes the direct formula).
    """
    import tensorflow as tf

    distance = distance or reference_distance
    reference_weight = options["reference_cost_coeff"]
    batch_weight = options["batch_cost_coeff"]

    def cost(images):
        flat, logits = flat_features(features_model, images)
        probabilities = tf.nn.softmax(logits)[:, label]  # (N,)
        total = coefficients[-1] * tf.reduce_mean(1.0 - probabilities)
        for weight, rows, (layer_references, norms) in zip(coefficients, flat, references):
            layer_cost = reference_weight / (distance(rows, layer_references, norms) + DISTANCE_EPSILON)
            if images.shape[0] > 1:  # One image has no batch to keep away from.
                layer_cost += batch_weight / (batch_distance(rows) + DISTANCE_EPSILON)
            total += weight * layer_cost
        return total, probabilities

    return cost


# ----------------------------------------------------------------------- optimisation


class PixelAdam:
    """Adam on a batch of images, with per-image moments and step counts.

    Written out (rather than keras.optimizers.Adam) so that re-initialising one image
    also restarts its moments and bias correction without touching the others.
    """

    def __init__(self, images, learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        import tensorflow as tf

        self.images = tf.Variable(images, name="images")  # (N, H, W, C)
        self.first_moment = tf.Variable(tf.zeros_like(images))
        self.second_moment = tf.Variable(tf.zeros_like(images))
        self.steps = tf.Variable(tf.zeros((len(images), 1, 1, 1)))
        self.learning_rate, self.beta_1, self.beta_2, self.epsilon = learning_rate, beta_1, beta_2, epsilon

    def apply(self, gradient):
        import tensorflow as tf

        self.steps.assign_add(tf.ones_like(self.steps))
        self.first_moment.assign(self.beta_1 * self.first_moment + (1 - self.beta_1) * gradient)
        self.second_moment.assign(self.beta_2 * self.second_moment + (1 - self.beta_2) * tf.square(gradient))
        # Bias correction folded into the step size, as keras.optimizers.Adam does it.
        step_size = self.learning_rate * tf.sqrt(1 - self.beta_2 ** self.steps) / (1 - self.beta_1 ** self.steps)
        step = step_size * self.first_moment / (tf.sqrt(self.second_moment) + self.epsilon)
        # Keep valid pixels: the network was only trained on [0, 1].
        self.images.assign(tf.clip_by_value(self.images - step, 0.0, 1.0))

    def reset(self, indices, new_images):
        import tensorflow as tf

        indices = tf.constant(np.asarray(indices, np.int32)[:, None])
        for variable, values in [(self.images, new_images), (self.first_moment, 0.0),
                                 (self.second_moment, 0.0), (self.steps, 0.0)]:
            shape = (len(new_images),) + tuple(variable.shape[1:])
            variable.scatter_nd_update(indices, tf.broadcast_to(tf.cast(values, tf.float32), shape))


def initial_images(label_images, count, rng, from_training):
    """Uniform noise, or (init_w_train_vals) averages of random groups of the label's images."""
    if not from_training:
        return rng.uniform(0.0, 1.0, (count,) + label_images.shape[1:]).astype(np.float32)
    groups = rng.integers(0, len(label_images), (count, 10))
    return label_images[groups].mean(axis=1).astype(np.float32)


def count_falls(falls, previous, current):
    """Per image, how many records in a row its label probability has fallen."""
    return np.where(current < previous, falls + 1, 0)


class Backworker:
    """Backworks the labels of one model; its compiled steps are traced once for all labels."""

    def __init__(self, model, options, distance=None):
        import tensorflow as tf

        self.model, self.options = model, options
        self.features_model = feature_model(model)
        self.cost_layers = cost_layer_names(model)
        self.coefficients = layer_coefficients(options, len(self.cost_layers))
        count, image_shape = options["num_examples"], tuple(model.input_shape[1:])
        self.optimizer = PixelAdam(np.zeros((count, *image_shape), np.float32), options["learning_rate"])
        sizes = [int(np.prod(image_shape))] + [int(np.prod(self.model.get_layer(name).output.shape[1:]))
                                               for name in self.cost_layers[1:]]
        # References of any count (R) per label: one trace serves every label.
        reference_spec = [(tf.TensorSpec([None, size], tf.float32), tf.TensorSpec([None], tf.float32))
                          for size in sizes]
        signature = [tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32), reference_spec]
        self.run_steps = tf.function(self._run_steps, input_signature=signature)
        self.distance = distance

    def _run_steps(self, num_steps, label, references):
        """num_steps optimisation steps; returns each step's cost and the final label probabilities."""
        import tensorflow as tf

        cost = make_cost_function(self.features_model, references, label, self.coefficients, self.options,
                                  self.distance)
        images = self.optimizer.images
        costs = tf.TensorArray(tf.float32, size=num_steps)
        for step in tf.range(num_steps):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(images)
                value, _ = cost(images)
            self.optimizer.apply(tape.gradient(value, images))
            costs = costs.write(step, value)
        _, probabilities = cost(images)
        return costs.stack(), probabilities

    def run(self, label_images, label, progress=print):
        """Optimise the batch towards label; return the results dict (see the README)."""
        options, count, start = self.options, self.options["num_examples"], time.perf_counter()
        seed = [options["seed"], label]  # Independent of which other labels a process runs.
        rng = np.random.default_rng(seed)
        references, reference_images, training_logits = reference_features(
            self.features_model, label_images, options["max_reference_examples"], seed)
        self.optimizer.reset(np.arange(count), initial_images(label_images, count, rng, options["init_w_train_vals"]))
        step, reinitialised, history = 0, 0, []
        first_reached = np.full(count, -1)
        falls, previous = np.zeros(count, int), np.full(count, -np.inf)
        while step < options["max_num_steps"]:
            block = min(options["save_freq"], options["max_num_steps"] - step)
            costs, probabilities = (value.numpy() for value in self.run_steps(block, label, references))
            step += block
            first_reached[(first_reached < 0) & (probabilities >= options["prob_cap_min"])] = step
            history.append({"step": step, "images": _drop_single_channel(self.optimizer.images.numpy()),
                            "probs": probabilities, "cost": float(costs[-1])})
            falls, previous = count_falls(falls, previous, probabilities), probabilities
            progress(f"label {label}  step {step}  cost {costs[-1]:.4g}  p min {probabilities.min():.4f}  "
                     f"mean {probabilities.mean():.4f}  reinitialised {reinitialised}")
            if step >= options["min_num_steps"] and _should_stop(costs, probabilities, options):
                break
            # The original's escape from local minima: restart images that keep losing the label.
            stuck = np.flatnonzero((falls >= options["num_mono_dec_saves"])
                                   & (probabilities < options["reinit_below"]))
            if len(stuck):
                self.optimizer.reset(stuck, initial_images(label_images, len(stuck), rng,
                                                           options["init_w_train_vals"]))
                first_reached[stuck], falls[stuck], previous[stuck] = -1, 0, -np.inf
                reinitialised += len(stuck)
        worst_images, worst_probabilities = worst_classified(reference_images, training_logits, label)
        images = self.optimizer.images.numpy()
        return {
            "format_version": common.RESULTS_FORMAT_VERSION,
            "label": int(label),
            "images": _drop_single_channel(images),
            "probs": np.asarray(self.model(images, training=False), np.float32),
            "history": history,
            "steps": int(step),
            "steps_to_reach": first_reached,
            "seconds": time.perf_counter() - start,
            "reinitialised": int(reinitialised),
            "nearest_training_distance": nearest_distances(images, label_images),
            "worst_training_images": _drop_single_channel(worst_images),
            "worst_training_probs": worst_probabilities,
            "layer_cost_coeffs": self.coefficients,
            "cost_layers": self.cost_layers,
            "options": dict(options),
        }


def backwork_label(model, label_images, label, options, progress=print):
    """Optimise options['num_examples'] images towards label; return the results dict."""
    return Backworker(model, options).run(label_images, label, progress)


def _drop_single_channel(images):
    """Grey images are saved as (N, H, W), as the original results were."""
    return images[..., 0] if images.shape[-1] == 1 else images


def _should_stop(costs, probabilities, options):
    reached = probabilities.mean() >= options["prob_cap_mean"] and probabilities.min() >= options["prob_cap_min"]
    settled = len(costs) > 1 and abs(costs[-1] - costs[-2]) < options["tolerance"]
    return reached or settled


def nearest_distances(images, label_images):
    """Each image's pixel-space mean squared distance to its nearest training example of the label."""
    import tensorflow as tf

    flat = tf.reshape(images, (len(images), -1))
    references = tf.reshape(label_images, (len(label_images), -1))
    distances = squared_distances(flat, references, tf.reduce_sum(tf.square(references), axis=1))
    return tf.reduce_min(distances, axis=1).numpy()


def get_faulty_input_layer(data, model_options=None, model="runs/default/model.keras", labels=None,
                           progress=print, on_label=None):
    """Backwork every label in labels (default: all) and return {label: results}.

    data is a dict as from common.load_mnist; model_options a config dict whose
    'backwork' section overrides the defaults; model a Keras model or the path of one.
    on_label(label, results) is called as each label finishes (the script saves there).
    """
    options = common.merge_config(common.default_config(), model_options or {}, "model_options")["backwork"]
    if options["num_examples"] < 1:
        raise UserError("backwork.num_examples must be at least 1")
    model_path = str(model) if isinstance(model, (str, Path)) else model.name
    if isinstance(model, (str, Path)):
        model = common.load_trained_model(model, data["x_train"])
    labels = list(range(model.output_shape[-1])) if labels is None else labels
    missing = [label for label in labels if not np.any(data["y_train"] == label)]
    if missing:
        raise UserError(f"the training data has no examples of labels {missing}; choose others with --labels")
    backworker, results = Backworker(model, options), {}
    for label in labels:
        label_images = data["x_train"][data["y_train"] == label]
        results[label] = {**backworker.run(label_images, label, progress), "model": model_path}
        if on_label is not None:
            on_label(label, results[label])
    return results


# ---------------------------------------------------------------------------- figures


def plot_image_grid(rows, title, path):
    """One row per entry of rows, a list of (images, titles); grey or colour images in [0, 1]."""
    pyplot = common.pyplot()
    columns = max(len(images) for images, _ in rows)
    figure, axes = pyplot.subplots(len(rows), columns, figsize=(1.4 * columns, 1.55 * len(rows)), squeeze=False)
    for (images, titles), row_axes in zip(rows, axes):
        for column, axis in enumerate(row_axes):
            axis.axis("off")
            if column < len(images):
                axis.imshow(images[column], cmap="gray", vmin=0, vmax=1)
                axis.set_title(titles[column], fontsize=8)
    figure.suptitle(title)
    common.save_figure(figure, path)


def plot_results(results, path):
    """Every label's images, titled with their label probability (the original's view_results)."""
    rows = [(result["images"], [f"{label}: {probs[label]:.4f}" for probs in result["probs"]])
            for label, result in sorted(results.items())]
    plot_image_grid(rows, "backworked images (label: probability)", path)


def plot_worst_training(results, path):
    """The training examples classified worst for each label (the original's graph_training_set)."""
    rows = [(result["worst_training_images"],
             [f"{label}: {probs[label]:.2f} ({probs.argmax()})" for probs in result["worst_training_probs"]])
            for label, result in sorted(results.items())]
    plot_image_grid(rows, "training examples classified worst (label: probability (predicted))", path)


# ------------------------------------------------------------------------------- main


def parse_labels(text, num_classes):
    """'3', '0-9' or '1,4,7' -> sorted list of labels, each checked against num_classes."""
    labels = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise UserError(f"--labels {text!r} must look like 3, 0-9 or 1,4,7")
        first, last = int(match[1]), int(match[2] or match[1])
        labels.update(range(first, last + 1))
    out_of_range = sorted(label for label in labels if not 0 <= label < num_classes)
    if out_of_range or not labels:
        raise UserError(f"--labels {text!r}: labels must be between 0 and {num_classes - 1}")
    return sorted(labels)


def summary_table(results):
    lines = ["label  min p     mean p    reached  steps  reinit  seconds  nearest train dist"]
    for label, result in sorted(results.items()):
        probabilities = result["probs"][:, label]
        reached = int(np.sum(probabilities >= result["options"]["prob_cap_min"]))
        lines.append(f"{label:>5}  {probabilities.min():.5f}  {probabilities.mean():.5f}  "
                     f"{reached:>3}/{len(probabilities):<3}  {result['steps']:>5}  {result['reinitialised']:>6}  "
                     f"{result['seconds']:>7.1f}  {result['nearest_training_distance'].mean():.4f}")
    return "\n".join(lines)


def load_label_results(out_dir):
    """Every results_{label}.pkl in a folder, so figures include labels run by other processes."""
    results = {}
    for path in sorted(Path(out_dir).glob("results_*.pkl")):
        result = common.load_results(path)
        results[int(result["label"])] = result
    return results


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description="Backwork strongly classified spurious inputs.")
    proc_mnist.add_common_arguments(parser, "backwork")
    parser.add_argument("--model", default="runs/default/model.keras", help="model trained by proc_mnist.py")
    parser.add_argument("--labels", help="labels to backwork: 3, 0-9 or 1,4,7 (default: all)")
    parser.add_argument("--num-examples", type=int, help="images per label (overrides backwork.num_examples)")
    parser.add_argument("--out", help="output folder (default: backwork/ beside the model)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_arguments(argv)
    if args.num_examples is not None:
        args.set.append(f"backwork.num_examples={args.num_examples}")
    config = proc_mnist.resolve_cli_config(args, "backwork")
    out_dir = common.ensure_writable_dir(args.out or Path(args.model).parent / "backwork")
    data = common.load_mnist(args.data)
    model = common.load_trained_model(args.model, data["x_train"])
    labels = parse_labels(args.labels or f"0-{model.output_shape[-1] - 1}", model.output_shape[-1])

    def save(label, result):  # Each label as it finishes: an interrupted run keeps the done ones.
        common.save_results(out_dir / f"results_{label}.pkl", {**result, "model": str(args.model)})

    results = get_faulty_input_layer(data, config, model, labels, on_label=save)
    print(summary_table(results))
    every_label = load_label_results(out_dir)  # Labels that other processes wrote too.
    plot_results(every_label, out_dir / "backwork.png")
    plot_worst_training(every_label, out_dir / "worst_training.png")
    print(f"results and figures in {out_dir}")
    return 0


if __name__ == "__main__":
    common.run_cli(main)
