"""The network: build_model from a topology dict, its views, loading a saved one, and its precision.

build_model(topology) is the one place the network is built; every other script uses it
or a model it saved. Layer names let them reach the activations: conv{i} is conv block
i's output (after activation and pooling), fc{j} the j-th fully connected layer before
its activation, logits the class scores, softmax the probabilities (i and j count from 1).

The analysis scripts (cnn_backwork.py, guided_backprop.py, attacks.py) import this
module, never the trainer: logits_model and input_gradient_model are the views they
differentiate, load_trained_model the model they read.

Precision: train.mixed_precision chooses the policy new layers compute in
(precision_policy); "auto" is mixed_bfloat16 where bfloat16 arithmetic is fast (a GPU,
or a CPU with avx512_bf16 or amx_bf16), else none. A model is analysed in float32
(float32_model). docs/benchmarks.md has the measurements behind these choices.
"""
import contextlib
import functools
import math
import os
import zipfile

import numpy as np

import common
import configurator
import datasets
from common import UserError

# ------------------------------------------------------------------------ the network

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
    classes = datasets.count_classes(data)
    if classes and classes != topology["num_classes"]:
        raise UserError(f"the data has {classes} classes but model.num_classes is {topology['num_classes']}; "
                        f"set model.num_classes = {classes}")


def build_model(topology):
    """Build the Keras functional model a topology dict describes; output is probabilities."""
    import keras
    from keras import layers

    # The same value ranges as a config (a notebook's dict skips merge_config): tables, sizes,
    # the class count and the dropout rate.
    configurator.check_section("model", topology, source="topology")
    topology = {**configurator.default_config()["model"], **topology}
    shape = _image_shape(topology["image_dim_size"])
    conv_layers, pool_layers = list(topology["conv_layers"]), list(topology["pool_layers"])
    if len(pool_layers) != len(conv_layers):
        raise UserError(f"{len(conv_layers)} conv layers but {len(pool_layers)} pool layers; give one "
                        "pool layer per conv layer ({} or None for no pooling)")
    num_classes = topology["num_classes"]
    dropout, batch_norm = float(topology["dropout"]), bool(topology["batch_norm"])
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


# ----------------------------------------------------------- a classifier with a discriminator (ProoD)

# Layer names of combine_with_discriminator's model: the discriminator's layers carry the prefix
# (so that conv{i} and fc{j} stay the classifier's, which backwork compares), the classifier's
# class scores are class_logits, and the layers that mix the two carry COMBINE_PREFIX.
DISCRIMINATOR_PREFIX = "discriminator_"
COMBINE_PREFIX = "combine_"
CLASS_LOGITS = "class_logits"


def _chain_layers(model):
    """model's layers after its input, in order (a model build_model made is a chain)."""
    from keras import layers

    return [layer for layer in model.layers if not isinstance(layer, layers.InputLayer)]


def _copy_chain(model, tensor, names, stop="softmax"):
    """Fresh copies of model's layers before the one named stop (by default its logits included, its
    softmax left out), named by names(name), applied to tensor with model's weights; returns the last
    copy's output."""
    for layer in _chain_layers(model):
        if layer.name == stop:
            break
        copy = type(layer).from_config({**layer.get_config(), "name": names(layer.name)})
        tensor = copy(tensor)
        copy.set_weights(layer.get_weights())
    return tensor


def build_discriminator(classifier):
    """ProoD's discriminator: classifier's network with two outputs (0: out, 1: in distribution).

    Its hidden layers start from classifier's weights (features that already tell digits
    apart), its logits layer fresh; it is a model of build_model's shape, so the trainer and
    the interval bounds take it as they take any classifier.
    """
    import keras
    from keras import layers

    inputs = keras.Input(shape=classifier.input_shape[1:], name="input")
    hidden = _copy_chain(classifier, inputs, lambda name: name, stop="logits")
    logits = layers.Dense(2, name="logits", dtype="float32")(hidden)
    outputs = layers.Activation("softmax", name="softmax", dtype="float32")(logits)
    return keras.Model(inputs, outputs, name="discriminator")


