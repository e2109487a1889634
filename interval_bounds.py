"""Certified upper bounds on a model's class probabilities over an l-infinity ball (interval bounds).

An out-of-distribution point x (noise, a letter, a clothing image for a digit model) should get
a low confidence, and so should every image near it: an attack searches the ball
B = {z : |z - x|_inf <= eps} intersected with the image box [0, 1]^d for a confident image. An
attack that fails proves nothing; a bound that holds for every z in B does. GOOD (Bitterwolf,
Meinke and Hein, NeurIPS 2020) and ProoD (Meinke, Bitterwolf and Hein, NeurIPS 2022) report GAUC:
the AUC of such a certified upper bound on the confidence, computed as below.

Interval bound propagation (IBP; Gowal et al. 2018). Start from the box that contains B,
lower = clip(x - eps, 0, 1), upper = clip(x + eps, 0, 1), and push it through the network one
layer at a time, each step giving a box that contains every output the layer can produce from
its input box:

- affine layers (Dense, Conv2D, BatchNormalization at inference), y = W v + b, in centre/radius
  form: with c = (upper + lower) / 2 and r = (upper - lower) / 2, y lies in c' +- r' where
  c' = W c + b and r' = |W| r. This is exact for one affine layer (the box's worst corner is
  attained), and a negative weight or batch-norm scale needs no special case: |W| takes care of
  the sign. Dense and convolution are one pattern each: the layer's own product, once with W on
  c and once with |W| (and no bias) on r.
- monotone non-decreasing maps (relu, sigmoid, tanh, ... activations; max and average pooling,
  whose outputs are maxima or non-negative averages of their inputs; Flatten; Dropout, the identity
  at inference): f(lower) <= f(v) <= f(upper), so the map is applied to each bound. A non-monotone
  activation (gelu, silu, mish) would need its minimum over each interval and is refused.

The last layer is treated as GOOD does. The logits z = W v + b are not needed by themselves: the
probability p_k = 1 / sum_j exp(z_j - z_k) depends only on the differences z_k - z_j. Each is
one affine function of v, w = W[:, k] - W[:, j], so over v's box its exact maximum is

    upper(z_k - z_j) = (b_k - b_j) + w . c + |w| . r,

and p_k <= 1 / sum_j exp(-upper(z_k - z_j))  (the j = k term is exp(0) = 1).

This is tighter than bounding the logits separately: upper(z_k) - lower(z_j) counts the input
radius twice, once for each logit, where the difference cancels the weights z_k and z_j share.
The bound is at most 1, equals the model's probabilities at eps = 0, and grows with eps.

Every class's bound comes out at once: a (batch, K, K) tensor of difference bounds, fine for K up
to a hundred or so. A model with an extra "none" output (K + 1 logits) needs nothing special:
the bounds are over its full softmax, and confidence_upper_bounds takes the maximum over the
first num_classes outputs only.

A classifier combined with a discriminator (ProoD; cnn.combine_with_discriminator) is bounded
branch by branch: p(y|x) = p_in q_y + (1 - p_in) / K, with q_y <= the classifier's bound and p_in
between sigmoid of the discriminator's lower and upper bound of s_in - s_out, is at most its value
at one end of that interval (it is linear in p_in). The discriminator, trained on this bound, is
what makes it tight; the classifier's own bound may stay 1.

The NumPy entries (probability_upper_bounds, confidence_upper_bounds, logit_bounds) judge a
model; the tensor entries (logit_difference_bounds_tensor, confidence_bound_tensor) are the same
bounds as TensorFlow ops, for a training loss that takes their gradient (defences.good).

Precision. The NumPy entries, which judge a model, compute in float64: every step takes the
dtype of the box it is given, and the weights are cast to it. In float32 the centre/radius form
of a wide layer adds and subtracts products of 10^3-10^4 whose sum is small, and rounding moved
bounds by 5e-4 (below a value an attack reached: docs/results.md) and by 1e-2 on the test's
large weights; on a GPU, TensorFloat-32 matrix products (TensorFlow's default on Ampere and
later) would round to 1e-3 relative. Float64 rounding (1e-16 relative) leaves the bounds exact
over the reals to far below the evaluation's tolerance (ood_metrics.BOUND_TOLERANCE); it is
still rounding, not outward-rounded interval arithmetic. The tensor entries, a training loss's,
stay in the dtype they are given (float32), where the gradient matters and a few ulps do not.
"""
import functools

