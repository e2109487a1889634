"""Train a CNN on MNIST from a topology dict.

    python proc_mnist.py [CONFIG] [--data PATH] [--out DIR] [--steps N] [--seed N]
                         [--set section.key=value ...] [--resume]

build_model(topology) is the one place the network is built; every other script uses it
or a model it saved. Layer names let them reach the activations:
conv{i} is conv block i's output (after activation and pooling), fc{j} the j-th fully
connected layer before its activation, logits the class scores, softmax the probabilities
(i and j count from 1).
"""
import argparse
import json
import math
import signal
import time
from pathlib import Path

import numpy as np

import common
from common import UserError

# ------------------------------------------------------------------------------ model


def _spatial_size(size, window, stride, padding):
    """Output length of one spatial axis, as tf.nn.conv2d and max_pool compute it."""
    if padding == "SAME":
        return math.ceil(size / stride)
    return math.ceil((size - window + 1) / stride) if size >= window else 0


def _four_list(layer, key, name):
    value = layer.get(key)
    if (not isinstance(value, (list, tuple)) or len(value) != 4
            or not all(isinstance(item, int) and item > 0 for item in value)):
        raise UserError(f"{name}: {key} must be four positive ints, not {value!r}")
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


def build_model(topology):
    """Build the Keras functional model a topology dict describes; output is probabilities."""
    import keras
    from keras import layers

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
    logits = layers.Dense(num_classes, name="logits")(x)
    outputs = layers.Activation("softmax", name="softmax")(logits)
    return keras.Model(inputs, outputs, name="mnist_cnn")


def logits_model(model):
    """A view of model that outputs the class scores before softmax, sharing its weights."""
    import keras

    return keras.Model(model.input, model.get_layer("logits").output)


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


def make_train_function(model, images, targets):
    """A compiled function that runs a block of optimisation steps in one call.

    Running many steps per call inside one graph (as fit's steps_per_execution does)
    removes the Python overhead that dominates small batches on a CPU.
    """
    import tensorflow as tf

    scores = logits_model(model)
    optimizer = model.optimizer
    variables = model.trainable_variables
    images, targets = tf.constant(images), tf.constant(targets)

    @tf.function(jit_compile=False)  # XLA's CPU convolutions are ~10x slower than oneDNN's here.
    def run_steps(indices):  # indices: (steps, batch)
        loss_sum = tf.constant(0.0)
        for step in tf.range(tf.shape(indices)[0]):
            batch_images = tf.gather(images, indices[step])  # (batch, H, W, C)
            batch_targets = tf.gather(targets, indices[step])  # (batch, classes)
            with tf.GradientTape() as tape:
                logits = scores(batch_images, training=True)
                loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(batch_targets, logits))
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            loss_sum += loss
        return loss_sum / tf.cast(tf.shape(indices)[0], tf.float32)

    return run_steps


def accuracy(model, images, labels, batch_size=1000):
    """Fraction of images whose most probable class is the label (labels int or soft)."""
    if len(images) == 0:
        return float("nan")
    labels = np.asarray(labels)
    labels = labels.argmax(axis=1) if labels.ndim == 2 else labels
    probabilities = common.predict(model, images, batch_size)
    return float(np.mean(probabilities.argmax(axis=1) == labels))


def compile_for_training(model, learning_rate):
    """Attach an Adam optimizer so that model.save keeps its state for --resume.

    The loss and metric are for users who call model.evaluate(x, y) in a notebook;
    training itself uses make_train_function.
    """
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.optimizer.build(model.trainable_variables)
    return model


def resolve_options(options):
    """Fill a (possibly partial) options dict from the defaults, checking every key."""
    return common.merge_config(common.default_config(), options or {}, source="options")


def train(data, model_options=None, model=None, progress=print):
    """Train on data (as from load_mnist / split_validation) and return (model, metrics).

    model_options is a config dict ({'model': {...}, 'train': {...}}, missing keys take
    their defaults). Training labels may be ints or probability rows. A given model
    continues from its optimizer's step count. Ctrl-C stops at the end of the current
    block of log_every steps (TensorFlow finishes it) and returns what was reached, with
    metrics['interrupted'] set.
    """
    import keras

    options = resolve_options(model_options)
    train_options = options["train"]
    keras.utils.set_random_seed(train_options["seed"])
    if model is None:
        model = build_model(options["model"])
    if getattr(model, "optimizer", None) is None:
        compile_for_training(model, train_options["learning_rate"])
    num_classes = model.output_shape[-1]
    images, targets = data["x_train"], to_targets(data["y_train"], num_classes)
    if tuple(images.shape[1:]) != tuple(model.input_shape[1:]):
        raise UserError(f"training images of shape {images.shape[1:]} do not fit the model's input "
                        f"{model.input_shape[1:]}; set model.image_dim_size to match the data")
    run_steps = make_train_function(model, images, targets)
    batch_size, total_steps = train_options["batch_size"], train_options["num_steps"]
    step = int(model.optimizer.iterations.numpy())
    history, interrupted, start = [], False, time.perf_counter()
    first_step = step
    try:
        while step < total_steps:
            # Blocks end on multiples of log_every, so a resumed run logs the same steps.
            log_every = train_options["log_every"]
            block = min(log_every - step % log_every, total_steps - step)
            indices = batch_indices(len(images), batch_size, train_options["seed"], step, block)
            loss = float(run_steps(indices))
            step += block
            seconds = time.perf_counter() - start
            record = {"step": step, "loss": loss, "seconds": seconds,
                      "val_accuracy": accuracy(model, data.get("x_val", []), data.get("y_val", []))}
            history.append(record)
            examples_per_second = (step - first_step) * batch_size / seconds
            eta = (total_steps - step) * batch_size / examples_per_second
            progress(f"step {step}/{total_steps}  loss {loss:.4f}  val acc {record['val_accuracy']:.2%}  "
                     f"{examples_per_second:.0f} ex/s  eta {common.format_seconds(eta)}")
    except KeyboardInterrupt:
        interrupted = True
        step = int(model.optimizer.iterations.numpy())  # The block under way ran to its end.
        progress(f"interrupted at step {step}")
    seconds = time.perf_counter() - start
    metrics = {"steps": step, "seconds": seconds, "interrupted": interrupted,
               "examples_per_second": (step - first_step) * batch_size / seconds if seconds else 0.0,
               "history": history}
    if "x_test" in data:
        metrics["test_accuracy"] = accuracy(model, data["x_test"], data["y_test"])
    return model, metrics