def combine_with_discriminator(classifier, discriminator):
    """One Keras model of p(y|x) = p(in|x) p(y|x, in) + (1 - p(in|x)) / K (Meinke et al., ProoD, 2022).

    p(y|x, in) is the classifier's softmax, p(in|x) = sigmoid(s_in - s_out) the discriminator's.
    Its logits layer outputs log p(y|x), so that its softmax is p(y|x) itself and every attack,
    backwork and bound reads it as any model's scores; argmax p(y|x) is the classifier's
    wherever p(in|x) is not lost to float32 rounding (above about 1e-7; a digit the discriminator
    rejects that firmly gets 1/K for every class), so its accuracy is the classifier's. Built from Keras' own layers only
    (log p as logaddexp(log p_in + log q_y, log p_out - log K), with logaddexp(u, v) =
    v + relu(u - v) + softplus(-|u - v|)), so keras.models.load_model reads the saved file
    without custom objects or unsafe deserialisation.
    """
    import keras
    from keras import layers

    def combining(name):
        return COMBINE_PREFIX + name

    def negated(tensor, name):
        return layers.Rescaling(-1.0, name=combining(name), dtype="float32")(tensor)

    num_classes = classifier.output_shape[-1]
    inputs = keras.Input(shape=classifier.input_shape[1:], name="input")
    class_scores = _copy_chain(classifier, inputs, lambda name: CLASS_LOGITS if name == "logits" else name)
    in_out_scores = _copy_chain(discriminator, inputs, lambda name: DISCRIMINATOR_PREFIX + name)
    difference = layers.Dense(1, use_bias=False, trainable=False, name=combining("in_minus_out"), dtype="float32")
    in_minus_out = difference(in_out_scores)
    difference.set_weights([np.array([[-1.0], [1.0]], np.float32)])
    log_in = layers.Activation("log_sigmoid", name=combining("log_p_in"), dtype="float32")(in_minus_out)
    log_out = layers.Activation("log_sigmoid", name=combining("log_p_out"), dtype="float32")(
        negated(in_minus_out, "out_minus_in"))
    log_out_share = layers.Rescaling(1.0, offset=-math.log(num_classes), name=combining("log_p_out_share"),
                                     dtype="float32")(log_out)
    log_class = layers.Activation("log_softmax", name=combining("log_q"), dtype="float32")(class_scores)
    log_in_share = layers.Add(name=combining("log_p_in_q"), dtype="float32")([log_in, log_class])
    gap = layers.Subtract(name=combining("gap"), dtype="float32")([log_in_share, log_out_share])
    rise = layers.Activation("relu", name=combining("rise"), dtype="float32")(gap)
    fall = layers.Activation("relu", name=combining("fall"), dtype="float32")(negated(gap, "negated_gap"))
    size = layers.Add(name=combining("size"), dtype="float32")([rise, fall])
    tail = layers.Activation("softplus", name=combining("tail"), dtype="float32")(negated(size, "negated_size"))
    log_probabilities = layers.Add(name="logits", dtype="float32")([log_out_share, rise, tail])
    outputs = layers.Activation("softmax", name="softmax", dtype="float32")(log_probabilities)
    return keras.Model(inputs, outputs, name="prood")


def is_combined(model):
    """Whether model is combine_with_discriminator's (a classifier with a discriminator)."""
    return any(layer.name == CLASS_LOGITS for layer in model.layers)


def combined_parts(model):
    """(classifier layers, discriminator layers) of a combined model, each in order up to its logits."""
    chain = _chain_layers(model)
    discriminator = [layer for layer in chain if layer.name.startswith(DISCRIMINATOR_PREFIX)]
    classifier = [layer for layer in chain if not layer.name.startswith((DISCRIMINATOR_PREFIX, COMBINE_PREFIX))
                  and layer.name not in ("logits", "softmax")]
    return classifier, discriminator


def batch_norm_layers(model):
    """The model's BatchNormalization layers, in order."""
    from keras import layers

    return [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]


