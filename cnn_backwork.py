"""Backwork inputs: find images a trained CNN is sure about that look like nothing to us.

    python cnn_backwork.py --model runs/default/model.keras [CONFIG] [--data PATH]
                           [--labels 3 | 0-9 | 1,4,7] [--num-examples 8] [--out DIR] [--seed N]
                           [--worker I/N]
    python cnn_backwork.py --evaluate runs/default/backwork --model MODEL [MODEL ...]

For a label l, a batch of images x (pixels in [0, 1]) is optimised with Adam on

    cost = sum over cost layers k (the input, each conv block, each fc pre-activation) of
             layer_cost_coeffs[k] * (reference_cost_coeff / reference_distance_k
                                   + batch_cost_coeff / batch_distance_k)
         + layer_cost_coeffs[-1] * mean(loss(l, x))

loss(l, x) is backwork.loss (label_loss): "probability", the original 1 - p(l | x), whose
gradient vanishes where p(l) is near 0; "log_probability", -log p(l | x); or "margin",
the largest other logit minus l's, clamped below at -margin_kappa (Carlini and Wagner).

reference_distance_k is the mean squared distance of each image's layer-k activations to
those of its nearest training example of label l (averaged over the batch), and
batch_distance_k the mean over pairs of different images in the batch. The probability
term pulls the images into the label; the distance terms push them away from anything
the label looks like at every layer, most strongly at the higher layers.

All requested labels are optimised in one batch by one compiled loop (Backworker): the
batch holds num_examples images per label, and its cost is the sum over labels of each
label's cost above, so each image's gradient is the one a run of its label alone gives
(the batch distance compares images of the same label only). Each label keeps its own
training activations, nearest-reference search, re-initialisations, records, step count
and stopping rule; a label that stops is frozen and leaves the batch while the others
go on. With the same seed, a label's images are the same (up to float rounding, as the
batch size differs) whether it runs alone (--labels 3) or with others.

The nearest-reference search (each image against every training example of its label,
at every cost layer) reads all of the label's training activations, about 6,000 x 11,000
floats for MNIST, at every search; it runs every nearest_every steps (and at once for a
label whose images were re-initialised). In between, the distance to the reference found
is still computed exactly at every step, so the gradient is that of the cost with that
reference. Measured with bench/bench_backwork.py --batched (default model trained 6,000
steps, 10 labels x 8 images, 2 cores shared with other jobs, load 3-4): the optimisation
took 73 s searching at every step, 23 s every 5 and 13 s every 25 (the default), with
the same lowest probability (0.99903), steps (50-200) and pixel distances to the nearest
training image (0.214 to 0.322) in every case; for label 0, searching every 25 or 100
steps instead of every step moved no image's distance by more than 0.001. The nearest
training example of an image made of static hardly changes as the image moves, so
searching at every step mostly re-finds the same one. (nearest_every = 1 is there for
comparison, not speed: each search is its own call with its own forward pass, so it is
slower than a search fused into the step; 67 s for the whole command against 28.5 s with
the default, back to back at load 2.2-2.5.)

Where the time of the whole command goes (the default model, 10 labels, 2 cores, 28.4 s
in the middle of 9 runs; README "Results" has the measurements): about 3.5 s starting
up; 11.5-13 s computing the training activations of the 60,000 training images (a
forward pass bound by the convolutions' arithmetic, plus the first touch of the 2.7 GB
they fill), while a second thread traces the step loop and the search; about 10 s
optimising; 1 s for the figures. backwork.max_reference_examples = 2000 cuts the
activations by about three quarters with the same probabilities, steps and pixel
distances (within 0.0005, measured on an earlier model); it also draws
worst_training.png from those 2,000 examples per label instead of all of them.

Re-initialisation is what the slowest labels wait for: an image that starts far from its
label (p near 0, where the softmax gives the probability term no gradient) does not move
towards it, and is restarted once its probability fell at num_mono_dec_saves records in
a row. With a record every save_freq = 10 steps that is 40 steps (100 with the earlier 25),
and a label stops within 10 steps of reaching the cap: the optimisation took 10.0 s
instead of 15.0 s with the same images' quality (bench: README "Results").

steps_to_reach[i] is the first step (counted from the start of the label's run, checked
after every step inside the compiled loop) at which image i's label probability was at
least prob_cap_min; it is reset to -1 when the image is re-initialised and is -1 if the
image never reached the cap since. seconds is the wall time from the start of the run
(all its labels' training activations included) until that label stopped.

A cost or image that stops being finite stops its label at once; the other labels go on
and are saved, then the run ends with a UserError naming the label and step. Nothing is
saved for a label that diverged.

Each label writes results_{label}.pkl (read them with common.load_results) to the output
folder (default: backwork/ beside the model) as it stops, plus backwork.png and
worst_training.png (drawn from every results_{label}.pkl in the folder).

On several machines, each process takes its share of the labels into the same folder (on
a shared filesystem): with --worker I/N (I from 0), or where TensorFlow's TF_CONFIG is set,
from its chief and worker tasks (the chief first). Worker I takes every N-th of the sorted
labels from the I-th, so no two workers take the same label and none needs to talk to
another; a label's images are the same whichever worker runs it, as they are for a batch.
Each worker writes its TensorBoard logs to logs/worker_I, and draws the figures from every
results file in the folder when it ends, saying which of the model's labels are still
missing (preprocess_data.py needs all of them).
"""
import argparse
import concurrent.futures
import re
import time
from pathlib import Path

import numpy as np