# ------------------------------------------------------------------------------ files


def save_model(model, path):
    common.atomic_write(path, model.save)


def plot_training_curve(history, path, title):
    steps = [record["step"] for record in history]
    figure, (loss_axis, accuracy_axis) = common.pyplot().subplots(1, 2, figsize=(10, 3.5))
    loss_axis.plot(steps, [record["loss"] for record in history])
    loss_axis.set(xlabel="step", ylabel="training loss", yscale="log", title=title)
    accuracy_axis.plot(steps, [100 * record["val_accuracy"] for record in history])
    accuracy_axis.set(xlabel="step", ylabel="validation accuracy (%)")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
    common.save_figure(figure, path)


def save_run(out_dir, model, config, metrics):
    """Write everything a finished (or interrupted) run leaves behind, each file atomically."""
    out_dir = Path(out_dir)
    save_model(model, out_dir / "model.keras")
    common.atomic_write_bytes(out_dir / "config.toml", common.dump_toml(config).encode())
    common.write_json(out_dir / "metrics.json", metrics)
    if metrics["history"]:
        plot_training_curve(metrics["history"], out_dir / "training_curve.png", title=out_dir.name)


# ------------------------------------------------------------------------------- main


def add_common_arguments(parser, section):
    """Arguments every script takes: a config, overrides, the data and the seed."""
    parser.add_argument("config", nargs="?", help="TOML config listing what differs from configs/default.toml")
    parser.add_argument("--data", help="local MNIST .npz in the Keras layout (default: $MNIST_PATH, else download)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value; may be repeated")
    parser.add_argument("--seed", type=int, help=f"random seed (overrides {section}.seed)")


def resolve_cli_config(args, section, base=None):
    overrides = list(args.set)
    if args.seed is not None:
        overrides.append(f"{section}.seed={args.seed}")
    return common.load_config(args.config, overrides, base=base)


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description="Train a CNN on MNIST from a topology config.")
    add_common_arguments(parser, "train")
    parser.add_argument("--out", help="output folder (default: runs/<config name>)")
    parser.add_argument("--steps", type=int, help="total optimisation steps (overrides train.num_steps)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its saved model, optimizer and step")
    return parser.parse_args(argv)


def _read_history(metrics_path):
    """The progress records of an earlier run, so a resumed run's curve starts at step 0."""
    try:
        return json.loads(Path(metrics_path).read_text())["history"]
    except (OSError, ValueError, KeyError):
        return []


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    args = parse_arguments(argv)
    out_dir = Path(args.out or Path("runs") / (Path(args.config).stem if args.config else "default"))
    base, model = None, None
    if args.resume:
        if not (out_dir / "model.keras").is_file():
            raise UserError(f"nothing to resume in {out_dir}: it has no model.keras; drop --resume or fix --out")
        base = common.load_config(out_dir / "config.toml")
    if args.steps is not None:
        args.set.append(f"train.num_steps={args.steps}")
    config = resolve_cli_config(args, "train", base=base)
    data = common.split_validation(common.load_mnist(args.data), config["data"]["validation_size"])
    common.ensure_writable_dir(out_dir)
    earlier_history = []
    if args.resume:
        model = common.load_trained_model(out_dir / "model.keras", data["x_train"], compile=True)
        earlier_history = _read_history(out_dir / "metrics.json")
        print(f"resuming {out_dir} at step {int(model.optimizer.iterations.numpy())}")
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # A scheduler's kill saves like Ctrl-C.
    print(f"training on {len(data['x_train'])} examples, validating on {len(data['x_val'])}; output in {out_dir}")
    model, metrics = train(data, config, model=model)
    metrics["history"] = earlier_history + metrics["history"]
    save_run(out_dir, model, config, metrics)
    print(f"test accuracy {metrics.get('test_accuracy', float('nan')):.2%} after {metrics['steps']} steps "
          f"({common.format_seconds(metrics['seconds'])}, {metrics['examples_per_second']:.0f} ex/s); "
          f"saved {out_dir / 'model.keras'}")
    if metrics["interrupted"]:
        print(f"stopped early; continue with: python proc_mnist.py --out {out_dir} --resume")
        return 130
    return 0


if __name__ == "__main__":
    common.run_cli(main)
