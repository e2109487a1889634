"""The backwork loop, in two halves: the compiled side (BackworkSteps) and the host side (Backworker).

All requested labels are optimised in one batch: the batch holds num_examples images per
label, label after label (group g is rows g*n to (g+1)*n), and its cost is the sum over
labels of each label's cost (backwork_cost.grouped_cost), so each image's gradient is
the one a run of its label alone gives. With the same seed, a label's images are the
same (up to float rounding, as the batch size differs) whether it runs alone or with others.

BackworkSteps holds the tensors: the pixels and their Adam state (PixelAdam), each
image's nearest references, which labels are active, steps_to_reach and divergence. Its
run_steps is one compiled call of many steps; its find_nearest the compiled search.

Backworker drives it from the host: each label's training activations (LabelState),
blocks of save_freq steps, the nearest-reference search every nearest_every steps (and
at once for a label whose images were re-initialised), records, stopping,
re-initialisation, and the results dict of each label as it stops (LabelState.results).
This module is the one owner of a backwork label's results: the dict, its file's name
(label_results_path: results_{label}.pkl) and the reader of a folder of them
(load_label_results); common.py's results format checks and stores any results dict. A label that stops
is frozen and leaves the batch while the others go on.

Re-initialisation: an image that starts far from its label (p near 0, where the
probability term has no gradient) does not move towards it, and is restarted once its
probability fell at num_mono_dec_saves records in a row.

steps_to_reach[i] is the first step (counted from the start of the label's run, checked
after every step inside the compiled loop) at which image i's label probability was at
least prob_cap_min; it is reset to -1 when the image is re-initialised and is -1 if the
image never reached the cap since. seconds is the wall time from the start of the run
(all its labels' training activations included) until that label stopped.

A cost or image that stops being finite stops its label at once; the other labels go on,
then the run ends with a UserError naming the label and step.
"""
import concurrent.futures
import time
from pathlib import Path

import numpy as np

import backwork_cost
import cnn
import common
import configurator
import results_format
from common import UserError

# ----------------------------------------------------------------------- the pixels


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


# ------------------------------------------------------------------ the compiled side


