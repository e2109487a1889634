"""Train a CNN on an image dataset (MNIST by default, [data] dataset) from a topology dict.

    python proc_mnist.py [CONFIG] [--data PATH] [--out DIR] [--steps N] [--seed N]
                         [--set section.key=value ...] [--resume]

build_model(topology) is the one place the network is built; every other script uses it
or a model it saved. Layer names let them reach the activations:
conv{i} is conv block i's output (after activation and pooling), fc{j} the j-th fully
connected layer before its activation, logits the class scores, softmax the probabilities
(i and j count from 1).

train() runs the [train] recipe (Adam on a Keras schedule, label smoothing, random shifts)
in compiled calls of about a second each, so Ctrl-C or SIGTERM stops it at once. The
command then saves what was reached (also when interrupted during the final evaluation
or the save) and exits 130; --resume continues it with its whole history. A loss or
gradient that is not finite stops training: the last finite weights are saved, exit 2.
"""
import argparse
import contextlib
import functools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import common
import distributed
from common import UserError

# ------------------------------------------------------------------------------ model


def _spatial_size(size, window, stride, padding):
    """Output length of one spatial axis, as tf.nn.conv2d and max_pool compute it."""
    if padding == "SAME":
        return math.ceil(size / stride)
    return math.ceil((size - window + 1) / stride) if size >= window else 0


MAX_LAYER_SIZE = 4096  # Filter sizes, strides and channel counts above this are a typo, not a network.


def _four_list(layer, key, name):
    value = layer.get(key)
    if (not isinstance(value, (list, tuple)) or len(value) != 4
            or not all(isinstance(item, int) and 0 < item <= MAX_LAYER_SIZE for item in value)):
        raise UserError(f"{name}: {key} must be four ints between 1 and {MAX_LAYER_SIZE}, not {value!r}")
    return list(value)


def _padding(layer, name):
    padding = str(layer.get("padding", "")).upper()
    if padding not in ("SAME", "VALID"):
        raise UserError(f"{name}: padding {layer.get('padding')!r} is unknown; use 'SAME' or 'VALID'")
    return padding


def _activation(act_fn, name):
    import keras

    try:
        return keras.activations.get(act_fn)
    except (ValueError, TypeError):
        raise UserError(f"{name}: activation {act_fn!r} is unknown; use a Keras activation "
                        "name such as 'relu' or a callable") from None


def _image_shape(image_dim_size):
    if isinstance(image_dim_size, int):
        image_dim_size = [image_dim_size, image_dim_size]
    shape = list(image_dim_size) + ([1] if len(image_dim_size) == 2 else [])
    if len(shape) != 3 or not all(isinstance(size, int) and size > 0 for size in shape):
        raise UserError(f"image_dim_size {image_dim_size!r} must be an int, [h, w] or [h, w, c]")
    return shape


def _fc_units(num_fc_units):
    units = [num_fc_units] if isinstance(num_fc_units, int) else list(num_fc_units)
    if not all(isinstance(unit, int) and unit > 0 for unit in units):
        raise UserError(f"num_fc_units {num_fc_units!r} must be a positive int or a list of them")
    return units


def _shrunk(name, height, width):
    if height < 1 or width < 1:
        raise UserError(f"{name}: the image shrinks to {height}x{width}; use SAME padding, "
                        "smaller windows or strides, or fewer layers")
    return height, width


def _conv_block(x, index, conv, pool, in_shape, batch_norm):
    """Add conv block index (conv, [batch norm], activation, [pool]); return output and shape."""
    from keras import layers

    name = f"conv layer {index}"
    height, width, channels = in_shape
    filter_shape = _four_list(conv, "filter", name)
    strides = _four_list(conv, "strides", name)
    padding = _padding(conv, name)
    if filter_shape[2] != channels:
        raise UserError(f"{name}: filter in-channels {filter_shape[2]} do not match the {channels} "
                        f"channels coming in; set its filter[2] to {channels}")
    if strides[0] != 1 or strides[3] != 1:
        raise UserError(f"{name}: strides must be [1, y, x, 1], not {strides}")
    height, width = _shrunk(name, _spatial_size(height, filter_shape[0], strides[1], padding),
                            _spatial_size(width, filter_shape[1], strides[2], padding))
    activation = _activation(conv.get("act_fn", "relu"), name)
    has_pool = bool(pool)
    x = layers.Conv2D(filter_shape[3], filter_shape[:2], strides=strides[1:3], padding=padding.lower(),
                      use_bias=not batch_norm, name=f"conv{index}_conv")(x)
    if batch_norm:
        x = layers.BatchNormalization(name=f"conv{index}_bn")(x)
    x = layers.Activation(activation, name=f"conv{index}_act" if has_pool else f"conv{index}")(x)
    if has_pool:
        name = f"pool layer {index}"
        window = _four_list(pool, "filter", name)
        pool_strides = _four_list(pool, "strides", name)
        pool_padding = _padding(pool, name)
        height, width = _shrunk(name, _spatial_size(height, window[1], pool_strides[1], pool_padding),
                                _spatial_size(width, window[2], pool_strides[2], pool_padding))
        x = layers.MaxPooling2D(window[1:3], strides=pool_strides[1:3], padding=pool_padding.lower(),
                                name=f"conv{index}")(x)
    return x, (height, width, filter_shape[3])