import common
import distributed
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
    # The layer sizes are static, so every flat tensor keeps its (None, D) shape in a trace.
    flat = [tf.reshape(tensor, (-1, int(np.prod(tensor.shape[1:])))) for tensor in [images, *outputs[:-1]]]
    return flat, outputs[-1]


def squared_distances(rows, references, reference_norms):
    """Mean squared distance between each row (N, D) and each reference (R, D): (N, R).

    Expands |a - b|^2 = |a|^2 + |b|^2 - 2 a.b so that the only large product is one
    matrix multiply: the (N, R, D) difference tensor is never built.
    """
    import tensorflow as tf

    row_norms = tf.reduce_sum(tf.square(rows), axis=1, keepdims=True)  # (N, 1)
    # references x rows, not rows x references: the same product, faster where N is a few
    # images and R thousands of training examples (the search: 13.7 against 18.4 ms for
    # 8 images and 6,000 references of 6,272 values).
    products = tf.transpose(tf.matmul(references, rows, transpose_b=True))  # (N, R)
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


def reference_features(features_model, images, max_examples, seed, batch_size=1000, compiled=None):
    """The label's training images at every cost layer: [(activations (R, D), squared norms (R,))].

    Also returns the images used and their logits (R, classes), from which the
    worst-classified are picked. compiled, if given, is flat_features(features_model, .)
    as a tf.function (Backworker passes one): about 20% faster than calling the model
    eagerly, and this forward pass over every training image of the label is a large
    part of a backwork run.
    """
    import tensorflow as tf

    if max_examples and len(images) > max_examples:
        images = images[np.random.default_rng(seed).choice(len(images), max_examples, replace=False)]
    features = compiled or (lambda chunk: flat_features(features_model, chunk))
    chunks = [features(images[start:start + batch_size]) for start in range(0, len(images), batch_size)]
    layers = [tf.concat([flat[index] for flat, _ in chunks], axis=0) for index in range(len(chunks[0][0]))]
    logits = tf.concat([chunk_logits for _, chunk_logits in chunks], axis=0)
    return [(layer, tf.reduce_sum(tf.square(layer), axis=1)) for layer in layers], images, logits.numpy()