import numpy as np

import cnn
from common import UserError

DEFAULT_BATCH_SIZE = 256  # Images per compiled call: a few MB of boxes on the default network.
JUDGING_DTYPE = "float64"  # The NumPy entries' arithmetic (see Precision above).

# Keras activations (by function name) that are non-decreasing with Keras' default parameters,
# so that f(lower) <= f(v) <= f(upper). The test suite checks each on a grid.
MONOTONE_ACTIVATIONS = frozenset({
    "linear", "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "softplus", "softsign",
    "sigmoid", "hard_sigmoid", "log_sigmoid", "tanh", "hard_tanh", "exponential", "sparse_plus",
    "sparse_sigmoid", "squareplus", "hard_shrink", "soft_shrink", "tanh_shrink",
})

SUPPORTED_LAYERS = ("Conv2D, Dense, BatchNormalization, Activation, MaxPooling2D, AveragePooling2D, "
                    "GlobalMaxPooling2D, GlobalAveragePooling2D, Flatten, Dropout")


# ------------------------------------------------------------------------ checks


def check_radius(eps, allow_zero=False):
    """eps as a float if it is a radius in (0, 1] ([0, 1] with allow_zero); else one line naming the fix."""
    is_number = isinstance(eps, (int, float, np.integer, np.floating)) and not isinstance(eps, bool)
    radius = float(eps) if is_number else float("nan")  # A string "0.3" is a mistake, not a radius.
    # eps = 0 (the model's own output) is a check for tests, not a threat model to report.
    inside = 0.0 <= radius <= 1.0 if allow_zero else 0.0 < radius <= 1.0
    if isinstance(eps, bool) or not inside:  # NaN fails both comparisons.
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise UserError(f"eps {eps!r} is not an l-infinity radius in {interval}; set eps to a number "
                        "such as 0.3 (pixels are in [0, 1])")
    return radius


def _checked_images(model, images):
    images = np.asarray(images, dtype=np.float32)
    input_shape = tuple(model.input_shape[1:])
    if images.ndim != 1 + len(input_shape) or images.shape[1:] != input_shape:
        raise UserError(f"images of shape {images.shape} do not fit the model, which takes "
                        f"(N, {', '.join(map(str, input_shape))}); pass images of that shape")
    if images.size and not (np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1):
        raise UserError("images must have pixels in [0, 1] (the ball is clipped to that box); "
                        "scale them as common.load_dataset does")
    return images


def _monotone_activation(layer):
    """layer's activation, if interval bounds can pass through it; else one line saying what to do."""
    name = getattr(layer.activation, "__name__", repr(layer.activation))
    if name not in MONOTONE_ACTIVATIONS:
        raise UserError(f"layer '{layer.name}' uses activation '{name}', which is not monotone (or not "
                        "known to be); interval bounds need a monotone activation such as relu")
    return layer.activation


def _layer_chain(model):
    """model's layers after its input, in order, if each takes exactly the previous one's output."""
    from keras import layers

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UserError(f"model '{model.name}' has {len(model.inputs)} inputs and {len(model.outputs)} "
                        "outputs; interval bounds need one of each, as cnn.build_model makes")
    chain = [layer for layer in model.layers if not isinstance(layer, layers.InputLayer)]
    _check_follows(model, chain)
    if not chain or chain[-1].output is not model.outputs[0]:
        raise UserError(f"model '{model.name}' does not output its last layer; interval bounds need a "
                        "chain of layers, as cnn.build_model makes")
    return chain


def _check_follows(model, chain):
    """Refuse a list of layers of model in which one does not simply take the previous one's output."""
    previous_output = model.inputs[0]
    for layer in chain:
        try:
            follows = layer.input is previous_output
        except (AttributeError, ValueError):  # A layer used twice has no single input.
            follows = False
        if not follows:
            raise UserError(f"layer '{layer.name}' of model '{model.name}' does not simply follow the layer "
                            "before it (a branch or a shared layer); interval bounds need a chain of "
                            "layers, as cnn.build_model makes")
        previous_output = layer.output


