"""The trainer: everything that trains a model, for every script that trains one.

train() runs the [train] recipe (Adam on a Keras schedule, label smoothing, random shifts
and flips) in compiled calls of about a second each, so Ctrl-C or SIGTERM stops it
between calls; a loss or gradient that is not finite stops it with the last finite
weights. The compiled step takes an optional ExtraTerm: a loss on an extra batch that
is drawn inside the step and goes through the same forward pass as the class images
(so batch normalisation sees both). That is where a defence plugs in (outliers trained
towards the uniform label, attacked noise, interval bounds) without a fork of the step.

proc_mnist.py is the command around it (files, --resume, the run's folder);
preprocess_data.py retrains with it.
"""
import dataclasses
import math
import time
from typing import Callable

import numpy as np

import cnn
import common
import configurator
import datasets
import distributed
from common import UserError


@dataclasses.dataclass(frozen=True)
class ExtraTerm:
    """A loss on an extra batch, added to every training step: how a defence plugs into the trainer.

    draw(step) -> images (extra, H, W, C) float32, run inside the compiled step before the
        gradient tape: this step's extra batch (outliers drawn from a pool, noise attacked
        inside an eps-ball, ...). step is the optimizer's step count (an int64 tensor), so a
        draw seeded by it is the same in a resumed run.
    loss(logits, images) -> (extra,) the per-image losses of the extra images, from their
        logits, which come from the same forward pass as the class images' (so batch
        normalisation's batch statistics see both). A term that needs more (interval bounds
        of the model over a ball around each image) closes over the model.
    weight: the step minimises mean class cross-entropy + weight * mean extra loss.
    frozen_batch_norm: train with batch normalisation as at inference (cnn.batch_norm_frozen), for a
        loss on interval bounds, which use the moving statistics.
    """
    draw: Callable
    loss: Callable
    weight: float = 1.0
    frozen_batch_norm: bool = False


def uniform_label_loss(logits):
    """Cross-entropy of each row of logits against the uniform label (N,): "none of the classes".

    -sum_k (1/K) log softmax(z)_k = logsumexp(z) - mean(z); it is 0-gradient exactly where the
    output is uniform (where it is smallest, log K), which is what outlier exposure and ACET train their extra images towards.
    """
    import tensorflow as tf

    return tf.reduce_logsumexp(logits, axis=-1) - tf.reduce_mean(logits, axis=-1)