class BackworkSteps:
    """The tensors of a batch of num_labels labels and the compiled calls that move them; traced once.

    Each label keeps its own nearest references, step count (all start at 0) and stopping;
    only the active labels' images go through the network.
    """

    def __init__(self, model, options, num_labels):
        import tensorflow as tf

        self.model, self.options, self.num_labels = model, options, num_labels
        # The same network, its first convolution's input gradient taken faster (a fifth of a step).
        self.features_model = cnn.input_gradient_model(backwork_cost.feature_model(model))
        self.cost_layers = backwork_cost.cost_layer_names(model)
        self.coefficients = backwork_cost.layer_coefficients(options, len(self.cost_layers))
        self.count, image_shape = options["num_examples"], tuple(model.input_shape[1:])
        total = num_labels * self.count
        self.optimizer = PixelAdam(np.zeros((total, *image_shape), np.float32), options["learning_rate"])
        self.sizes = sizes = [int(np.prod(image_shape))] + [
            int(np.prod(model.get_layer(name).output.shape[1:])) for name in self.cost_layers[1:]]
        # Per image: its nearest reference at every cost layer, kept between searches.
        self.nearest = [tf.Variable(tf.zeros((total, size))) for size in sizes]
        self.active = tf.Variable(tf.zeros(num_labels, tf.bool))  # Per label: still optimising.
        self.first_reached = tf.Variable(tf.fill([total], -1))  # Per image: steps_to_reach.
        self.diverged_at = tf.Variable(tf.fill([num_labels], -1))  # Per label: first non-finite step.
        signature = [tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32), tf.TensorSpec([num_labels], tf.int32)]
        self.run_steps = tf.function(self._run_steps, input_signature=signature)
        image_spec = tf.TensorSpec([None, *image_shape], tf.float32)
        self.compiled_features = tf.function(lambda images: backwork_cost.flat_features(self.features_model, images),
                                             input_signature=[image_spec])
        # References of any count (R): one trace serves every label.
        reference_spec = [(tf.TensorSpec([None, size], tf.float32), tf.TensorSpec([None], tf.float32))
                          for size in sizes]
        self.find_nearest = tf.function(self._find_nearest, input_signature=[image_spec, reference_spec])

    def rows(self, group):
        """The batch rows of label group's images."""
        return slice(group * self.count, (group + 1) * self.count)

    def compile(self, labels):
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

    def start(self, images):
        """Every image set to images (N, H, W, C) with fresh Adam state; every label active, nothing reached."""
        import tensorflow as tf

        self.optimizer.reset(np.arange(self.num_labels * self.count), images)
        for variable, value in [(self.active, True), (self.first_reached, -1), (self.diverged_at, -1)]:
            variable.assign(tf.fill(variable.shape, value))

    def search(self, group, references):
        """Store the nearest of label group's references to each of its images, at every cost layer."""
        rows = self.rows(group)
        for variable, nearest in zip(self.nearest, self.find_nearest(self.optimizer.images[rows], references)):
            variable[rows].assign(nearest)

    def freeze(self, group):
        """Label group stops: its images stay as they are."""
        import tensorflow as tf

        self.active.assign(tf.tensor_scatter_nd_update(self.active, [[group]], [False]))

    def restart(self, indices, images):
        """Images at indices start again from images, with fresh Adam state and no step reached."""
        import tensorflow as tf

        self.optimizer.reset(indices, images)
        self.first_reached.scatter_nd_update(indices[:, None], tf.fill([len(indices)], -1))

    # -- inside the compiled loop

    def _find_nearest(self, images, references):
        """The nearest of one label's references to each of its images, at every cost layer: [(n, D)]."""
        import tensorflow as tf

        flat, _ = backwork_cost.flat_features(self.features_model, images)
        return [tf.gather(layer_references, tf.argmin(backwork_cost.squared_distances(rows, layer_references, norms), axis=1))
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
            flat, logits = backwork_cost.flat_features(self.features_model, images)
            active_costs, probabilities = backwork_cost.grouped_cost(
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
        logits = backwork_cost.flat_features(self.features_model, tf.gather(self.optimizer.images, moving))[1]
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


# ---------------------------------------------------------------------- the host side


def check_options(options):
    """Refuse a [backwork] section (a notebook's, say) with a value outside configurator.VALUE_RULES."""
    configurator.check_section("backwork", options, source="backwork options")


class Backworker:
    """Backworks num_labels labels of one model together: labels, blocks, re-initialisation, results.

    The tensors and compiled calls are self.steps' (BackworkSteps), traced once.
    """

    def __init__(self, model, options, num_labels=1, reference_cache=None):
        """reference_cache, a dict, keeps each label's training activations for the next
        Backworker of the same model (the attack suite runs several): they depend only on
        the model and the training images, and computing them is a large part of a run.
        options is a checked [backwork] section (backwork_label and get_faulty_input_layer check theirs)."""
        if num_labels < 1:
            raise UserError("backwork needs at least one label; choose some with --labels")
        self.model, self.options, self.num_labels = model, options, num_labels
        self.count = options["num_examples"]
        self.reference_cache = {} if reference_cache is None else reference_cache
        self.steps = BackworkSteps(model, options, num_labels)

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

        self.start, self.results, self.failures = time.perf_counter(), {}, []
        self.progress, self.on_label, self.on_record = progress, on_label, on_record
        labels = tf.constant(list(images_by_label), tf.int32)
        states = self._label_states(images_by_label, labels, deferred)
        progress(f"training activations of {len(states)} labels in {time.perf_counter() - self.start:.1f} s")
        self.steps.start(np.concatenate([state.next_images(self.count) for state in states]))
        step, max_steps = 0, self.options["max_num_steps"]
        while step < max_steps and np.any(self.steps.active.numpy()):
            block_end = min(step + self.options["save_freq"], max_steps)
            costs, probabilities, step = self._run_block(step, block_end, labels, states)
            self._after_block(step, costs, probabilities, states)
            _stop_if(deferred)
        for group, state in enumerate(states):  # Labels cut off by max_num_steps with others.
            if not state.done:
                self._finish(group, state, step)
        if self.failures:
            raise UserError("; ".join(self.failures))
        return self.results

    def _label_states(self, images_by_label, labels, deferred):
        """Each label's LabelState (its training activations), while a second thread traces the compiled calls."""
        import tensorflow as tf

        self.steps.active.assign(tf.zeros_like(self.steps.active))  # So that compiling runs no step.
        self.steps.compiled_features.get_concrete_function()  # Traced here: one thread traces the model at a time.
        states = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            compiled = pool.submit(self.steps.compile, labels)
            for label, label_images in images_by_label.items():
                _stop_if(deferred)
                states.append(LabelState(label, label_images, self, self.options))
            compiled.result()
        return states

    def _after_block(self, step, costs, probabilities, states):
        """Each active label's record at step: divergence, progress, stopping or re-initialisation."""
        images, diverged_at = self.steps.optimizer.images.numpy(), self.steps.diverged_at.numpy()
        for group, state in enumerate(states):
            rows = self.steps.rows(group)
            if state.done:
                continue
            if diverged_at[group] >= 0:
                state.done = True
                self.failures.append(diverged_message(state.label, diverged_at[group], costs[:, group], self.options))
                self.progress(self.failures[-1])
                continue
            state.record(step, costs[:, group], probabilities[rows], images[rows], self.progress)
            if self.on_record is not None:
                self.on_record(state.label, step, float(costs[-1, group]), probabilities[rows])
            if state.should_stop(step) or step >= self.options["max_num_steps"]:
                self._finish(group, state, step)
            else:
                self._reinitialise_stuck(group, state)

    def _run_block(self, step, block_end, labels, states):
        """Steps up to block_end, searching each label's nearest references when due.

        A label's search is due every nearest_every steps and at once after its images
        were re-initialised; between searches the compiled loop runs without stopping.
        Returns the costs (steps, L), the probabilities after the block (N,) and block_end.
        """
        every, costs = self.options["nearest_every"], []
        while step < block_end:
            active = self.steps.active.numpy()
            for group, state in enumerate(states):
                if active[group] and (state.search_due or step % every == 0):
                    self.steps.search(group, state.references)
                    state.search_due = False
            chunk_end = min(block_end, (step // every + 1) * every)
            chunk_costs, probabilities = self.steps.run_steps(chunk_end - step, step, labels)
            costs.append(chunk_costs.numpy())
            step = chunk_end
        return np.concatenate(costs), probabilities.numpy(), step

    def _finish(self, group, state, step):
        """Label group stops: frozen, its results dict made and handed to on_label."""
        state.done = True
        self.steps.freeze(group)
        rows = self.steps.rows(group)
        self.results[state.label] = state.results(self.steps.optimizer.images.numpy()[rows],
                                                  self.steps.first_reached.numpy()[rows], step,
                                                  time.perf_counter() - self.start, self.steps)
        if self.on_label is not None:
            self.on_label(state.label, self.results[state.label])

    def _reinitialise_stuck(self, group, state):
        """The original's escape from local minima: restart images that keep losing the label."""
        stuck = state.stuck()
        if not len(stuck):
            return
        self.steps.restart(group * self.count + stuck, state.next_images(len(stuck)))
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
            backworker.reference_cache[key] = backwork_cost.reference_features(
                backworker.steps.features_model, label_images, options["max_reference_examples"], seed,
                compiled=backworker.steps.compiled_features)
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

    def results(self, images, first_reached, step, seconds, steps):
        """The label's results dict (the results format's "backwork" kind) once it stopped; steps: BackworkSteps."""
        worst_images, worst_probabilities = backwork_cost.worst_classified(self.reference_images, self.training_logits,
                                                                           self.label)
        return {
            "format_version": results_format.RESULTS_FORMAT_VERSION,
            "label": self.label,
            "images": _drop_single_channel(images),
            "probs": np.asarray(steps.model(images, training=False), np.float32),
            "history": self.history,
            "steps": int(step),
            "steps_to_reach": first_reached.astype(np.int64),
            "seconds": seconds,
            "reinitialised": int(self.reinitialised),
            "nearest_training_distance": backwork_cost.nearest_distances(images, self.label_images),
            "worst_training_images": _drop_single_channel(worst_images),
            "worst_training_probs": worst_probabilities,
            "layer_cost_coeffs": steps.coefficients,
            "cost_layers": steps.cost_layers,
            "options": dict(self.options),
        }


def diverged_message(label, step, costs, options):
    bad = [cost for cost in costs if not np.isfinite(cost)]
    value = f"cost {bad[0]}" if bad else "images not finite"
    return (f"backwork of label {label} diverged at step {step} ({value}); lower backwork.learning_rate "
            f"(now {options['learning_rate']}) or check that the model's weights are finite")


def _drop_single_channel(images):
    """Grey images are saved as (N, H, W), as the original results were."""
    return images[..., 0] if images.shape[-1] == 1 else images


def _should_stop(costs, probabilities, options):
    reached = probabilities.mean() >= options["prob_cap_mean"] and probabilities.min() >= options["prob_cap_min"]
    settled = len(costs) > 1 and abs(costs[-1] - costs[-2]) < options["tolerance"]
    return reached or settled


def backwork_label(model, label_images, label, options, progress=print):
    """Optimise options['num_examples'] images towards label; return the results dict.

    One label alone: the reference the tests compare a batch of labels with.
    """
    check_options(options)
    return Backworker(model, options).run({label: label_images}, progress)[label]


# ------------------------------------------------------------- the results files of labels




def get_faulty_input_layer(data, model_options=None, model="runs/default/model.keras", labels=None,
                           progress=print, on_label=None, on_record=None, reference_cache=None):
    """Backwork every label in labels (default: all), all in one batch, and return {label: results}.

    data is a dict as from datasets.load_dataset; model_options a config dict whose
    'backwork' section overrides the defaults; model a Keras model or the path of one.
    on_label(label, results) is called as each label stops (the script saves there), and
    on_record(label, step, cost, probabilities) at each record (the script logs there);
    reference_cache as Backworker's. The one entry that checks its options (a notebook's);
    the scripts pass a checked config's section to backwork_labels.
    """
    options = configurator.merge_config(configurator.default_config(), model_options or {}, "model_options")["backwork"]
    return backwork_labels(data, options, model, labels, progress, on_label, on_record, reference_cache)


def backwork_labels(data, options, model, labels=None, progress=print, on_label=None, on_record=None,
                    reference_cache=None):
    """get_faulty_input_layer with options, a [backwork] section that was checked already."""
    model_path = str(model) if isinstance(model, (str, Path)) else model.name
    if isinstance(model, (str, Path)):
        model = cnn.load_trained_model(model, data["x_train"])
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
    return Backworker(model, options, len(labels), reference_cache).run(
        images_by_label, progress, finished, on_record)