def _bound_functions():
    """{layer class: function (layer, lower, upper) -> (lower, upper)}, exact classes only.

    A subclass may compute something else under the same weights, so only these classes pass.
    """
    from keras import layers

    return {
        layers.Dense: _bound_dense,
        layers.Conv2D: _bound_convolution,
        layers.BatchNormalization: _bound_batch_norm,
        layers.Activation: _bound_activation,
        layers.MaxPooling2D: _bound_monotone_layer,
        layers.AveragePooling2D: _bound_monotone_layer,
        layers.GlobalMaxPooling2D: _bound_monotone_layer,
        layers.GlobalAveragePooling2D: _bound_monotone_layer,
        layers.Flatten: _bound_monotone_layer,
        layers.Dropout: _bound_identity,
    }


def _supported_step(layer, bound_functions):
    """(layer, its bound function), or one line saying why the layer cannot be bounded."""
    bound = bound_functions.get(type(layer))
    if bound is None:
        raise UserError(f"layer '{layer.name}' ({type(layer).__name__}) has no interval bound; use the "
                        f"layers cnn.build_model makes ({SUPPORTED_LAYERS})")
    if getattr(layer, "quantization_mode", None):
        raise UserError(f"layer '{layer.name}' is quantized ({layer.quantization_mode}); interval bounds "
                        "need its float weights: bound the model before quantizing it")
    if hasattr(layer, "activation"):
        _monotone_activation(layer)
    return layer, bound


def check_model_supported(model):
    """The bound plan for model, refused in one line before any work where a layer has no bound.

    A model of build_model's shape gives (hidden (layer, bound function) steps, its logits layer):
    a chain ending in a Dense layer without activation followed by a softmax Activation. A
    classifier combined with a discriminator (cnn.combine_with_discriminator) gives
    {"classifier": plan, "discriminator": plan}, one chain plan for each branch.
    """
    if cnn.is_combined(model):
        classifier, discriminator = cnn.combined_parts(model)
        return {"classifier": _chain_plan(model, classifier), "discriminator": _chain_plan(model, discriminator)}
    from keras import layers

    chain = _layer_chain(model)
    ending = chain[-2:]
    if (len(ending) != 2 or type(ending[1]) is not layers.Activation
            or getattr(ending[1].activation, "__name__", "") != "softmax"):
        raise UserError(f"model '{model.name}' does not end in a Dense layer of logits followed by a softmax "
                        "Activation; certified probabilities need that ending, as cnn.build_model makes")
    return _chain_plan(model, chain[:-1])


def _chain_plan(model, chain):
    """(steps, logits layer) of chain, layers of model from its input to a Dense layer of logits."""
    from keras import layers

    _check_follows(model, chain)
    if not chain or type(chain[-1]) is not layers.Dense or getattr(chain[-1].activation, "__name__", "") != "linear":
        raise UserError(f"model '{model.name}' does not end in a Dense layer of logits followed by a softmax "
                        "Activation; certified probabilities need that ending, as cnn.build_model makes")
    bound_functions = _bound_functions()
    steps = [_supported_step(layer, bound_functions) for layer in chain[:-1]]
    return steps, _supported_step(chain[-1], bound_functions)[0]


def _chain_plan_only(model):
    """check_model_supported's plan of a model of build_model's shape; refuses a combined model."""
    plan = check_model_supported(model)
    if isinstance(plan, dict):
        raise UserError(f"model '{model.name}' combines a classifier with a discriminator: its outputs are "
                        "log-probabilities, not logits; bound its probabilities (probability_upper_bounds)")
    return plan


# ------------------------------------------------------------------- one function per layer kind


def _affine(centre_map, radius_map, lower, upper):
    """The box of an affine map: centre' = centre_map(centre) (W c + b), radius' = radius_map(radius) (|W| r)."""
    centre, radius = (upper + lower) / 2, (upper - lower) / 2
    centre, radius = centre_map(centre), radius_map(radius)
    return centre - radius, centre + radius


def _weight(variable, like):
    """A layer's weight as a tensor of the box's dtype (float64 when judging; a no-op in float32)."""
    import tensorflow as tf

    return tf.cast(tf.convert_to_tensor(variable), like.dtype)