def check_topology_fits_data(topology, data):
    """Refuse a [model] whose image size or class count is not the data's, naming the key to set."""
    shape, data_shape = _image_shape(topology["image_dim_size"]), list(data["x_train"].shape[1:])
    if shape != data_shape:
        raise UserError(f"the data has images of shape {data_shape} but model.image_dim_size is "
                        f"{topology['image_dim_size']}; set model.image_dim_size = {data_shape}")
    classes = common.count_classes(data)
    if classes and classes != topology["num_classes"]:
        raise UserError(f"the data has {classes} classes but model.num_classes is {topology['num_classes']}; "
                        f"set model.num_classes = {classes}")


def build_model(topology):
    """Build the Keras functional model a topology dict describes; output is probabilities."""
    import keras
    from keras import layers

    # The same value ranges as a config (a notebook's dict skips merge_config): tables, sizes.
    common.check_section("model", topology, source="topology")
    topology = {**common.default_config()["model"], **topology}
    shape = _image_shape(topology["image_dim_size"])
    conv_layers, pool_layers = list(topology["conv_layers"]), list(topology["pool_layers"])
    if len(pool_layers) != len(conv_layers):
        raise UserError(f"{len(conv_layers)} conv layers but {len(pool_layers)} pool layers; give one "
                        "pool layer per conv layer ({} or None for no pooling)")
    num_classes = topology["num_classes"]
    if not isinstance(num_classes, int) or num_classes < 2:
        raise UserError(f"num_classes {num_classes!r} must be an int of at least 2")
    dropout, batch_norm = float(topology["dropout"]), bool(topology["batch_norm"])
    if not 0 <= dropout < 1:
        raise UserError(f"dropout {dropout} must be in [0, 1)")
    fc_activation = _activation(topology["fc_act_fn"], "fully connected layers")

    inputs = keras.Input(shape=shape, name="input")
    x = inputs
    for index, (conv, pool) in enumerate(zip(conv_layers, pool_layers), start=1):
        x, shape = _conv_block(x, index, conv, pool, shape, batch_norm)
    x = layers.Flatten(name="flatten")(x)
    for index, units in enumerate(_fc_units(topology["num_fc_units"]), start=1):
        x = layers.Dense(units, use_bias=not batch_norm, name=f"fc{index}")(x)
        if batch_norm:
            x = layers.BatchNormalization(name=f"fc{index}_bn")(x)
        x = layers.Activation(fc_activation, name=f"fc{index}_act")(x)
        if dropout:
            x = layers.Dropout(dropout, name=f"fc{index}_dropout")(x)
    # The class scores and probabilities stay float32 under mixed precision (train.mixed_precision).
    logits = layers.Dense(num_classes, name="logits", dtype="float32")(x)
    outputs = layers.Activation("softmax", name="softmax", dtype="float32")(logits)
    return keras.Model(inputs, outputs, name="cnn")


def logits_model(model):
    """A view of model that outputs the class scores before softmax, sharing its weights."""
    import keras

    return keras.Model(model.input, model.get_layer("logits").output)


def input_gradient_model(model):
    """model with the same weights and outputs, faster to differentiate with respect to its input.

    Backwork and saliency take the gradient of the network with respect to the image.
    TensorFlow's input gradient of a convolution over one channel (Conv2DBackpropInput) is
    slow on CPU: 8.6 ms for 80 MNIST images through the default 5x5x1x32 layer, four
    times its forward pass and a fifth of a whole backwork step. Such layers become
    SingleChannelConv2D, whose input gradient is one depthwise convolution (2.0 ms, equal
    to float rounding); every other layer is shared with model. The result is for taking
    gradients, not for saving: SingleChannelConv2D is not a registered Keras class.
    """
    import keras

    replaced = {}

    def share_or_replace(layer):
        if not _is_single_channel_conv(layer):
            return layer
        replaced[layer.name] = copy = input_gradient_layer(layer)
        return copy

    clone = keras.models.clone_model(model, clone_function=share_or_replace)
    for name, copy in replaced.items():
        copy.set_weights(model.get_layer(name).get_weights())
    return clone


def input_gradient_layer(layer):
    """A new layer of layer's config (without weights), a SingleChannelConv2D where that is faster."""
    kind = single_channel_conv_class() if _is_single_channel_conv(layer) else layer.__class__
    return kind.from_config(layer.get_config())


def _is_single_channel_conv(layer):
    """A Conv2D over one input channel with unit strides and dilation: SingleChannelConv2D's case."""
    from keras import layers

    return (type(layer) is layers.Conv2D and layer.kernel.shape[2] == 1 and layer.groups == 1
            and tuple(layer.strides) == (1, 1) and tuple(layer.dilation_rate) == (1, 1)
            and layer.data_format == "channels_last")


@functools.cache
def single_channel_conv_class():
    """keras.layers.Conv2D whose input gradient is a depthwise convolution (built on first use)."""
    import keras
    import tensorflow as tf

    class SingleChannelConv2D(keras.layers.Conv2D):
        def convolution_op(self, inputs, kernel):
            padding = self.padding.upper()

            @tf.custom_gradient
            def convolution(inputs, kernel):
                def backward(upstream):
                    kernel_gradient = tf.raw_ops.Conv2DBackpropFilter(
                        input=inputs, filter_sizes=tf.shape(kernel), out_backprop=upstream,
                        strides=[1, 1, 1, 1], padding=padding)
                    return single_channel_input_gradient(upstream, kernel, padding), kernel_gradient

                return tf.nn.conv2d(inputs, kernel, 1, padding), backward

            return convolution(inputs, tf.convert_to_tensor(kernel))

    return SingleChannelConv2D


