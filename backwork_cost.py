"""The backwork cost: the layers it compares, the distances, the label term, and its reference form.

For a label l, a batch of images x (pixels in [0, 1]) is optimised on

    cost = sum over cost layers k (the input, each conv block, each fc pre-activation) of
             layer_cost_coeffs[k] * (reference_cost_coeff / reference_distance_k
                                   + batch_cost_coeff / batch_distance_k)
         + layer_cost_coeffs[-1] * mean(loss(l, x))

reference_distance_k is the mean squared distance of each image's layer-k activations to
those of its nearest training example of label l (averaged over the batch), and
batch_distance_k the mean over pairs of different images in the batch. grouped_cost is
the cost the loop computes, for many labels in one batch; make_cost_function is the
same cost for one label alone, kept as the reference the tests and the bench compare
grouped_cost with (see the section "the single-label reference" below).
"""
import re

import numpy as np

from common import UserError

# Keeps 1 / distance finite when an image lands on a training example or on another image.
DISTANCE_EPSILON = 1e-6

# ------------------------------------------------------------------------- the layers


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



# ---------------------------------------------------------------------- the distances


def squared_distances(rows, references, reference_norms):
    """Mean squared distance between each row (N, D) and each reference (R, D): (N, R).

    Expands |a - b|^2 = |a|^2 + |b|^2 - 2 a.b so that the only large product is one
    matrix multiply: the (N, R, D) difference tensor is never built.
    """
    import tensorflow as tf

    row_norms = tf.reduce_sum(tf.square(rows), axis=1, keepdims=True)  # (N, 1)
    # references x rows, not rows x references: the same product, faster where N is a few
    # images and R thousands of training examples (the search; docs/benchmarks.md).
    products = tf.transpose(tf.matmul(references, rows, transpose_b=True))  # (N, R)
    distances = row_norms + reference_norms[tf.newaxis, :] - 2.0 * products
    # Rounding can leave a tiny negative value where the true distance is zero.
    return tf.maximum(distances, 0.0) / tf.cast(tf.shape(rows)[1], rows.dtype)



def reference_features(features_model, images, max_examples, seed, batch_size=1000, compiled=None):
    """The label's training images at every cost layer: [(activations (R, D), squared norms (R,))].

    Also returns the images used and their logits (R, classes), from which the
    worst-classified are picked. compiled, if given, is flat_features(features_model, .)
    as a tf.function (the loop passes one): faster than calling the model eagerly, and
    this forward pass over every training image of the label is a large part of a
    backwork run.
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



def nearest_distances(images, label_images):
    """Each image's pixel-space mean squared distance to its nearest training example of the label."""
    import tensorflow as tf

    flat = tf.reshape(images, (len(images), -1))
    references = tf.reshape(label_images, (len(label_images), -1))
    distances = squared_distances(flat, references, tf.reduce_sum(tf.square(references), axis=1))
    return tf.reduce_min(distances, axis=1).numpy()



# ------------------------------------------------------------------------ the cost


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
    each image's nearest reference at every cost layer (from BackworkSteps.find_nearest). Label
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


# -------------------------------------------------------------- the single-label reference
#
# The cost of one label alone, with its nearest-reference search inside it: the formula
# of the module docstring written directly. The loop never calls it; the tests check
# grouped_cost against it, and bench/bench_backwork.py times it.


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