def _along_axis(values, axis, rank):
    """values (C,) shaped to broadcast along axis of a rank-dimensional tensor."""
    import tensorflow as tf

    shape = [1] * rank
    shape[axis] = -1
    return tf.reshape(values, shape)


def _bound_dense(layer, lower, upper):
    import tensorflow as tf

    kernel = _weight(layer.kernel, lower)  # (inputs, units)

    def centre_map(centre):
        product = tf.tensordot(centre, kernel, axes=1)
        return product + _weight(layer.bias, lower) if layer.use_bias else product

    lower, upper = _affine(centre_map, lambda radius: tf.tensordot(radius, tf.abs(kernel), axes=1), lower, upper)
    return _bound_activation(layer, lower, upper)


def _bound_convolution(layer, lower, upper):
    import tensorflow as tf

    kernel = _weight(layer.kernel, lower)  # (kh, kw, in channels, out channels)
    channel_axis = -1 if layer.data_format == "channels_last" else 1

    def centre_map(centre):
        product = layer.convolution_op(centre, kernel)  # The layer's strides, padding and dilation.
        if not layer.use_bias:
            return product
        return product + _along_axis(_weight(layer.bias, lower), channel_axis, len(product.shape))

    # Zero padding is a constant input: centre 0 and radius 0, exactly what the two passes pad with.
    lower, upper = _affine(centre_map, lambda radius: layer.convolution_op(radius, tf.abs(kernel)), lower, upper)
    return _bound_activation(layer, lower, upper)


def _bound_batch_norm(layer, lower, upper):
    """At inference batch norm is v * scale + shift per channel, from the moving statistics (as Keras computes it)."""
    import tensorflow as tf

    scale = tf.math.rsqrt(_weight(layer.moving_variance, lower) + layer.epsilon)
    if layer.scale:
        scale = scale * _weight(layer.gamma, lower)
    shift = -_weight(layer.moving_mean, lower) * scale
    if layer.center:
        shift = shift + _weight(layer.beta, lower)
    rank = len(lower.shape)
    scale, shift = _along_axis(scale, layer.axis, rank), _along_axis(shift, layer.axis, rank)
    # A negative gamma swaps which end of the interval maps where; |scale| on the radius handles it.
    return _affine(lambda centre: centre * scale + shift, lambda radius: radius * tf.abs(scale), lower, upper)


def _bound_activation(layer, lower, upper):
    """A monotone non-decreasing activation maps the ends of each interval to the ends of its image."""
    activation = layer.activation
    return activation(lower), activation(upper)


def _bound_monotone_layer(layer, lower, upper):
    """Pooling and reshaping: every output is non-decreasing in every input, so the layer maps the bounds.

    layer.call, not layer(...): calling a layer casts a float64 box to the layer's float32.
    """
    return layer.call(lower), layer.call(upper)


def _bound_identity(layer, lower, upper):
    """Dropout is the identity at inference."""
    return lower, upper


# -------------------------------------------------------------------------- the bounds


def _logit_difference_bounds(logits_layer, lower, upper):
    """(batch, K, K): [b, k, j] is the exact maximum of z_k - z_j over the box of the logits layer's input."""
    import tensorflow as tf

    kernel = _weight(logits_layer.kernel, lower)  # (inputs, K)
    classes = kernel.shape[1]
    difference_weights = tf.reshape(kernel[:, :, None] - kernel[:, None, :],  # [:, k * K + j] = W[:, k] - W[:, j]
                                    [kernel.shape[0], classes * classes])
    # upper * W+ + lower * W-, not centre * W + radius * |W|: the two products of the latter are large and
    # cancel where the exact bound is small, and float32 lost 5e-4 that way, below the attained value
    # (a collapsed ProoD discriminator, docs/results.md); here no such cancellation happens after a ReLU.
    spread = (tf.matmul(upper, tf.maximum(difference_weights, 0.0))
              + tf.matmul(lower, tf.minimum(difference_weights, 0.0)))
    differences = tf.reshape(spread, [-1, classes, classes])
    if logits_layer.use_bias:
        bias = _weight(logits_layer.bias, lower)
        differences = differences + (bias[:, None] - bias[None, :])
    return differences