def to_targets(labels, num_classes):
    """Integer labels become one-hot rows; probability rows (soft labels) pass through."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        if labels.shape[1] != num_classes:
            raise UserError(f"soft labels have {labels.shape[1]} classes, the model {num_classes}")
        return labels.astype(np.float32)
    return datasets.one_hot(labels, num_classes)


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


def _flipped(images, flips):
    """Each image mirrored left-right where its flag is true: (batch, H, W, C)."""
    import tensorflow as tf

    return tf.where(flips[:, None, None, None], tf.reverse(images, axis=[2]), images)


def _batch_function(images, targets, label_smoothing, shift_pixels, seed, optimizer, flip=False):
    """batch(step_indices) -> (images, targets) of one step: gathered, smoothed, shifted and mirrored, in the graph."""
    import tensorflow as tf

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
        if flip:
            # Its own stream (seed + 1), so turning flips on leaves the shifts a run draws unchanged.
            key = tf.stack([tf.constant(seed, tf.int64) + 1, tf.cast(optimizer.iterations, tf.int64)])
            flips = tf.random.stateless_uniform([tf.shape(step_indices)[0]], key) < 0.5
            batch_images = _flipped(batch_images, flips)
        return batch_images, batch_targets

    return batch


def _gradient_function(model, strategy, xla, extra_term=None):
    """step_gradients(images, targets) -> (loss, gradients) of one global batch, over the strategy's replicas.

    The loss is the batch's mean cross-entropy (plus extra_term's weighted mean loss on its
    batch, see ExtraTerm); with a strategy, each replica computes the gradients of its
    share and they are summed across replicas (and workers).
    """
    import tensorflow as tf

    scores, variables = cnn.logits_model(model), model.trainable_variables

    def loss_and_gradients(batch_images, batch_targets, global_batch_size, extra_images=None):
        """The summed loss of these examples over the global batch size (plus the extra term), and its gradients."""
        count = tf.shape(batch_images)[0]
        if extra_images is not None:  # One forward pass for both: batch normalisation sees the class and extra images.
            batch_images = tf.concat([batch_images, tf.cast(extra_images, batch_images.dtype)], axis=0)
        with tf.GradientTape() as tape:
            logits = tf.cast(scores(batch_images, training=True), tf.float32)  # Mixed precision computes in bf16.
            losses = tf.nn.softmax_cross_entropy_with_logits(batch_targets, logits[:count])  # (batch,)
            loss = tf.reduce_sum(losses) / global_batch_size
            if extra_images is not None:
                loss += extra_term.weight * tf.reduce_mean(extra_term.loss(logits[count:], extra_images))
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
            extra_images = None if extra_term is None else extra_term.draw(tf.cast(model.optimizer.iterations, tf.int64))
            return loss_and_gradients(batch_images, batch_targets, tf.cast(tf.shape(batch_images)[0], tf.float32),
                                      extra_images)
        per_replica_loss, per_replica_gradients = strategy.run(replica_gradients, args=(batch_images, batch_targets))
        add = tf.distribute.ReduceOp.SUM
        return (strategy.reduce(add, per_replica_loss, axis=None),
                [strategy.reduce(add, gradient, axis=None) for gradient in per_replica_gradients])

    return step_gradients


def make_train_function(model, images, targets, label_smoothing=0.0, shift_pixels=0, seed=0, *,
                        strategy=None, xla=False, flip=False, extra_term=None):
    """A compiled function that runs a block of optimisation steps in one call.

    run_steps(indices), indices (steps, batch), returns (loss_sum, steps_done, bad_loss). A
    step whose loss or gradients are not finite is not applied and ends the call, so the
    model keeps its last finite weights; steps_done is then short and bad_loss that loss.
    Running many steps per call inside one graph (as fit's steps_per_execution does)
    removes the Python overhead that dominates small batches on a CPU.

    With a tf.distribute strategy (the model and its optimizer made in its scope), each
    replica computes the gradients of its share of every global batch; they are summed
    across replicas (and workers) before the finite check and the update. extra_term (an
    ExtraTerm) adds its weighted loss on a batch it draws each step. xla compiles
    the forward and backward pass with XLA. label_smoothing, shift_pixels and flip are the
    [train] recipe's (applied in the graph, drawn from seed and step).
    """
    import tensorflow as tf

    optimizer, variables = model.optimizer, model.trainable_variables
    # The fused kernel writes one variable's handle; a mirrored variable has one per replica.
    fused = _fused_adam(optimizer) if strategy is None else None
    apply_gradients = fused or (lambda gradients, variables: optimizer.apply_gradients(zip(gradients, variables)))
    batch = _batch_function(images, targets, label_smoothing, shift_pixels, seed, optimizer, flip)
    if extra_term is not None and strategy is not None:
        raise UserError("an extra loss term (a defence's) trains on one device; set train.distribute = \"none\"")
    step_gradients = _gradient_function(model, strategy, xla, extra_term)

    @tf.function(jit_compile=False,  # XLA's CPU convolutions are slower than oneDNN's (docs/benchmarks.md).
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
    probabilities = cnn.predict(model, images, batch_size)
    return float(np.mean(probabilities.argmax(axis=1) == labels))


ONE_CYCLE_DIVISOR = 25.0  # one_cycle warms up from learning_rate / 25 (Smith's 1cycle) ...


ONE_CYCLE_FINAL_DIVISOR = 1e4  # ... and ends at that / 1e4.


def learning_rate_schedule(section):
    """Adam's learning rate for [train]: a float, or one of Keras' own (serialisable) schedules.

    All three warm up linearly over warmup_steps (from 0, or for one_cycle from
    learning_rate / 25) to learning_rate; then constant stays there, cosine decays to 0 at
    num_steps, one_cycle to learning_rate / 25 / 1e4. The section (a notebook's, say) is
    checked against configurator's rules first.
    """
    configurator.check_section("train", section, source="train options")
    return _schedule(section)


def _schedule(section):
    """learning_rate_schedule of a section that was checked already (as train's config is)."""
    import keras

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


TARGET_CALL_SECONDS = 1.0  # Length of one compiled call: Ctrl-C and SIGTERM take effect between calls.


def _cluster_failure(error):
    """The line of a collective op's error that says which worker failed, or its first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "aborted by" in line or "unhealthy" in line), lines[0] if lines else "")


class _TrainingLoop:
    """The host side of training: sizes each compiled call by time, logs progress lines, notes the stop.

    Progress lines fall on multiples of log_every, so a resumed run logs the same steps.
    """

    def __init__(self, run_steps, model, data, section, progress, writer):
        self.run_steps, self.model, self.data, self.section = run_steps, model, data, section
        self.progress, self.writer = progress, writer
        self.step = self.first_step = int(model.optimizer.iterations.numpy())
        self.history, self.stop, self.start = [], "finished", time.perf_counter()
        self.steps_per_call, self.block_loss, self.block_steps, self.calls = 1, 0.0, 0, 0

    def run(self, deferred, agree):
        """Calls until num_steps, a divergence, or a stop that any worker noted (deferred)."""
        total_steps, log_every = self.section["num_steps"], self.section["log_every"]
        while self.step < total_steps:
            # Never assigned from agree's answer: a signal noted while agree waits stays noted.
            self.steps_per_call, any_worker_stopped = agree(self.steps_per_call, deferred.interrupted)
            if any_worker_stopped:
                deferred.interrupted = True
                return
            next_log = min((self.step // log_every + 1) * log_every, total_steps)
            if not self._call(min(self.steps_per_call, next_log - self.step)):
                return
            if self.step == next_log:
                self._log()

    def _call(self, count):
        """One compiled call of count steps; False if a step diverged (self.stop says so)."""
        section = self.section
        indices = batch_indices(len(self.data["x_train"]), section["batch_size"], section["seed"], self.step, count)
        call_start = time.perf_counter()
        loss_sum, done, bad_loss = self.run_steps(indices)
        call_seconds, done, self.calls = time.perf_counter() - call_start, int(done), self.calls + 1
        self.step, self.block_loss, self.block_steps = (self.step + done, self.block_loss + float(loss_sum),
                                                        self.block_steps + done)
        if done < count:
            bad_loss = float(bad_loss)
            self.stop = (f"diverged at step {self.step + 1} "
                         + (f"(loss {bad_loss})" if not math.isfinite(bad_loss) else
                            f"(loss {bad_loss:.4g} but gradients not finite)"))
            return False
        if self.calls > 1:  # The first call also traces the function; size the next call by time.
            self.steps_per_call = max(1, min(section["log_every"], int(TARGET_CALL_SECONDS * count / call_seconds)))
        return True

    def _log(self):
        """A progress line at self.step: its record in the history, the console and TensorBoard."""
        batch_size, total_steps, step = self.section["batch_size"], self.section["num_steps"], self.step
        seconds = time.perf_counter() - self.start
        record = {"step": step, "loss": self.block_loss / self.block_steps, "seconds": seconds,
                  "val_accuracy": accuracy(self.model, self.data.get("x_val", []), self.data.get("y_val", []))}
        self.history.append(record)
        self.block_loss, self.block_steps = 0.0, 0
        examples_per_second = (step - self.first_step) * batch_size / seconds
        eta = (total_steps - step) * batch_size / examples_per_second
        validation = "" if record["val_accuracy"] is None else f"  val acc {record['val_accuracy']:.2%}"
        self.progress(f"step {step}/{total_steps}  loss {record['loss']:.4f}{validation}  "
                      f"{examples_per_second:.0f} ex/s  eta {common.format_seconds(eta)}")
        common.write_scalars(self.writer, step, {
            "train/loss": record["loss"], "train/val_accuracy": record["val_accuracy"],
            "train/learning_rate": float(np.asarray(self.model.optimizer.learning_rate.numpy())),
            "train/examples_per_second": examples_per_second})

    def finish(self, interrupted):
        """(history, stop reason) once the loop ended, the steps since the last line recorded."""
        if interrupted and not self.stop.startswith("stopped"):
            self.stop = "interrupted"
        if self.stop == "interrupted" or self.stop.startswith("stopped"):
            # The call under way ran to its end, or failed at an all-reduce, which every update
            # follows: either way the weights are those of a whole step, this one.
            self.step = int(self.model.optimizer.iterations.numpy())
            self.progress(f"{self.stop} at step {self.step}")
        if self.block_steps and self.step > (self.history[-1]["step"] if self.history else self.first_step):
            # The steps since the last progress line, without a validation pass (stopping should be quick).
            self.history.append({"step": self.step, "loss": self.block_loss / self.block_steps,
                                 "seconds": time.perf_counter() - self.start, "val_accuracy": None})
        if self.stop.startswith("diverged"):
            self.progress(f"stopped: training {self.stop}; the model keeps the weights of step {self.step}")
        return self.history, self.stop


def _run_blocks(run_steps, model, data, section, progress, writer=None, agree=None):
    """Train to section['num_steps'] in calls of about TARGET_CALL_SECONDS; log every log_every steps.

    Each progress line's numbers also go to writer (TensorBoard), if one is given. agree
    (distributed.make_agreement) makes every worker of a cluster run calls of the same
    length and stop at the same step.

    Returns (history, stop_reason) with stop_reason 'finished', 'interrupted',
    'diverged at step N (loss nan)' or 'stopped: a worker of the cluster failed (...)'.
    """
    import tensorflow as tf

    loop = _TrainingLoop(run_steps, model, data, section, progress, writer)
    # A first Ctrl-C or SIGTERM is noted and honoured between calls (within about a second),
    # never raised inside TensorFlow's own Python code, which it can leave broken (a SIGTERM
    # there once crashed the process at exit, exit code -11). A second one raises at once.
    deferred = common.InterruptsDeferred("interrupted: stopping after the call under way (again to stop now)")
    try:
        with deferred:
            loop.run(deferred, agree or (lambda steps, stop: (steps, stop)))
    except KeyboardInterrupt:
        deferred.interrupted = True
    except tf.errors.UnavailableError as error:  # Only collective ops raise it: a cluster's worker is gone.
        loop.stop = f"stopped: a worker of the cluster failed ({_cluster_failure(error)})"
    return loop.finish(deferred.interrupted)


def train(data, config=None, model=None, progress=print, writer=None, strategy=None, extra_term=None):
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
    train.mixed_precision_force (cnn.check_precision_speed).

    extra_term (an ExtraTerm) adds a defence's loss on an extra batch to every step.

    metrics: steps (the optimizer's step count), seconds, examples and examples_per_second
    (this call), interrupted, diverged, stop_reason, test_accuracy (None if not measured),
    history (one record per log_every steps: step, loss, seconds, val_accuracy).
    """
    config, strategy = prepare(config, strategy)
    return train_prepared(data, config, model, progress, writer, strategy, extra_term)


def train_prepared(data, config, model=None, progress=print, writer=None, strategy=None, extra_term=None):
    """train() with a config and strategy that prepare() made: nothing checked or resolved again."""
    section = config["train"]
    # The precision the model computes in (a resumed model goes on in its own) must be fast here.
    cnn.check_precision_speed(section["mixed_precision"] if model is None else cnn.precision_of(model),
                              section["mixed_precision_force"])
    # Variables are made in the strategy's scope (mirrored); the loop runs outside it, where
    # Keras' optimizer updates every replica's copy with the gradients summed over replicas.
    with distributed.scope(strategy):
        model = model_to_train(model, config, data)
    images, targets = data["x_train"], to_targets(data["y_train"], model.output_shape[-1])
    if tuple(images.shape[1:]) != tuple(model.input_shape[1:]):
        raise UserError(f"training images of shape {images.shape[1:]} do not fit the model's input "
                        f"{model.input_shape[1:]}; set model.image_dim_size to match the data")
    xla = distributed.use_xla(section["xla"])
    with cnn.batch_norm_frozen(model, extra_term is not None and extra_term.frozen_batch_norm):
        run_steps = make_train_function(model, images, targets, section["label_smoothing"],
                                        section["shift_pixels"], section["seed"], strategy=strategy, xla=xla,
                                        flip=section["flip"], extra_term=extra_term)
        first_step, start = int(model.optimizer.iterations.numpy()), time.perf_counter()
        history, stop = _run_blocks(run_steps, model, data, section, progress, writer,
                                    distributed.make_agreement(strategy))
    metrics = _run_metrics(model, section, first_step, time.perf_counter() - start, history, stop, strategy, xla)
    metrics["data"] = data.get("provenance")
    if "x_test" in data and stop != "interrupted":
        try:
            metrics["test_accuracy"] = accuracy(model, data["x_test"], data["y_test"])
        except KeyboardInterrupt:  # Ctrl-C during the final evaluation still keeps the model.
            metrics["interrupted"], metrics["stop_reason"] = True, "interrupted"
            progress("interrupted during the test evaluation; keeping the model")
    return model, metrics


def prepare(config, strategy=None):
    """(config, strategy) for train_prepared: a partial config filled in and checked, the strategy made
    (train.distribute) and the batch checked against it, "auto" precision resolved, the seed set.
    The one place where train's config is checked; a command calls it once, then train_prepared."""
    import keras

    config = configurator.complete_config(config)
    section = config["train"]
    if strategy is None and section["distribute"] != "none":
        strategy = distributed.make_strategy(section["distribute"])
    distributed.check_batch_split(section["batch_size"], strategy)
    section["mixed_precision"] = cnn.resolve_precision(section["mixed_precision"])
    keras.utils.set_random_seed(section["seed"])
    return config, strategy


def model_to_train(model, config, data):
    """The given model, or a new one of config's topology in its precision; with an optimizer either way.

    train makes it; a command whose extra term needs the model (a defence's) makes it first."""
    if model is None:
        cnn.check_topology_fits_data(config["model"], data)
        with cnn.precision_policy(config["train"]["mixed_precision"]):
            model = cnn.build_model(config["model"])
    if getattr(model, "optimizer", None) is None:
        compile_for_training(model, _schedule(config["train"]))
    return model


def _run_metrics(model, section, first_step, seconds, history, stop, strategy, xla):
    """train's metrics of this call (the test accuracy and the data's provenance are added by train)."""
    steps = int(model.optimizer.iterations.numpy())
    examples = (steps - first_step) * section["batch_size"]
    return {"steps": steps, "seconds": seconds, "examples": examples,
            "examples_per_second": examples / seconds if seconds else 0.0,
            "interrupted": stop == "interrupted", "diverged": stop.startswith("diverged"),
            "worker_failed": stop.startswith("stopped: a worker"),
            "stop_reason": stop, "test_accuracy": None, "history": history, "data": None,
            # What the run actually used: train.xla "auto" resolved, the replicas of train.distribute.
            "replicas": distributed.replica_count(strategy), "xla": xla,
            "mixed_precision": cnn.precision_of(model)}


def weights_are_finite(model):
    return all(np.all(np.isfinite(weights)) for weights in model.get_weights())