def worst_classified(images, logits, label, count=8):
    """The count training images given the lowest probability of their label, and their probabilities."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)
    order = np.argsort(probabilities[:, label])[:count]
    return images[order], probabilities[order]


def label_loss(logits, labels, options):
    """Each image's label term (N,) from its logits (N, classes): backwork.loss, lower is better.

    - "probability": 1 - p(l), the original method's term. Its gradient through the softmax
      is p(l) (1 - p(l)) times the logits' gradient, so it vanishes where p(l) is near 0:
      an image the network gives p(l) = 1e-6 (noise on a retrained model) cannot move.
    - "log_probability": -log p(l), computed from the logits as logsumexp - z_l so that it
      stays finite however small p(l) is; its logits gradient is softmax - onehot(l),
      never smaller than 1 - p(l) in size.
    - "margin": Carlini and Wagner's loss, the largest other logit (an extra "none" output
      included) minus the label's, clamped below at -margin_kappa: its logits gradient is
      +1 and -1 until the label leads by kappa, whatever the probabilities.
    """
    import tensorflow as tf

    label_logits = tf.gather(logits, labels, batch_dims=1)  # (N,)
    loss = options.get("loss", "probability")
    if loss == "probability":
        return 1.0 - tf.gather(tf.nn.softmax(logits), labels, batch_dims=1)
    if loss == "log_probability":
        return tf.reduce_logsumexp(logits, axis=1) - label_logits
    others = tf.where(tf.one_hot(labels, tf.shape(logits)[1]) > 0, tf.constant(-np.inf, logits.dtype), logits)
    return tf.maximum(tf.reduce_max(others, axis=1) - label_logits, -options["margin_kappa"])


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
        labels = tf.fill(tf.shape(logits)[:1], label)
        total = coefficients[-1] * tf.reduce_mean(label_loss(logits, labels, options))
        for weight, rows, (layer_references, norms) in zip(coefficients, flat, references):
            layer_cost = reference_weight / (distance(rows, layer_references, norms) + DISTANCE_EPSILON)
            if images.shape[0] > 1:  # One image has no batch to keep away from.
                layer_cost += batch_weight / (batch_distance(rows) + DISTANCE_EPSILON)
            total += weight * layer_cost
        return total, probabilities

    return cost


def grouped_batch_distance(grouped):
    """Per label, the mean distance between different images of that label: (L, n, D) -> (L,).

    Images of different labels are never compared: each label's term is what a run of
    that label alone computes (batch_distance).
    """
    import tensorflow as tf

    count = tf.shape(grouped)[1]
    norms = tf.reduce_sum(tf.square(grouped), axis=2)  # (L, n)
    products = tf.matmul(grouped, grouped, transpose_b=True)  # (L, n, n)
    distances = tf.maximum(norms[:, :, tf.newaxis] + norms[:, tf.newaxis, :] - 2.0 * products, 0.0)
    distances /= tf.cast(tf.shape(grouped)[2], grouped.dtype)
    off_diagonal = 1.0 - tf.eye(count, dtype=grouped.dtype)
    pairs = tf.cast(count * (count - 1), grouped.dtype)
    return tf.reduce_sum(distances * off_diagonal, axis=[1, 2]) / pairs


def grouped_cost(flat, logits, nearest, image_labels, count, coefficients, options):
    """Each label's cost (L,) and each image's label probability (N,), for a batch of L labels.

    The batch holds the labels one after another, count (n) images each; nearest holds
    each image's nearest reference at every cost layer (from Backworker.find_nearest). Label
    g's cost is make_cost_function's cost of its n images alone, so the gradient of the
    sum over labels with respect to one label's images is that label's own gradient.
    """
    import tensorflow as tf

    probabilities = tf.gather(tf.nn.softmax(logits), image_labels, batch_dims=1)  # (N,)
    losses = label_loss(logits, image_labels, options)  # (N,)
    total = coefficients[-1] * tf.reduce_mean(tf.reshape(losses, (-1, count)), axis=1)  # (L,)
    for weight, rows, nearest_rows in zip(coefficients, flat, nearest):
        grouped = tf.reshape(rows, (-1, count, rows.shape[1]))  # (L, n, D)
        reference = tf.reduce_mean(tf.square(grouped - tf.reshape(nearest_rows, (-1, count, rows.shape[1]))),
                                   axis=[1, 2])  # (L,)
        layer_cost = options["reference_cost_coeff"] / (reference + DISTANCE_EPSILON)
        if count > 1:  # One image has no batch to keep away from.
            layer_cost += options["batch_cost_coeff"] / (grouped_batch_distance(grouped) + DISTANCE_EPSILON)
        total += weight * layer_cost
    return total, probabilities


# ----------------------------------------------------------------------- optimisation


class PixelAdam:
    """Adam on a batch of images, with per-image moments and step counts.

    Written out (rather than keras.optimizers.Adam) so that re-initialising one image
    also restarts its moments and bias correction without touching the others, and so
    that the images of a label that has stopped can be frozen while the others move.
    """

    def __init__(self, images, learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        import tensorflow as tf

        self.images = tf.Variable(images, name="images")  # (N, H, W, C)
        self.first_moment = tf.Variable(tf.zeros_like(images))
        self.second_moment = tf.Variable(tf.zeros_like(images))
        self.steps = tf.Variable(tf.zeros((len(images), 1, 1, 1)))
        self.learning_rate, self.beta_1, self.beta_2, self.epsilon = learning_rate, beta_1, beta_2, epsilon

    def apply(self, gradient, indices=None):
        """One Adam step; with indices (M,), gradient (M, H, W, C) moves only those images."""
        import tensorflow as tf

        variables = [self.steps, self.first_moment, self.second_moment, self.images]
        steps, first_moment, second_moment, images = (
            variables if indices is None else [tf.gather(variable, indices) for variable in variables])
        steps = steps + 1.0
        first_moment = self.beta_1 * first_moment + (1 - self.beta_1) * gradient
        second_moment = self.beta_2 * second_moment + (1 - self.beta_2) * tf.square(gradient)
        # Bias correction folded into the step size, as keras.optimizers.Adam does it.
        step_size = self.learning_rate * tf.sqrt(1 - self.beta_2 ** steps) / (1 - self.beta_1 ** steps)
        step = step_size * first_moment / (tf.sqrt(second_moment) + self.epsilon)
        # Keep valid pixels: the network was only trained on [0, 1].
        images = tf.clip_by_value(images - step, 0.0, 1.0)
        for variable, value in zip(variables, [steps, first_moment, second_moment, images]):
            if indices is None:
                variable.assign(value)
            else:
                variable.scatter_nd_update(indices[:, tf.newaxis], value)

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
    """Backworks num_labels labels of one model together; its compiled steps are traced once.

    The batch holds num_examples images per label, label after label (group g is rows
    g*n to (g+1)*n). Each label keeps its own references, nearest-reference search,
    re-initialisations, step count and stopping; a label that has stopped is frozen.
    """

    def __init__(self, model, options, num_labels=1, reference_cache=None):
        """reference_cache, a dict, keeps each label's training activations for the next
        Backworker of the same model (the attack suite runs several): they depend only on
        the model and the training images, and computing them is a large part of a run."""
        import tensorflow as tf

        check_options(options)
        if num_labels < 1:
            raise UserError("backwork needs at least one label; choose some with --labels")
        self.model, self.options, self.num_labels = model, options, num_labels
        self.reference_cache = {} if reference_cache is None else reference_cache
        # The same network, its first convolution's input gradient taken faster (a fifth of a step).
        self.features_model = proc_mnist.input_gradient_model(feature_model(model))
        self.cost_layers = cost_layer_names(model)
        self.coefficients = layer_coefficients(options, len(self.cost_layers))
        self.count, image_shape = options["num_examples"], tuple(model.input_shape[1:])
        total = num_labels * self.count
        self.optimizer = PixelAdam(np.zeros((total, *image_shape), np.float32), options["learning_rate"])
        self.sizes = sizes = [int(np.prod(image_shape))] + [
            int(np.prod(self.model.get_layer(name).output.shape[1:])) for name in self.cost_layers[1:]]
        # Per image: its nearest reference at every cost layer, kept between searches.
        self.nearest = [tf.Variable(tf.zeros((total, size))) for size in sizes]
        self.active = tf.Variable(tf.zeros(num_labels, tf.bool))  # Per label: still optimising.
        self.first_reached = tf.Variable(tf.fill([total], -1))  # Per image: steps_to_reach.
        self.diverged_at = tf.Variable(tf.fill([num_labels], -1))  # Per label: first non-finite step.
        signature = [tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32), tf.TensorSpec([num_labels], tf.int32)]
        self.run_steps = tf.function(self._run_steps, input_signature=signature)
        image_spec = tf.TensorSpec([None, *image_shape], tf.float32)
        self.compiled_features = tf.function(lambda images: flat_features(self.features_model, images),
                                             input_signature=[image_spec])
        # References of any count (R): one trace serves every label.
        reference_spec = [(tf.TensorSpec([None, size], tf.float32), tf.TensorSpec([None], tf.float32))
                          for size in sizes]
        self.find_nearest = tf.function(self._find_nearest, input_signature=[image_spec, reference_spec])

    def _compile(self, labels):
        """Trace and optimise the search and the step loop (2 s) without changing any state.

        Runs in a thread while the training activations are computed: tracing is mostly
        Python on one core, which the activations leave partly idle. With no label active,
        the loop of zero steps touches no image, and the search of one zero reference
        returns its result without storing it.
        """
        import tensorflow as tf

        self.find_nearest(self.optimizer.images[:self.count],
                          [(tf.zeros((1, size)), tf.zeros((1,))) for size in self.sizes])
        self.run_steps(tf.constant(0), tf.constant(0), labels)

    # -- inside the compiled loop

    def _find_nearest(self, images, references):
        """The nearest of one label's references to each of its images, at every cost layer: [(n, D)]."""
        import tensorflow as tf

        flat, _ = flat_features(self.features_model, images)
        return [tf.gather(layer_references, tf.argmin(squared_distances(rows, layer_references, norms), axis=1))
                for rows, (layer_references, norms) in zip(flat, references)]

    def _run_steps(self, num_steps, first_step, labels):
        """num_steps steps of every active label from step first_step, with the nearest references kept.

        Returns each step's cost per label (num_steps, L) and the label probabilities (N,)
        after the last step. Records steps_to_reach and divergence at every step. Only
        the active labels' images go through the network; the others are left as they are.
        """
        import tensorflow as tf

        image_labels = tf.repeat(labels, self.count)  # (N,)
        costs = tf.TensorArray(tf.float32, size=num_steps)
        for index in tf.range(num_steps):
            # first_step + index: the steps each active label has made so far (all start at 0).
            if tf.reduce_any(self.active):  # A batch of none would fail in the convolutions.
                label_costs = self._step(first_step + index, image_labels)
            else:
                label_costs = tf.zeros([self.num_labels])
            costs = costs.write(index, label_costs)
        probabilities = tf.zeros([self.num_labels * self.count])
        if tf.reduce_any(self.active):
            probabilities = self._final_probabilities(first_step + num_steps, image_labels)
        return costs.stack(), probabilities

    def _step(self, step, image_labels):
        """One optimisation step of the active labels' images; returns each label's cost (L,)."""
        import tensorflow as tf

        moving = tf.where(tf.repeat(self.active, self.count))[:, 0]  # (M,) the active labels' images
        images = tf.gather(self.optimizer.images, moving)  # (M, H, W, C)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(images)
            flat, logits = flat_features(self.features_model, images)
            active_costs, probabilities = grouped_cost(
                flat, logits, [tf.gather(rows, moving) for rows in self.nearest], tf.gather(image_labels, moving),
                self.count, self.coefficients, self.options)
            total = tf.reduce_sum(active_costs)
        gradient = tape.gradient(total, images)
        label_costs = tf.scatter_nd(tf.where(self.active), active_costs, [self.num_labels])  # (L,)
        self._record(step, label_costs, moving, probabilities)
        self.optimizer.apply(gradient, moving)
        return label_costs

    def _final_probabilities(self, step, image_labels):
        """The label probabilities (N,) after a block (0 for stopped labels), recorded for steps_to_reach."""
        import tensorflow as tf

        moving = tf.where(tf.repeat(self.active, self.count))[:, 0]
        logits = flat_features(self.features_model, tf.gather(self.optimizer.images, moving))[1]
        probabilities = tf.gather(tf.nn.softmax(logits), tf.gather(image_labels, moving), batch_dims=1)
        self._record_reached(step, moving, probabilities)
        return tf.scatter_nd(moving[:, tf.newaxis], probabilities, [self.num_labels * self.count])

    def _record(self, step, label_costs, moving, probabilities):
        """Freeze a label whose cost or images stopped being finite; note who reached the cap."""
        import tensorflow as tf

        images = tf.reshape(self.optimizer.images, (self.num_labels, -1))
        finite = tf.math.is_finite(label_costs) & tf.reduce_all(tf.math.is_finite(images), axis=1)
        self.diverged_at.assign(tf.where(self.active & ~finite, step, self.diverged_at))
        self._record_reached(step, moving, probabilities)
        self.active.assign(self.active & finite)

    def _record_reached(self, step, moving, probabilities):
        """steps_to_reach: the first step at which each moving image's probability reached cap."""
        import tensorflow as tf

        first = tf.gather(self.first_reached, moving)
        self.first_reached.scatter_nd_update(moving[:, tf.newaxis],
                                             tf.where((probabilities >= self.options["prob_cap_min"]) & (first < 0),
                                                      step, first))

    # -- outside it, at every record

    def run(self, images_by_label, progress=print, on_label=None, on_record=None):
        """Optimise options['num_examples'] images towards each label; return {label: results}.

        images_by_label maps each label to its training images (as many labels as num_labels).
        on_label(label, results) is called as each label stops, on_record(label, step, cost,
        probabilities) at each of its records.
        """
        if len(images_by_label) != self.num_labels:
            raise ValueError(f"this Backworker runs {self.num_labels} labels at a time, not {len(images_by_label)}")
        # A first Ctrl-C or SIGTERM is noted and acted on between compiled calls (after saving
        # the labels that stopped in the block under way), never raised inside TensorFlow.
        with common.InterruptsDeferred("interrupted: stopping after the block under way (again to stop now)") \
                as deferred:
            return self._run(images_by_label, progress, on_label, on_record, deferred)

    def _run(self, images_by_label, progress, on_label, on_record, deferred):
        import tensorflow as tf

        options, start, states = self.options, time.perf_counter(), []
        labels = tf.constant(list(images_by_label), tf.int32)
        self.active.assign(tf.zeros_like(self.active))  # So that compiling runs no step.
        self.compiled_features.get_concrete_function()  # Traced here: one thread traces the model at a time.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            compiled = pool.submit(self._compile, labels)
            for label, label_images in images_by_label.items():
                _stop_if(deferred)
                states.append(LabelState(label, label_images, self, options))
            compiled.result()
        progress(f"training activations of {len(states)} labels in {time.perf_counter() - start:.1f} s")
        self.optimizer.reset(np.arange(self.num_labels * self.count),
                             np.concatenate([state.next_images(self.count) for state in states]))
        for variable, value in [(self.active, True), (self.first_reached, -1), (self.diverged_at, -1)]:
            variable.assign(tf.fill(variable.shape, value))
        step, results, failures = 0, {}, []
        while step < options["max_num_steps"] and np.any(self.active.numpy()):
            block_end = min(step + options["save_freq"], options["max_num_steps"])
            costs, probabilities, step = self._run_block(step, block_end, labels, states)
            images, diverged_at = self.optimizer.images.numpy(), self.diverged_at.numpy()
            for group, state in enumerate(states):
                rows = slice(group * self.count, (group + 1) * self.count)
                if state.done:
                    continue
                if diverged_at[group] >= 0:
                    state.done = True
                    failures.append(diverged_message(state.label, diverged_at[group], costs[:, group], options))
                    progress(failures[-1])
                    continue
                state.record(step, costs[:, group], probabilities[rows], images[rows], progress)
                if on_record is not None:
                    on_record(state.label, step, float(costs[-1, group]), probabilities[rows])
                if state.should_stop(step) or step >= options["max_num_steps"]:
                    self._finish(group, state, step, start, results, on_label)
                else:
                    self._reinitialise_stuck(group, state)
            _stop_if(deferred)
        for group, state in enumerate(states):  # Labels cut off by max_num_steps with others.
            if not state.done:
                self._finish(group, state, step, start, results, on_label)
        if failures:
            raise UserError("; ".join(failures))
        return results

    def _run_block(self, step, block_end, labels, states):
        """Steps up to block_end, searching each label's nearest references when due.

        A label's search is due every nearest_every steps and at once after its images
        were re-initialised; between searches the compiled loop runs without stopping.
        Returns the costs (steps, L), the probabilities after the block (N,) and block_end.
        """
        every, costs = self.options["nearest_every"], []
        while step < block_end:
            active = self.active.numpy()
            for group, state in enumerate(states):
                if active[group] and (state.search_due or step % every == 0):
                    self._search(group, state)
            chunk_end = min(block_end, (step // every + 1) * every)
            chunk_costs, probabilities = self.run_steps(chunk_end - step, step, labels)
            costs.append(chunk_costs.numpy())
            step = chunk_end
        return np.concatenate(costs), probabilities.numpy(), step

    def _search(self, group, state):
        rows = slice(group * self.count, (group + 1) * self.count)
        for variable, nearest in zip(self.nearest, self.find_nearest(self.optimizer.images[rows], state.references)):
            variable[rows].assign(nearest)
        state.search_due = False

    def _finish(self, group, state, step, start, results, on_label):
        import tensorflow as tf

        state.done = True
        self.active.assign(tf.tensor_scatter_nd_update(self.active, [[group]], [False]))
        rows = slice(group * self.count, (group + 1) * self.count)
        results[state.label] = state.results(self.optimizer.images.numpy()[rows], self.first_reached.numpy()[rows],
                                             step, time.perf_counter() - start, self)
        if on_label is not None:
            on_label(state.label, results[state.label])

    def _reinitialise_stuck(self, group, state):
        """The original's escape from local minima: restart images that keep losing the label."""
        import tensorflow as tf

        stuck = state.stuck()
        if not len(stuck):
            return
        indices = group * self.count + stuck
        self.optimizer.reset(indices, state.next_images(len(stuck)))
        self.first_reached.scatter_nd_update(indices[:, None], tf.fill([len(stuck)], -1))
        state.search_due = True


def _stop_if(deferred):
    if deferred.interrupted:
        raise KeyboardInterrupt


class LabelState:
    """What one label keeps between records: its references, random draws, history and falls."""

    def __init__(self, label, label_images, backworker, options):
        self.label, self.label_images, self.options, self.done = int(label), label_images, options, False
        self.search_due = True  # Search the nearest references before the first step.
        seed = [options["seed"], self.label]  # Independent of which other labels a process runs.
        self.rng = np.random.default_rng(seed)
        # Subsampled references depend on the seed too; all of them only on the label.
        key = (self.label, options["max_reference_examples"], options["seed"] if options["max_reference_examples"] else 0)
        if key not in backworker.reference_cache:
            backworker.reference_cache[key] = reference_features(
                backworker.features_model, label_images, options["max_reference_examples"], seed,
                compiled=backworker.compiled_features)
        self.references, self.reference_images, self.training_logits = backworker.reference_cache[key]
        count = options["num_examples"]
        self.history, self.reinitialised = [], 0
        self.falls, self.previous, self.probabilities = np.zeros(count, int), np.full(count, -np.inf), None
        self.costs = np.zeros(0)

    def next_images(self, count):
        return initial_images(self.label_images, count, self.rng, self.options["init_w_train_vals"])

    def record(self, step, costs, probabilities, images, progress):
        self.costs, self.probabilities = costs, probabilities
        self.history.append({"step": step, "images": _drop_single_channel(images), "probs": probabilities,
                             "cost": float(costs[-1])})
        # A copy: stuck() marks re-initialised images in previous, which must not reach the history.
        self.falls, self.previous = count_falls(self.falls, self.previous, probabilities), probabilities.copy()
        progress(f"label {self.label}  step {step}  cost {costs[-1]:.4g}  p min {probabilities.min():.4f}  "
                 f"mean {probabilities.mean():.4f}  reinitialised {self.reinitialised}")

    def should_stop(self, step):
        return step >= self.options["min_num_steps"] and _should_stop(self.costs, self.probabilities, self.options)

    def stuck(self):
        stuck = np.flatnonzero((self.falls >= self.options["num_mono_dec_saves"])
                               & (self.probabilities < self.options["reinit_below"]))
        self.falls[stuck], self.previous[stuck] = 0, -np.inf
        self.reinitialised += len(stuck)
        return stuck

    def results(self, images, first_reached, step, seconds, backworker):
        worst_images, worst_probabilities = worst_classified(self.reference_images, self.training_logits, self.label)
        return {
            "format_version": common.RESULTS_FORMAT_VERSION,
            "label": self.label,
            "images": _drop_single_channel(images),
            "probs": np.asarray(backworker.model(images, training=False), np.float32),
            "history": self.history,
            "steps": int(step),
            "steps_to_reach": first_reached.astype(np.int64),
            "seconds": seconds,
            "reinitialised": int(self.reinitialised),
            "nearest_training_distance": nearest_distances(images, self.label_images),
            "worst_training_images": _drop_single_channel(worst_images),
            "worst_training_probs": worst_probabilities,
            "layer_cost_coeffs": backworker.coefficients,
            "cost_layers": backworker.cost_layers,
            "options": dict(self.options),
        }


def diverged_message(label, step, costs, options):
    bad = [cost for cost in costs if not np.isfinite(cost)]
    value = f"cost {bad[0]}" if bad else "images not finite"
    return (f"backwork of label {label} diverged at step {step} ({value}); lower backwork.learning_rate "
            f"(now {options['learning_rate']}) or check that the model's weights are finite")


def backwork_label(model, label_images, label, options, progress=print):
    """Optimise options['num_examples'] images towards label; return the results dict."""
    return Backworker(model, options).run({label: label_images}, progress)[label]


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
                           progress=print, on_label=None, on_record=None, reference_cache=None):
    """Backwork every label in labels (default: all), all in one batch, and return {label: results}.

    data is a dict as from common.load_dataset; model_options a config dict whose
    'backwork' section overrides the defaults; model a Keras model or the path of one.
    on_label(label, results) is called as each label stops (the script saves there), and
    on_record(label, step, cost, probabilities) at each record (the script logs there);
    reference_cache as Backworker's.
    """
    options = common.merge_config(common.default_config(), model_options or {}, "model_options")["backwork"]
    check_options(options)
    model_path = str(model) if isinstance(model, (str, Path)) else model.name
    if isinstance(model, (str, Path)):
        model = common.load_trained_model(model, data["x_train"])
    labels = list(range(model.output_shape[-1])) if labels is None else list(labels)
    missing = [label for label in labels if not np.any(data["y_train"] == label)]
    if missing:
        raise UserError(f"the training data has no examples of labels {missing}; choose others with --labels")
    if len(set(labels)) != len(labels):
        raise UserError(f"labels {labels} name a label twice; give each once")

    def finished(label, result):
        result["model"] = model_path
        if data.get("provenance"):
            result["data"] = data["provenance"]
        if on_label is not None:
            on_label(label, result)

    images_by_label = {label: data["x_train"][data["y_train"] == label] for label in labels}
    return Backworker(model, options, len(labels), reference_cache).run(images_by_label, progress, finished,
                                                                        on_record)


def check_options(options):
    """Refuse a [backwork] value outside its range (common.VALUE_RULES) in one line naming the key."""
    common.check_section("backwork", options, source="backwork options")


# --------------------------------------------------------------------------- transfer


def target_probabilities(model, results):
    """Each backworked image's probability, under model, of the label it was made for."""
    return np.concatenate([common.predict(model, common.with_channel(result["images"]))[:, label]
                           for label, result in sorted(results.items())])


def fooling_numbers(model, results, cap):
    """How model classifies backworked images: mean target probability and fractions above levels."""
    probabilities = target_probabilities(model, results)
    return {"mean_p": float(probabilities.mean()), "above_0.5": float(np.mean(probabilities > 0.5)),
            "above_0.99": float(np.mean(probabilities > 0.99)), "at_cap": float(np.mean(probabilities >= cap))}


def evaluate(results_dir, model_paths):
    """{model path: fooling_numbers} for a folder of results on each model (do the images transfer?)."""
    results = load_label_results(results_dir)
    if not results:
        raise UserError(f"{results_dir} holds no results_<label>.pkl; run cnn_backwork.py first or fix --evaluate")
    images = common.with_channel(next(iter(results.values()))["images"])
    cap = next(iter(results.values()))["options"].get("prob_cap_min", 0.999)
    numbers = {}
    for path in model_paths:
        model = common.load_trained_model(path, images)
        if model.output_shape[-1] <= max(results):
            raise UserError(f"model {path} has {model.output_shape[-1]} classes, fewer than the labels "
                            f"{sorted(results)} of {results_dir}; use models of the same classes")
        numbers[str(path)] = fooling_numbers(model, results, cap)
    return numbers


def transfer_table(numbers):
    lines = ["mean p(target)  > 0.5   > 0.99  model"]
    lines += [f"{values['mean_p']:>14.4f}  {values['above_0.5']:>5.1%}  {values['above_0.99']:>6.1%}  {path}"
              for path, values in numbers.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- figures


def plot_image_grid(rows, title, path):
    """One row per entry of rows, a list of (row label, images, titles); grey or colour images in [0, 1].

    Each row is one strip image with its titles as text: 4 times faster to draw than
    one subplot per image (0.4 s against 1.5 s for 10 rows of 8).
    """
    pyplot = common.pyplot()
    columns = max(len(images) for _, images, _ in rows)
    height, width = next(np.shape(images)[1:3] for _, images, _ in rows if len(images))
    gap = max(1, width // 7)  # White space between images, in pixels.
    strip_width = columns * (width + gap) - gap
    figure, axes = pyplot.subplots(len(rows), 1, squeeze=False, layout="constrained",
                                   figsize=(1.3 * columns + 0.8, (1.3 * height / width + 0.3) * len(rows) + 0.4))
    for axis, (row_label, images, titles) in zip(axes[:, 0], rows):
        images = np.asarray(images, np.float32)
        strip = np.ones((height, strip_width) + images.shape[3:], np.float32)
        for column, (image, text) in enumerate(zip(images, titles)):
            left = column * (width + gap)
            strip[:, left:left + width] = image
            axis.text(left + width / 2, -0.5, text, ha="center", va="bottom", fontsize=7)
        axis.imshow(strip, cmap="gray", vmin=0, vmax=1)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_ylabel(row_label, rotation=0, ha="right", va="center", fontsize=9)
        for side in axis.spines.values():
            side.set_visible(False)
    figure.suptitle(title, fontsize=10)
    common.save_figure(figure, path)


def _probability(value):
    """A probability with enough digits to tell 0.999 from 0.9999 and 0.001 from 0."""
    return f"{value:.4f}" if value >= 0.01 else f"{value:.1e}"


def plot_results(results, path):
    """Every label's images, titled with their label probability (the original's view_results)."""
    rows = [(f"label {label}", result["images"], [f"p = {_probability(probs[label])}" for probs in result["probs"]])
            for label, result in sorted(results.items())]
    plot_image_grid(rows, "backworked images, each titled with its label's probability", path)


def plot_worst_training(results, path):
    """The training examples classified worst for each label (the original's graph_training_set)."""
    rows = [(f"label {label}", result["worst_training_images"],
             [f"p = {_probability(probs[label])}, says {probs.argmax()}" for probs in result["worst_training_probs"]])
            for label, result in sorted(results.items()) if "worst_training_images" in result]
    plot_image_grid(rows, "training examples given the lowest probability of their label "
                          "(p of the label; the class the network says)", path)


# ------------------------------------------------------------------------------- main


def parse_labels(text, num_classes):
    """'3', '0-9' or '1,4,7' -> sorted list of labels, each checked against num_classes.

    Each part is range-checked before it is expanded, so '0-100000000' fails at once.
    """
    labels = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise UserError(f"--labels {text!r} must look like 3, 0-9 or 1,4,7")
        first, last = int(match[1]), int(match[2] or match[1])
        if not 0 <= first <= last < num_classes:
            raise UserError(f"--labels {text!r}: labels must be between 0 and {num_classes - 1}, "
                            "each range low-high with low <= high")
        labels.update(range(first, last + 1))
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


RESULTS_NAME = re.compile(r"results_(\d+)\.pkl")


def load_label_results(out_dir, skip_unreadable=False, warn=print):
    """Every results_{label}.pkl in a folder, so figures include labels run by other processes.

    Only names of exactly that form count (results_1_old.pkl is ignored), and the label
    inside each file must be the one in its name. An unreadable file is an error, or with
    skip_unreadable a warning line (through warn) and the file is left out.
    """
    results = {}
    for path in sorted(Path(out_dir).iterdir()):
        match = RESULTS_NAME.fullmatch(path.name)
        if match is None or not path.is_file():
            continue
        try:
            result = common.load_results(path)
            if not isinstance(result, dict) or result.get("label") != int(match[1]):
                found = result.get("label") if isinstance(result, dict) else None
                raise UserError(f"{path} holds the results of label {found!r}, not {int(match[1])}; "
                                "rename or re-create it")
        except UserError as error:
            if not skip_unreadable:
                raise
            warn(f"warning: skipping {path.name} ({error})")
            continue
        results[int(match[1])] = result
    return results


def results_signature(out_dir):
    """Each results file of a folder as (name, inode, size, modification time): any new write changes it."""
    signature = []
    for path in Path(out_dir).iterdir():
        if RESULTS_NAME.fullmatch(path.name):
            # A write renames a new file (a new inode) over the old one, so even a same-sized rewrite shows.
            status = path.stat()
            signature.append((path.name, status.st_ino, status.st_size, status.st_mtime_ns))
    return sorted(signature)


def draw_figures(out_dir):
    """backwork.png and worst_training.png from every results file in out_dir; returns those results.

    Other workers may write results files while this one draws, and the last figure renamed
    into place wins; so the figures are drawn again until no results file changed during a
    draw. Then whichever worker renames last drew every label written before it finished.
    """
    while True:
        before = results_signature(out_dir)
        # Labels that other processes wrote too; a damaged neighbour must not fail this run.
        every_label = load_label_results(out_dir, skip_unreadable=True)
        plot_results(every_label, out_dir / "backwork.png")
        plot_worst_training(every_label, out_dir / "worst_training.png")
        if results_signature(out_dir) == before:
            return every_label


def folder_status(every_label, num_classes, out_dir):
    """The closing line: how many of the model's labels out_dir holds, and which are still missing."""
    missing = sorted(set(range(num_classes)) - set(every_label))
    if not missing:
        return (f"results and figures in {out_dir}: all {num_classes} labels of the model; "
                "preprocess_data.py can go on")
    return (f"results and figures in {out_dir}: {num_classes - len(missing)} of the model's {num_classes} labels; "
            f"still missing {missing} (other workers may still be running; preprocess_data.py needs every label)")


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description="Backwork strongly classified spurious inputs.")
    common.add_common_arguments(parser, "backwork")
    parser.add_argument("--model", nargs="+", default=["runs/default/model.keras"],
                        help="model trained by proc_mnist.py (with --evaluate: one or more models)")
    parser.add_argument("--evaluate", metavar="RESULTS_DIR",
                        help="backwork nothing: report how each --model classifies the images of RESULTS_DIR "
                             "(printed, and written to RESULTS_DIR/transfer.json or --out)")
    parser.add_argument("--labels", help="labels to backwork: 3, 0-9 or 1,4,7 (default: all)")
    parser.add_argument("--num-examples", type=int, help="images per label (overrides backwork.num_examples)")
    parser.add_argument("--out", help="output folder (default: backwork/ beside the model)")
    parser.add_argument("--worker", metavar="I/N",
                        help="backwork only worker I's share of the labels (I from 0, N workers: every N-th "
                             "label from the I-th), into the same --out as the others on a shared filesystem "
                             "(default: from TF_CONFIG's chief and worker tasks if it is set, else every label)")
    return parser.parse_args(argv)


def evaluate_command(args):
    numbers = evaluate(args.evaluate, args.model)
    print(f"how each model classifies the backworked images of {args.evaluate}:")
    print(transfer_table(numbers))
    out_dir = common.ensure_writable_dir(args.out or args.evaluate)
    common.write_json(out_dir / "transfer.json", {"results": str(args.evaluate), "models": numbers})
    print(f"written to {out_dir / 'transfer.json'}")
    return 0


def choose_labels(args, num_classes, worker):
    """The labels this process backworks: its worker's share of --labels (default: every class)."""
    index, count = worker
    requested = parse_labels(args.labels or f"0-{num_classes - 1}", num_classes)
    labels = distributed.worker_share(requested, index, count)
    if count > 1 and labels:
        print(f"worker {index} of {count} (numbered from 0) takes labels {labels} of {requested}")
    elif count > 1:
        print(f"worker {index} of {count} takes none of labels {requested}: there are more workers than "
              "labels; nothing to do")
    return labels


def backwork_and_save(data, config, model, labels, out_dir, log_dir, model_path):
    """Backwork labels, saving each label's results file and logging to log_dir as it goes; return the results."""
    with common.summary_writer(log_dir) as writer:  # Closed on Ctrl-C and SIGTERM too.
        def save(label, result):  # Each label as it finishes: an interrupted run keeps the done ones.
            common.save_results(out_dir / f"results_{label}.pkl", {**result, "model": str(model_path)})
            common.write_images(writer, result["steps"], f"label_{label}/images", result["images"])

        def log(label, step, cost, probabilities):
            common.write_scalars(writer, step, {f"label_{label}/cost": cost,
                                                f"label_{label}/p_min": probabilities.min(),
                                                f"label_{label}/p_mean": probabilities.mean()})

        return get_faulty_input_layer(data, config, model, labels, on_label=save, on_record=log)


def main(argv=None):
    args = parse_arguments(argv)
    if args.num_examples is not None:
        args.set.append(f"backwork.num_examples={args.num_examples}")
    base = common.model_data_config(args.model[0]) if args.config is None else None  # The model's dataset.
    config = common.resolve_cli_config(args, "backwork", base=base)  # Ranges are checked here, before loading.
    if args.evaluate and args.worker:
        raise UserError("--worker shares out the labels to backwork; --evaluate backworks none, so leave it out")
    worker = None if args.evaluate else distributed.resolve_worker(args.worker)  # Also before loading.
    for path in args.model:
        common.check_model_file(path)
    if args.evaluate:
        return evaluate_command(args)
    if len(args.model) != 1:
        raise UserError("backwork takes one --model; several models are for --evaluate RESULTS_DIR")
    args.model = args.model[0]
    data = common.load_dataset(args.data, config["data"]["dataset"])
    model = common.load_trained_model(args.model, data["x_train"])
    num_classes = model.output_shape[-1]
    labels = choose_labels(args, num_classes, worker)
    if not labels:
        return 0
    # Made only once this process has labels, so that a worker with none leaves no folder; an
    # unwritable --out is still found in seconds, before the backwork.
    out_dir = common.ensure_writable_dir(args.out or Path(args.model).parent / "backwork")
    for label in labels:
        if (out_dir / f"results_{label}.pkl").exists():
            print(f"results_{label}.pkl already exists in {out_dir}; this run replaces it")
    index, count = worker
    log_dir = out_dir / "logs"
    if count > 1:  # Workers sharing a folder log to their own subfolders: no two write to the same one.
        # Made here so that a failed start removes it like out_dir (summary_writer removes only worker_I).
        log_dir = common.ensure_writable_dir(log_dir) / f"worker_{index}"
    results = backwork_and_save(data, config, model, labels, out_dir, log_dir, args.model)
    print(summary_table(results))
    every_label = draw_figures(out_dir)
    print(folder_status(every_label, num_classes, out_dir))
    return 0


if __name__ == "__main__":
    common.run_cli(main)