def _log_probability_bounds(difference_upper):
    """log p_k <= -log sum_j exp(-upper(z_k - z_j)), from (batch, K, K) difference bounds; (batch, K)."""
    import tensorflow as tf

    # The j = k term is exp(0), so the log-sum is >= 0 and the bound <= 0; logsumexp cannot overflow.
    return -tf.reduce_logsumexp(-difference_upper, axis=2)


def _propagate(steps, lower, upper):
    """The box of the logits layer's input: (lower, upper) pushed through every hidden layer's bound."""
    for layer, bound in steps:
        lower, upper = bound(layer, lower, upper)
    return lower, upper


def _chain_difference_bounds(plan, lower, upper):
    """(N, K, K): upper bounds of z_k - z_j of a chain plan over the box of its inputs."""
    steps, logits_layer = plan
    return _logit_difference_bounds(logits_layer, *_propagate(steps, lower, upper))


def _combined_log_probability_bounds(plan, lower, upper):
    """(N, K): log p(y|x) bounds of a classifier combined with a discriminator (cnn.combine_with_discriminator).

    p(y|x) = p_in q_y + (1 - p_in) / K is linear in p_in (coefficient q_y - 1/K) and increasing in
    q_y, so over the box it is at most the larger of its values at the two ends of p_in's interval,
    [sigmoid(lower(s_in - s_out)), sigmoid(upper(s_in - s_out))], with q_y at its own upper bound.
    """
    import tensorflow as tf

    class_bounds = _log_probability_bounds(_chain_difference_bounds(plan["classifier"], lower, upper))  # (N, K)
    in_out = _chain_difference_bounds(plan["discriminator"], lower, upper)  # (N, 2, 2); 1 is "in"
    log_share = -np.log(float(class_bounds.shape[1]))

    def mixture(in_minus_out):  # log(p_in q + (1 - p_in) / K) at one end, (N, K)
        return tf.math.reduce_logsumexp(tf.stack([tf.math.log_sigmoid(in_minus_out)[:, None] + class_bounds,
                                                  tf.math.log_sigmoid(-in_minus_out)[:, None] + log_share
                                                  + tf.zeros_like(class_bounds)]), axis=0)

    return tf.maximum(mixture(in_out[:, 1, 0]), mixture(-in_out[:, 0, 1]))


def _log_probability_upper(plan, lower, upper):
    """(N, K): upper bounds on log p_k over the box, for either kind of plan check_model_supported gives."""
    if isinstance(plan, dict):
        return _combined_log_probability_bounds(plan, lower, upper)
    return _log_probability_bounds(_chain_difference_bounds(plan, lower, upper))


def logit_difference_bounds_tensor(model, lower, upper):
    """(N, K, K) tensor: [n, k, j] bounds z_k - z_j from above over the box [lower, upper] of inputs.

    lower and upper are (N, H, W, C) tensors (the ball clipped to [0, 1], say), float32 for a loss or
    float64 to judge; the bound is computed in their dtype. Every step is a TensorFlow op on the
    model's own variables, so a training loss inside a GradientTape (GOOD's) gets the gradient of
    the bound in the weights. The model must compute in float32
    (a mixed-precision layer would round the bounds to bfloat16); batch normalisation is
    bounded with its moving statistics, as at inference.
    """
    return _chain_difference_bounds(_chain_plan_only(model), lower, upper)


def confidence_bound_tensor(model, lower, upper, num_classes=None):
    """(N,) tensor: an upper bound on the log of the top probability over the box [lower, upper].

    The TensorFlow form of confidence_upper_bounds (its logarithm), for a loss: see
    logit_difference_bounds_tensor. num_classes counts only the first outputs (None: all).
    """
    import tensorflow as tf

    log_bounds = _log_probability_upper(check_model_supported(model), lower, upper)  # (N, K)
    return tf.reduce_max(log_bounds[:, :num_classes], axis=1)