@contextlib.contextmanager
def batch_norm_frozen(model, frozen=True):
    """Within the block, batch normalisation runs as at inference (moving statistics) and does not learn.

    Keras runs a BatchNormalization layer whose trainable is False in inference mode even in a
    training call, and leaves its scale and offset out of trainable_variables. A defence trained on
    interval bounds needs this: the bounds use the moving statistics (the network as it is judged),
    and a training pass on batch statistics would let the bound term flatten a network the class
    loss never sees (the Fashion-MNIST GOOD run fell to 10% accuracy that way). Restored after.
    """
    layers = [layer for layer in batch_norm_layers(model) if layer.trainable] if frozen else []
    for layer in layers:
        layer.trainable = False
    try:
        yield
    finally:
        for layer in layers:
            layer.trainable = True


def logits_model(model):
    """A view of model that outputs the class scores before softmax, sharing its weights."""
    import keras

    return keras.Model(model.input, model.get_layer("logits").output)


def input_gradient_model(model):
    """model with the same weights and outputs, faster to differentiate with respect to its input.

    Backwork and saliency take the gradient of the network with respect to the image.
    TensorFlow's input gradient of a convolution over one channel (Conv2DBackpropInput) is
    slow on CPU (four times its forward pass, a fifth of a whole backwork step; docs/benchmarks.md).
    Such layers become SingleChannelConv2D, whose input gradient is one depthwise
    convolution (equal to float rounding); every other layer is shared with model. The result is for taking
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


# ---------------------------------------------------------------------- saved models


def check_model_file(path):
    """path, if it can be a model saved by proc_mnist.py; otherwise one line saying why not."""
    fix = "train one with proc_mnist.py or fix --model"
    path = common.checked_input(path, "model", fix)
    if path.suffix != ".keras" or not zipfile.is_zipfile(path):
        raise UserError(f"model {path} is not a Keras model archive (.keras, saved by proc_mnist.py); {fix}")
    return path


def load_trained_model(path, images=None, num_classes=None, compile=False):
    """Load a model saved by proc_mnist.py and check that it fits the data it will see.

    compile=True also restores the optimizer and its step count (to continue training);
    without it, a model trained in mixed precision comes back as a float32 copy.
    """
    import keras

    path = check_model_file(path)
    try:
        model = keras.models.load_model(path, compile=compile)
    except Exception as error:  # Keras raises many types, with long messages, for a damaged archive.
        first_line = next((line for line in str(error).splitlines() if line.strip()), "")[:200]
        raise UserError(f"cannot load model {path} ({type(error).__name__}: {first_line}); "
                        "retrain it with proc_mnist.py") from None
    input_shape = tuple(model.input_shape[1:])
    if images is not None and tuple(images.shape[1:]) != input_shape:
        raise UserError(f"model {path} takes images of shape {input_shape} but the data has "
                        f"{tuple(images.shape[1:])}; use the data it was trained on")
    if num_classes is not None and model.output_shape[-1] != num_classes:
        raise UserError(f"model {path} has {model.output_shape[-1]} classes but the data needs "
                        f"{num_classes}; use a model trained on this data")
    if compile:  # To train on: in the precision it was trained in.
        return model
    return float32_model(model)  # To analyse: float32, even if trained in mixed precision.


def target_probabilities(model, images, targets, batch_size=1000):
    """Each image's probability (N,) of its target class under model (the full softmax, a "none" output included)."""
    return predict(model, images, batch_size)[np.arange(len(images)), targets]


def predict(model, images, batch_size=1000):
    """The model's outputs (class probabilities) in inference mode, a batch at a time, as NumPy."""
    outputs = [np.asarray(model(images[start:start + batch_size], training=False))
               for start in range(0, len(images), batch_size)]
    return np.concatenate(outputs) if outputs else np.zeros((0,))


# ------------------------------------------------------------------------- precision


# The x86 CPU flags of bfloat16 arithmetic. Without one (and without a GPU), mixed_bfloat16
# emulates it and trains several times slower than float32 (docs/benchmarks.md).
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# oneDNN's instruction-set caps (ONEDNN_MAX_CPU_ISA) below its bfloat16 kernels: a CPU with the
# flags runs mixed_bfloat16 under one of them as slowly as a CPU without (docs/benchmarks.md).
ISA_CAPS_WITHOUT_BFLOAT16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")