def single_channel_input_gradient(upstream, kernel, padding):
    """The gradient reaching a one-channel input (N, H, W, 1) of a unit-stride convolution.

    Each input pixel collects upstream (N, H', W', C) through the flipped kernel
    (kh, kw, 1, C): a correlation of every channel with its own flipped filter (one
    depthwise convolution over upstream, padded so that the output is H x W), summed
    over the channels.
    """
    import tensorflow as tf

    rows, columns = kernel.shape[:2]
    # "SAME" pads the forward pass (k - 1) // 2 before and the rest after; the gradient
    # pads the other way round. "VALID" padded nothing, so the gradient pads k - 1 both sides.
    top, left = ((rows - 1) // 2, (columns - 1) // 2) if padding == "SAME" else (0, 0)
    bottom, right = ((rows - 1 - top, columns - 1 - left) if padding == "SAME" else (0, 0))
    padded = tf.pad(upstream, [[0, 0], [rows - 1 - top, rows - 1 - bottom],
                               [columns - 1 - left, columns - 1 - right], [0, 0]])
    flipped = tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2])  # (kh, kw, C, 1)
    spread = tf.nn.depthwise_conv2d(padded, flipped, [1, 1, 1, 1], "VALID")  # (N, H, W, C)
    return tf.reduce_sum(spread, axis=3, keepdims=True)


# --------------------------------------------------------------------------- training