@functools.lru_cache(maxsize=4)
def _compiled_bounds(model):
    """One tf.function (lower, upper: _judging_box's float64 box) -> {"probability_upper": (batch, K)},
    with "logit_lower" and "logit_upper" for a model of build_model's shape, for a float32 model.

    Compiled once per model (the cache keeps the last few); it reads the model's variables when
    run, so bounds follow weights that change in training.
    """
    import tensorflow as tf

    plan = check_model_supported(model)
    box = tf.TensorSpec([None, *model.input_shape[1:]], JUDGING_DTYPE)

    @tf.function(input_signature=[box, box], jit_compile=False)
    def bounds(lower, upper):  # (batch, H, W, C) each: _judging_box's
        if isinstance(plan, dict):
            return {"probability_upper": tf.exp(_combined_log_probability_bounds(plan, lower, upper))}
        steps, logits_layer = plan
        lower, upper = _propagate(steps, lower, upper)
        logit_lower, logit_upper = _bound_dense(logits_layer, lower, upper)  # (batch, K) each
        probability_upper = tf.exp(_log_probability_bounds(_logit_difference_bounds(logits_layer, lower, upper)))
        return {"logit_lower": logit_lower, "logit_upper": logit_upper, "probability_upper": probability_upper}

    return bounds


def _all_bounds(model, images, eps, batch_size):
    """{name: NumPy (N, K) float64} of _compiled_bounds, a batch at a time."""
    radius = check_radius(eps, allow_zero=True)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise UserError(f"batch_size {batch_size!r} must be a positive int; set it to e.g. {DEFAULT_BATCH_SIZE}")
    model = cnn.float32_model(model)  # A mixed-precision model is analysed in float32.
    bounds = _compiled_bounds(model)
    images = _checked_images(model, images)
    classes = model.output_shape[-1]
    parts = [bounds(*_judging_box(images[start:start + batch_size], radius))
             for start in range(0, len(images), batch_size)]
    if not parts:
        return {name: np.zeros((0, classes), JUDGING_DTYPE) for name in ("logit_lower", "logit_upper", "probability_upper")}
    return {name: np.concatenate([np.asarray(part[name]) for part in parts]) for name in parts[0]}


def probability_upper_bounds(model, images, eps, batch_size=DEFAULT_BATCH_SIZE):
    """(N, K) float64: a certified upper bound on each class probability over each image's eps-ball in [0, 1]."""
    return _all_bounds(model, images, eps, batch_size)["probability_upper"]


def confidence_upper_bounds(model, images, eps, num_classes=None, batch_size=DEFAULT_BATCH_SIZE):
    """(N,) float64: a certified upper bound on the top probability over each image's ball (GAUC's score).

    num_classes: count only the first num_classes outputs (the classes of a model with an extra
    "none" output, whose softmax still includes it); None counts every output.
    """
    bounds = probability_upper_bounds(model, images, eps, batch_size)
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
                or not 1 <= num_classes <= bounds.shape[1]:
            raise UserError(f"num_classes {num_classes!r} must be an int in 1-{bounds.shape[1]} (the model's "
                            "outputs); set it to the data's class count")
        bounds = bounds[:, :num_classes]
    return bounds.max(axis=1)


def log_confidence_upper_bounds(model, images, eps, num_classes=None, batch_size=DEFAULT_BATCH_SIZE):
    """(N,) float64: the log of confidence_upper_bounds, computed in log space (confidence_bound_tensor),
    so that bounds which round to 1.0 as probabilities still rank (the evaluation's GAUC needs that)."""
    radius = check_radius(eps, allow_zero=True)
    model = cnn.float32_model(model)
    images = _checked_images(model, images)
    parts = [np.asarray(confidence_bound_tensor(model, *_judging_box(batch, radius), num_classes))
             for batch in (images[start:start + batch_size] for start in range(0, len(images), batch_size))]
    return np.concatenate(parts) if parts else np.zeros(0, JUDGING_DTYPE)


def _judging_box(images, radius):
    """(lower, upper) of each image's ball in [0, 1]: float32 as box_attacks.ball, then float64 (exactly)."""
    images = np.asarray(images, np.float32)
    return (np.clip(images - np.float32(radius), 0, 1).astype(JUDGING_DTYPE),
            np.clip(images + np.float32(radius), 0, 1).astype(JUDGING_DTYPE))


def logit_bounds(model, images, eps, batch_size=DEFAULT_BATCH_SIZE):
    """(lower, upper), (N, K) float64 each: plain interval bounds on the logits over each image's ball."""
    _chain_plan_only(model)
    bounds = _all_bounds(model, images, eps, batch_size)
    return bounds["logit_lower"], bounds["logit_upper"]