def gpu_visible():
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))



def cpu_has_bfloat16(cpuinfo_text=None):
    """Whether the CPU has bfloat16 arithmetic (BFLOAT16_CPU_FLAGS); None where its flags cannot be read.

    cpuinfo_text is /proc/cpuinfo's text (read by default, Linux only); every core must
    list one of the flags.
    """
    if cpuinfo_text is None:
        try:
            with open("/proc/cpuinfo") as file:
                cpuinfo_text = file.read()
        except OSError:  # Not Linux, or no /proc.
            return None
    flag_lines = [line.partition(":")[2].split() for line in cpuinfo_text.splitlines()
                  if line.partition(":")[0].strip() == "flags"]
    if not flag_lines:
        return None
    return all(set(flags) & set(BFLOAT16_CPU_FLAGS) for flags in flag_lines)


def onednn_isa_cap():
    """The instruction-set cap oneDNN runs under ($ONEDNN_MAX_CPU_ISA, or the older $DNNL_MAX_CPU_ISA),
    upper case; "" where none is set."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()


def bfloat16_slowness():
    """Why mixed_bfloat16 would be slow here, or None where it is fast (a GPU, or the CPU's flags
    with oneDNN allowed to use them)."""
    has_bfloat16, cap = cpu_has_bfloat16(), onednn_isa_cap()
    capped = cap in ISA_CAPS_WITHOUT_BFLOAT16
    if (has_bfloat16 and not capped) or gpu_visible():
        return None
    if has_bfloat16:
        return f"no GPU is visible and ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN from the CPU's bfloat16 instructions"
    if has_bfloat16 is None:
        return ("no GPU is visible and the CPU flags cannot be read (/proc/cpuinfo), so bfloat16 arithmetic "
                "is taken to be absent")
    return f"no GPU is visible and the CPU has no bfloat16 arithmetic (neither {' nor '.join(BFLOAT16_CPU_FLAGS)})"


def resolve_precision(setting):
    """The policy train.mixed_precision names: "auto" is mixed_bfloat16 where that is fast, else none."""
    if setting != "auto":
        return setting
    return "mixed_bfloat16" if bfloat16_slowness() is None else "none"


def check_precision_speed(policy, force=False):
    """Refuse (one line) to train in mixed_bfloat16 where it is several times slower than float32, unless force."""
    if policy != "mixed_bfloat16" or force:
        return
    slowness = bfloat16_slowness()
    if slowness is not None:
        raise UserError(f"train.mixed_precision = mixed_bfloat16 would train several times slower than float32 here "
                        f"(0.13x on an AVX2-only AMD EPYC): {slowness}; use train.mixed_precision = none or auto, "
                        "or go on anyway with --set train.mixed_precision_force=true")


class precision_policy:
    """Within the block, new Keras layers compute in the named policy ("none": float32)."""

    def __init__(self, name):
        self.name = "float32" if name == "none" else name

    def __enter__(self):
        import keras

        self.previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(self.name)

    def __exit__(self, *exception):
        import keras

        keras.config.set_dtype_policy(self.previous)
        return False


def precision_of(model):
    """The mixed-precision policy a model computes in ("none" for float32), whatever the config says."""
    names = {layer.dtype_policy.name for layer in model.layers} - {"float32"}
    return names.pop() if len(names) == 1 else "none" if not names else "mixed"


def float32_model(model):
    """model itself if it computes in float32, else a float32 copy with the same weights.

    A model trained with mixed precision keeps its policy in the saved file (so that a
    resumed run goes on in it); backwork and saliency analyse it in float32, where a
    probability of 0.999 and small gradients are resolved.
    """
    import keras

    if precision_of(model) == "none":
        return model
    config = model.get_config()
    for layer in config["layers"]:
        if "dtype" in layer["config"]:
            layer["config"]["dtype"] = "float32"
    copy = keras.Model.from_config(config)
    copy.set_weights(model.get_weights())
    return copy



def save_model(model, path):
    common.atomic_write(path, model.save)