def to_targets(labels, num_classes):
    """Integer labels become one-hot rows; probability rows (soft labels) pass through."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        if labels.shape[1] != num_classes:
            raise UserError(f"soft labels have {labels.shape[1]} classes, the model {num_classes}")
        return labels.astype(np.float32)
    return np.eye(num_classes, dtype=np.float32)[labels]


def batch_indices(num_examples, batch_size, seed, first_step, num_steps):
    """Indices of the examples in steps [first_step, first_step + num_steps), shape (steps, batch).

    Every epoch is a fresh permutation drawn from (seed, epoch), so the order of a run that
    is resumed at any step is the same as that of one that never stopped.
    """
    steps_per_epoch = num_examples // batch_size
    if steps_per_epoch == 0:
        raise UserError(f"batch_size {batch_size} is larger than the {num_examples} training examples")
    rows, permutations = [], {}
    for step in range(first_step, first_step + num_steps):
        epoch, position = divmod(step, steps_per_epoch)
        if epoch not in permutations:
            permutations[epoch] = np.random.default_rng([seed, epoch]).permutation(num_examples)
        rows.append(permutations[epoch][position * batch_size:(position + 1) * batch_size])
    return np.stack(rows).astype(np.int32)


def _shifted(images, shifts):
    """Each image moved by its (dy, dx) whole pixels, zeros filling in: (batch, H, W, C)."""
    import tensorflow as tf

    shifts = tf.cast(shifts, tf.float32)  # (batch, 2)
    ones, zeros = tf.ones_like(shifts[:, :1]), tf.zeros_like(shifts[:, :1])
    # Output pixel (x, y) reads input pixel (x - dx, y - dy): a projective transform's rows.
    transforms = tf.concat([ones, zeros, -shifts[:, 1:], zeros, ones, -shifts[:, :1], zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3], fill_value=0.0,
        interpolation="NEAREST", fill_mode="CONSTANT")


def _fused_adam(optimizer):
    """apply(gradients, variables): Keras' Adam step with one fused kernel per variable.

    Keras' Adam runs about ten elementwise ops per variable (each a pass over the 3.2M fc1
    weights); TensorFlow's ResourceApplyAdam does the same arithmetic in one pass on Keras'
    own moment variables, so the saved optimizer state and --resume are unchanged. None
    where the optimizer is not a plain Adam (then Keras' apply_gradients is used).
    """
    import keras
    import tensorflow as tf

    plain = (type(optimizer) is keras.optimizers.Adam and not optimizer.amsgrad and not optimizer.use_ema
             and optimizer.clipnorm is None and optimizer.clipvalue is None and optimizer.global_clipnorm is None
             and not optimizer.weight_decay and not optimizer.gradient_accumulation_steps
             and optimizer.loss_scale_factor is None)
    if not plain:
        return None

    def apply(gradients, variables):
        step = tf.cast(optimizer.iterations + 1, tf.float32)
        beta_1, beta_2 = tf.constant(optimizer.beta_1, tf.float32), tf.constant(optimizer.beta_2, tf.float32)
        learning_rate = tf.cast(optimizer.learning_rate, tf.float32)
        for gradient, variable in zip(gradients, variables):
            index = optimizer._get_variable_index(variable)
            tf.raw_ops.ResourceApplyAdam(
                var=variable.handle, m=optimizer._momentums[index].handle, v=optimizer._velocities[index].handle,
                beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step), lr=learning_rate,
                beta1=beta_1, beta2=beta_2, epsilon=tf.constant(optimizer.epsilon, tf.float32), grad=gradient)
        optimizer.iterations.assign_add(1)

    return apply


def make_train_function(model, images, targets, label_smoothing=0.0, shift_pixels=0, seed=0, *,
                        strategy=None, xla=False):
    """A compiled function that runs a block of optimisation steps in one call.

    run_steps(indices), indices (steps, batch), returns (loss_sum, steps_done, bad_loss). A
    step whose loss or gradients are not finite is not applied and ends the call, so the
    model keeps its last finite weights; steps_done is then short and bad_loss that loss.
    Running many steps per call inside one graph (as fit's steps_per_execution does)
    removes the Python overhead that dominates small batches on a CPU.

    With a tf.distribute strategy (the model and its optimizer made in its scope), each
    replica computes the gradients of its share of every global batch; they are summed
    across replicas (and workers) before the finite check and the update. xla compiles
    the forward and backward pass with XLA.
    """
    import tensorflow as tf

    scores = logits_model(model)
    optimizer = model.optimizer
    variables = model.trainable_variables
    # The fused kernel writes one variable's handle; a mirrored variable has one per replica.
    fused = _fused_adam(optimizer) if strategy is None else None
    apply_gradients = fused or (lambda gradients, variables: optimizer.apply_gradients(zip(gradients, variables)))
    images, targets = tf.constant(images), tf.constant(targets)
    num_classes = targets.shape[-1]

    def batch(step_indices):
        batch_images = tf.gather(images, step_indices)  # (batch, H, W, C)
        batch_targets = tf.gather(targets, step_indices)  # (batch, classes)
        if label_smoothing:
            batch_targets = batch_targets * (1.0 - label_smoothing) + label_smoothing / num_classes
        if shift_pixels:
            # Seeded by (seed, step), so a resumed run draws the shifts an uninterrupted one would.
            key = tf.stack([tf.constant(seed, tf.int64), tf.cast(optimizer.iterations, tf.int64)])
            shifts = tf.random.stateless_uniform([tf.shape(step_indices)[0], 2], key, minval=-shift_pixels,
                                                 maxval=shift_pixels + 1, dtype=tf.int32)
            batch_images = _shifted(batch_images, shifts)
        return batch_images, batch_targets

    def loss_and_gradients(batch_images, batch_targets, global_batch_size):
        """The summed loss of these examples over the global batch size, and its gradients."""
        with tf.GradientTape() as tape:
            logits = tf.cast(scores(batch_images, training=True), tf.float32)  # Mixed precision computes in bf16.
            losses = tf.nn.softmax_cross_entropy_with_logits(batch_targets, logits)  # (batch,)
            loss = tf.reduce_sum(losses) / global_batch_size
        return loss, tape.gradient(loss, variables)

    if xla:
        loss_and_gradients = tf.function(loss_and_gradients, jit_compile=True)

    def replica_gradients(batch_images, batch_targets):
        """In one replica: the gradients of its share of the global batch (rows replica*k to (replica+1)*k)."""
        context = tf.distribute.get_replica_context()
        replica, global_batch_size = context.replica_id_in_sync_group, tf.shape(batch_images)[0]
        share = global_batch_size // context.num_replicas_in_sync
        rows = slice(replica * share, (replica + 1) * share)
        with distributed.replica_random_stream(model, replica):  # Its own dropout masks.
            return loss_and_gradients(batch_images[rows], batch_targets[rows], tf.cast(global_batch_size, tf.float32))

    def step_gradients(batch_images, batch_targets):
        if strategy is None:
            return loss_and_gradients(batch_images, batch_targets, tf.cast(tf.shape(batch_images)[0], tf.float32))
        per_replica_loss, per_replica_gradients = strategy.run(replica_gradients, args=(batch_images, batch_targets))
        add = tf.distribute.ReduceOp.SUM
        return (strategy.reduce(add, per_replica_loss, axis=None),
                [strategy.reduce(add, gradient, axis=None) for gradient in per_replica_gradients])

    @tf.function(jit_compile=False,  # XLA's CPU convolutions are ~10x slower than oneDNN's here.
                 input_signature=[tf.TensorSpec([None, None], tf.int32)])  # Any block length, one trace.
    def run_steps(indices):
        loss_sum, steps_done, bad_loss = tf.constant(0.0), tf.constant(0), tf.constant(0.0)
        for step in tf.range(tf.shape(indices)[0]):
            loss, gradients = step_gradients(*batch(indices[step]))
            # One sum is cheaper than an is_finite pass per variable: any NaN or infinity makes it so.
            total = loss + tf.add_n([tf.reduce_sum(gradient) for gradient in gradients])
            if tf.logical_not(tf.math.is_finite(total)):
                bad_loss = loss
                break
            apply_gradients(gradients, variables)
            loss_sum += loss
            steps_done += 1
        return loss_sum, steps_done, bad_loss

    return run_steps


def accuracy(model, images, labels, batch_size=1000):
    """Fraction of images whose most probable class is the label (labels int or soft); None without images."""
    if len(images) == 0:
        return None
    labels = np.asarray(labels)
    labels = labels.argmax(axis=1) if labels.ndim == 2 else labels
    probabilities = common.predict(model, images, batch_size)
    return float(np.mean(probabilities.argmax(axis=1) == labels))


SCHEDULES = ("constant", "cosine", "one_cycle")
ONE_CYCLE_DIVISOR = 25.0  # one_cycle warms up from learning_rate / 25 (Smith's 1cycle) ...
ONE_CYCLE_FINAL_DIVISOR = 1e4  # ... and ends at that / 1e4.


def check_train_section(section):
    """Refuse [train] values of the keys this script added that cannot work, naming the key."""
    if section["schedule"] not in SCHEDULES:
        raise UserError(f"train.schedule {section['schedule']!r} is unknown; use one of {', '.join(SCHEDULES)}")
    distributed.check_settings(section)
    common.check_section("train", section, source="train options")  # The ranges of single values.
    if not section["warmup_steps"] < section["num_steps"]:
        raise UserError(f"train.warmup_steps {section['warmup_steps']} must be below "
                        f"train.num_steps ({section['num_steps']})")


def learning_rate_schedule(section):
    """Adam's learning rate for [train]: a float, or one of Keras' own (serialisable) schedules.

    All three warm up linearly over warmup_steps (from 0, or for one_cycle from
    learning_rate / 25) to learning_rate; then constant stays there, cosine decays to 0 at
    num_steps, one_cycle to learning_rate / 25 / 1e4.
    """
    import keras

    check_train_section(section)
    peak, warmup = section["learning_rate"], section["warmup_steps"]
    if section["schedule"] == "constant" and warmup == 0:
        return peak
    decay_steps = section["num_steps"] - warmup
    start, alpha = {"constant": (0.0, 1.0), "cosine": (0.0, 0.0),
                    "one_cycle": (peak / ONE_CYCLE_DIVISOR, 1 / (ONE_CYCLE_DIVISOR * ONE_CYCLE_FINAL_DIVISOR))
                    }[section["schedule"]]
    if warmup == 0:
        start = peak
    return keras.optimizers.schedules.CosineDecay(start, decay_steps, alpha=alpha, warmup_target=peak,
                                                  warmup_steps=warmup)


def compile_for_training(model, learning_rate):
    """Attach an Adam optimizer so that model.save keeps its state for --resume.

    learning_rate is a float or a Keras schedule (learning_rate_schedule). The loss and metric
    are for users who call model.evaluate(x, y) in a notebook; training uses make_train_function.
    """
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.optimizer.build(model.trainable_variables)
    return model


def resolve_options(options):
    """Fill a (possibly partial) config dict from the defaults, checking every key."""
    return common.merge_config(common.default_config(), options or {}, source="options")


TARGET_CALL_SECONDS = 1.0  # Length of one compiled call: Ctrl-C and SIGTERM take effect between calls.


def _cluster_failure(error):
    """The line of a collective op's error that says which worker failed, or its first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "aborted by" in line or "unhealthy" in line), lines[0] if lines else "")


def _run_blocks(run_steps, model, data, section, progress, writer=None, agree=None):
    """Train to section['num_steps'] in calls of about TARGET_CALL_SECONDS; log every log_every steps.

    Each progress line's numbers also go to writer (TensorBoard), if one is given. agree
    (distributed.make_agreement) makes every worker of a cluster run calls of the same
    length and stop at the same step.

    Returns (history, stop_reason) with stop_reason 'finished', 'interrupted',
    'diverged at step N (loss nan)' or 'stopped: a worker of the cluster failed (...)'.
    """
    import tensorflow as tf

    batch_size, total_steps, log_every = section["batch_size"], section["num_steps"], section["log_every"]
    step = first_step = int(model.optimizer.iterations.numpy())
    history, stop, start = [], "finished", time.perf_counter()
    steps_per_call, block_loss, block_steps, calls = 1, 0.0, 0, 0
    # A first Ctrl-C or SIGTERM is noted and honoured between calls (within about a second),
    # never raised inside TensorFlow's own Python code, which it can leave broken (a SIGTERM
    # there once crashed the process at exit, exit code -11). A second one raises at once.
    deferred = common.InterruptsDeferred("interrupted: stopping after the call under way (again to stop now)")
    agree = agree or (lambda steps, stop: (steps, stop))
    try:
        with deferred:
            while step < total_steps:
                # Never assigned from agree's answer: a signal noted while agree waits stays noted.
                steps_per_call, any_worker_stopped = agree(steps_per_call, deferred.interrupted)
                if any_worker_stopped:
                    deferred.interrupted = True
                    break
                # Progress lines fall on multiples of log_every, so a resumed run logs the same steps.
                next_log = min((step // log_every + 1) * log_every, total_steps)
                count = min(steps_per_call, next_log - step)
                indices = batch_indices(len(data["x_train"]), batch_size, section["seed"], step, count)
                call_start = time.perf_counter()
                loss_sum, done, bad_loss = run_steps(indices)
                call_seconds, done, calls = time.perf_counter() - call_start, int(done), calls + 1
                step, block_loss, block_steps = step + done, block_loss + float(loss_sum), block_steps + done
                if done < count:
                    bad_loss = float(bad_loss)
                    stop = (f"diverged at step {step + 1} "
                            + (f"(loss {bad_loss})" if not math.isfinite(bad_loss) else
                               f"(loss {bad_loss:.4g} but gradients not finite)"))
                    break
                if calls > 1:  # The first call also traces the function; size the next call by time.
                    steps_per_call = max(1, min(log_every, int(TARGET_CALL_SECONDS * count / call_seconds)))
                if step == next_log:
                    seconds = time.perf_counter() - start
                    record = {"step": step, "loss": block_loss / block_steps, "seconds": seconds,
                              "val_accuracy": accuracy(model, data.get("x_val", []), data.get("y_val", []))}
                    history.append(record)
                    block_loss, block_steps = 0.0, 0
                    examples_per_second = (step - first_step) * batch_size / seconds
                    eta = (total_steps - step) * batch_size / examples_per_second
                    validation = "" if record["val_accuracy"] is None else f"  val acc {record['val_accuracy']:.2%}"
                    progress(f"step {step}/{total_steps}  loss {record['loss']:.4f}{validation}  "
                             f"{examples_per_second:.0f} ex/s  eta {common.format_seconds(eta)}")
                    common.write_scalars(writer, step, {
                        "train/loss": record["loss"], "train/val_accuracy": record["val_accuracy"],
                        "train/learning_rate": float(np.asarray(model.optimizer.learning_rate.numpy())),
                        "train/examples_per_second": examples_per_second})
    except KeyboardInterrupt:
        deferred.interrupted = True
    except tf.errors.UnavailableError as error:  # Only collective ops raise it: a cluster's worker is gone.
        stop = f"stopped: a worker of the cluster failed ({_cluster_failure(error)})"
    if deferred.interrupted and not stop.startswith("stopped"):
        stop = "interrupted"
    if stop == "interrupted" or stop.startswith("stopped"):
        # The call under way ran to its end, or failed at an all-reduce, which every update
        # follows: either way the weights are those of a whole step, this one.
        step = int(model.optimizer.iterations.numpy())
        progress(f"{stop} at step {step}")
    if block_steps and step > (history[-1]["step"] if history else first_step):
        # The steps since the last progress line, without a validation pass (stopping should be quick).
        history.append({"step": step, "loss": block_loss / block_steps,
                        "seconds": time.perf_counter() - start, "val_accuracy": None})
    if stop.startswith("diverged"):
        progress(f"stopped: training {stop}; the model keeps the weights of step {step}")
    return history, stop


def train(data, config=None, model=None, progress=print, writer=None, strategy=None):
    """Train on data (as from load_dataset / split_validation) and return (model, metrics).

    config is a config dict ({'model': {...}, 'train': {...}}, missing keys take their
    defaults). Training labels may be ints or probability rows. A given model continues
    from its optimizer's step count (and learning rate or schedule); a new one gets Adam
    with learning_rate_schedule(config['train']). Training stops early on Ctrl-C or
    SIGTERM (within about TARGET_CALL_SECONDS) and on a loss or gradient that is not
    finite; the model then holds the last weights reached (always finite). writer, a
    common.summary_writer, receives each progress line's numbers for TensorBoard.

    strategy is the tf.distribute strategy to train under (main makes it first, from
    train.distribute; by default train makes it here). A given model must have been made
    or loaded in its scope. A new model computes in train.mixed_precision's policy ("auto"
    resolved here); a model in mixed_bfloat16 where that is slow is refused unless
    train.mixed_precision_force (distributed.check_precision_speed).

    metrics: steps (the optimizer's step count), seconds, examples and examples_per_second
    (this call), interrupted, diverged, stop_reason, test_accuracy (None if not measured),
    history (one record per log_every steps: step, loss, seconds, val_accuracy).
    """
    import keras

    config = resolve_options(config)
    section = config["train"]
    check_train_section(section)
    if strategy is None and section["distribute"] != "none":
        strategy = distributed.make_strategy(section["distribute"])
    distributed.check_batch_split(section["batch_size"], strategy)
    section["mixed_precision"] = distributed.resolve_precision(section["mixed_precision"])
    distributed.check_precision_speed(section["mixed_precision"] if model is None else distributed.precision_of(model),
                                      section["mixed_precision_force"])
    keras.utils.set_random_seed(section["seed"])
    # Variables are made in the strategy's scope (mirrored); the loop runs outside it, where
    # Keras' optimizer updates every replica's copy with the gradients summed over replicas.
    with distributed.scope(strategy):
        if model is None:
            check_topology_fits_data(config["model"], data)
            with distributed.precision_policy(section["mixed_precision"]):
                model = build_model(config["model"])
        if getattr(model, "optimizer", None) is None:
            compile_for_training(model, learning_rate_schedule(section))
    images, targets = data["x_train"], to_targets(data["y_train"], model.output_shape[-1])
    if tuple(images.shape[1:]) != tuple(model.input_shape[1:]):
        raise UserError(f"training images of shape {images.shape[1:]} do not fit the model's input "
                        f"{model.input_shape[1:]}; set model.image_dim_size to match the data")
    xla = distributed.use_xla(section["xla"])
    run_steps = make_train_function(model, images, targets, section["label_smoothing"],
                                    section["shift_pixels"], section["seed"], strategy=strategy, xla=xla)
    first_step, start = int(model.optimizer.iterations.numpy()), time.perf_counter()
    history, stop = _run_blocks(run_steps, model, data, section, progress, writer,
                                distributed.make_agreement(strategy))
    steps = int(model.optimizer.iterations.numpy())
    seconds = time.perf_counter() - start
    examples = (steps - first_step) * section["batch_size"]
    metrics = {"steps": steps, "seconds": seconds, "examples": examples,
               "examples_per_second": examples / seconds if seconds else 0.0,
               "interrupted": stop == "interrupted", "diverged": stop.startswith("diverged"),
               "worker_failed": stop.startswith("stopped: a worker"),
               "stop_reason": stop, "test_accuracy": None, "history": history, "data": data.get("provenance"),
               # What the run actually used: train.xla "auto" resolved, the replicas of train.distribute.
               "replicas": distributed.replica_count(strategy), "xla": xla,
               "mixed_precision": distributed.precision_of(model)}
    if "x_test" in data and stop != "interrupted":
        try:
            metrics["test_accuracy"] = accuracy(model, data["x_test"], data["y_test"])
        except KeyboardInterrupt:  # Ctrl-C during the final evaluation still keeps the model.
            metrics["interrupted"], metrics["stop_reason"] = True, "interrupted"
            progress("interrupted during the test evaluation; keeping the model")
    return model, metrics


def weights_are_finite(model):
    return all(np.all(np.isfinite(weights)) for weights in model.get_weights())


# ------------------------------------------------------------------------------ files


def save_model(model, path):
    common.atomic_write(path, model.save)


def plot_training_curve(history, path, title):
    figure, (loss_axis, accuracy_axis) = common.pyplot().subplots(1, 2, figsize=(10, 3.5))
    losses = [(record["step"], record["loss"]) for record in history if record.get("loss") is not None]
    accuracies = [(record["step"], 100 * record["val_accuracy"]) for record in history
                  if record.get("val_accuracy") is not None]
    loss_axis.plot(*zip(*losses)) if losses else None
    loss_axis.set(xlabel="step", ylabel="training loss", yscale="log", title=title)
    accuracy_axis.plot(*zip(*accuracies)) if accuracies else None
    accuracy_axis.set(xlabel="step", ylabel="validation accuracy (%)")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
    common.save_figure(figure, path)


def save_run(out_dir, model, config, metrics):
    """Write everything a finished (or stopped) run leaves behind, each file atomically.

    The model is skipped if its weights are not finite (it never is after train()).
    """
    out_dir = Path(out_dir)
    if weights_are_finite(model):
        save_model(model, out_dir / "model.keras")
    config_text = common.provenance_comment(metrics.get("data")) + common.dump_toml(config)
    common.atomic_write_bytes(out_dir / "config.toml", config_text.encode())
    common.write_json(out_dir / "metrics.json", metrics)  # Strict JSON: a missing number is null.
    if metrics["history"]:
        plot_training_curve(metrics["history"], out_dir / "training_curve.png", title=out_dir.name)


# ------------------------------------------------------------------------------- main


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description="Train a CNN on an image dataset from a topology config.")
    common.add_common_arguments(parser, "train")
    parser.add_argument("--out", help="output folder (default: runs/<config name>, after the dataset if not MNIST)")
    parser.add_argument("--steps", type=int, help="total optimisation steps (overrides train.num_steps)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its saved model, optimizer and step")
    return parser.parse_args(argv)


# The recipe keys added after the original recipe, with the values that reproduce it.
ORIGINAL_RECIPE = {"schedule": "constant", "warmup_steps": 0, "label_smoothing": 0.0, "shift_pixels": 0}


def _saved_config(path):
    """A run's config.toml; one saved before a [train] key existed gets that key's original value."""
    config = common.load_config(path)
    saved_train = common.read_toml(path).get("train", {})
    config["train"].update({key: value for key, value in ORIGINAL_RECIPE.items() if key not in saved_train})
    return config


def _read_earlier_metrics(out_dir):
    """The metrics.json of the run to resume (None if it has none); a damaged one is refused."""
    path = Path(out_dir) / "metrics.json"
    if not path.exists():
        print(f"note: {path} is missing; the resumed run's history starts here")
        return None
    try:
        metrics = json.loads(path.read_text())
        steps, seconds, history = metrics["steps"], metrics["seconds"], metrics["history"]
        if not (isinstance(steps, int) and isinstance(seconds, (int, float)) and isinstance(history, list)
                and all(isinstance(record, dict) and isinstance(record.get("step"), int) for record in history)):
            raise ValueError("steps, seconds or history have the wrong type")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"cannot resume {out_dir}: its metrics.json is damaged ({type(error).__name__}: {error}); "
                        "train afresh without --resume or in another --out") from None
    return metrics


def _resumable_model(path, images):
    """The saved model with its optimizer state; a model saved without one is refused."""
    model = common.load_trained_model(path, images, compile=True)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or int(optimizer.iterations.numpy()) == 0:
        raise UserError(f"cannot resume {path}: it was saved without its optimizer state (step count and Adam "
                        "moments); train afresh without --resume")
    return model


def _note_schedule_end(optimizer, total_steps):
    """Say so when a resumed run goes past the end of its saved schedule (cosine: learning rate 0)."""
    schedule = optimizer._learning_rate
    end = getattr(schedule, "decay_steps", None)
    if end is not None and total_steps > end + schedule.warmup_steps:
        rate = float(schedule(end + schedule.warmup_steps))
        print(f"note: the saved learning-rate schedule ends at step {end + schedule.warmup_steps}; "
              f"steps after it use its final rate {rate:g}")


def _merge_sessions(earlier, metrics):
    """One run's metrics over every session: whole history, total seconds and examples."""
    if earlier is None:
        return {**metrics, "sessions": 1}
    done_before = earlier["steps"]
    offset = float(earlier["seconds"])
    examples_before = earlier.get("examples", earlier.get("examples_per_second", 0.0) * offset)
    history = [record for record in earlier["history"] if record["step"] <= done_before]
    history += [{**record, "seconds": record["seconds"] + offset} for record in metrics["history"]]
    seconds, examples = offset + metrics["seconds"], examples_before + metrics["examples"]
    return {**metrics, "seconds": seconds, "examples": examples,
            "examples_per_second": examples / seconds if seconds else 0.0,
            "sessions": earlier.get("sessions", 1) + 1, "history": history}


def main(argv=None):
    args = parse_arguments(argv)
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps {args.steps} must be at least 1 (the total number of optimisation steps)")
    out_dir = Path(args.out) if args.out else default_out_dir(args.config, common.resolve_cli_config(args, "train"))
    base, model, earlier = None, None, None
    if args.resume:
        if not (out_dir / "model.keras").is_file():
            raise UserError(f"nothing to resume in {out_dir}: it has no model.keras; drop --resume or fix --out")
        base = _saved_config(out_dir / "config.toml")
        earlier = _read_earlier_metrics(out_dir)
    if args.steps is not None:
        args.set.append(f"train.num_steps={args.steps}")
    config = common.resolve_cli_config(args, "train", base=base)
    check_train_section(config["train"])
    # First of all TensorFlow work: a cluster's collective ops are set up as the strategy is made.
    strategy = distributed.make_strategy(config["train"]["distribute"])
    distributed.check_batch_split(config["train"]["batch_size"], strategy)
    # "auto" resolved once, here (it may ask TensorFlow for a GPU), so the saved config.toml says what ran.
    config["train"]["mixed_precision"] = distributed.resolve_precision(config["train"]["mixed_precision"])
    chief = distributed.is_chief(strategy)
    data = common.split_validation(common.load_dataset(args.data, config["data"]["dataset"]),
                                   config["data"]["validation_size"])
    if args.resume:
        with distributed.scope(strategy):  # Its variables mirrored, as a new model's would be.
            model, earlier = _resumed(out_dir, data, config["train"], earlier)
        if model is None:
            return 0
    if chief:  # Checked before training; common.run_cli removes the folder again if the run leaves it empty.
        common.ensure_writable_dir(out_dir)
    print(f"training on {len(data['x_train'])} examples, validating on {len(data['x_val'])}; "
          + (f"output in {out_dir}" if chief else "the chief writes the outputs"))
    # Closed on Ctrl-C and SIGTERM too; only the chief writes files.
    with common.summary_writer(out_dir / "logs") if chief else contextlib.nullcontext() as writer:
        model, metrics = train(data, config, model=model, writer=writer, strategy=strategy)  # SIGTERM is Ctrl-C.
    with common.InterruptsDeferred() as deferred:
        return _finish(out_dir, model, config, _merge_sessions(earlier, metrics), earlier, deferred, chief)


def _resumed(out_dir, data, section, earlier):
    """The saved model to go on training and the earlier metrics; (None, earlier) if it is done already."""
    model, total_steps = _resumable_model(out_dir / "model.keras", data["x_train"]), section["num_steps"]
    if distributed.precision_of(model) != section["mixed_precision"]:
        print(f"note: the saved model computes in {distributed.precision_of(model)!r}, and goes on in it; "
              f"train.mixed_precision = {section['mixed_precision']!r} applies to new models")
    step = int(model.optimizer.iterations.numpy())
    if step >= total_steps:
        print(f"nothing to do: {out_dir} is already at step {step} >= {total_steps}; "
              "give a larger --steps to train further")
        return None, earlier
    if earlier is not None and earlier["steps"] != step:
        print(f"note: model.keras is at step {step} but metrics.json at {earlier['steps']}; "
              "keeping the history up to the model's step")
        earlier = {**earlier, "steps": step}
    print(f"resuming {out_dir} at step {step}")
    if earlier is not None and earlier.get("data") not in (None, data["provenance"]):
        print(f"note: the run so far was trained on {earlier['data']}, this session on {data['provenance']}")
    _note_schedule_end(model.optimizer, total_steps)
    return model, earlier


def default_out_dir(config_path, config):
    """runs/<config name>, with the dataset in front when it is not MNIST: a CIFAR run never replaces an MNIST one."""
    name, dataset = Path(config_path).stem if config_path else "default", config["data"]["dataset"]
    if dataset != "mnist" and not name.startswith(dataset):
        name = f"{dataset}-{name}"
    return Path("runs") / name


def _finish(out_dir, model, config, metrics, earlier, deferred, chief=True):
    """Save what the run reached (if it reached anything new), report it, and return the exit code.

    A cluster's other workers hold the same weights as the chief and save nothing.
    """
    steps_before = earlier["steps"] if earlier is not None else 0
    saved = chief and metrics["steps"] > steps_before
    if not chief:
        print(f"worker done at step {metrics['steps']}; the chief saves the run in {out_dir}")
    elif saved:
        save_run(out_dir, model, config, metrics)
        accuracy_text = "not measured" if metrics["test_accuracy"] is None else f"{metrics['test_accuracy']:.2%}"
        print(f"test accuracy {accuracy_text} after {metrics['steps']} steps "
              f"({common.format_seconds(metrics['seconds'])}, {metrics['examples_per_second']:.0f} ex/s); "
              f"saved {out_dir / 'model.keras'}")
    else:
        print(f"no step was completed; nothing saved in {out_dir}")
    if metrics["diverged"]:
        kept = (f"the last finite weights, step {metrics['steps']}, are in {out_dir / 'model.keras'}" if saved
                else "nothing was saved")
        print(f"error: training {metrics['stop_reason']}; lower train.learning_rate "
              f"(now {config['train']['learning_rate']:g}) or raise train.warmup_steps and train afresh ({kept})",
              file=sys.stderr)
        return 2
    if metrics["worker_failed"]:
        kept = f"the weights of step {metrics['steps']} are in {out_dir / 'model.keras'}" if saved else "nothing saved"
        print(f"error: training {metrics['stop_reason']} ({kept}); restart every worker with the same "
              f"TF_CONFIG and: python proc_mnist.py --out {out_dir} --resume", file=sys.stderr)
        return 2
    if metrics["interrupted"] or deferred.interrupted:
        print(f"stopped early; continue with: python proc_mnist.py --out {out_dir} --resume")
        return 130
    return 0


if __name__ == "__main__":
    common.run_cli(main)
