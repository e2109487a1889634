"""Gradient attacks inside a box around each point, compiled: PGD and APGD with three objectives.

Issue 23's two threat models are one abstraction here. Every attack takes, per point, a
lower and an upper image (the images' shape) and never leaves [lower, upper]:
- the whole box, any image in [0, 1] (the unbounded question the project started from):
  whole_box(images);
- the l-infinity ball of radius eps around each point, inside [0, 1] (the certifiable one,
  eps = 0.3 on MNIST in ACET and GOOD): ball(images, eps).

The objectives (objective_values) are computed from the logits, per image, and raised:
- "cross_entropy": log p(target), the full softmax (a "none" output included);
- "max_confidence": log of the largest class probability over the first num_classes
  outputs, the objective ACET and GOOD are attacked with: a model's extra "none" output
  is not a class, but it stays in the softmax;
- "margin": z_target - max over j != target of z_j (a "none" output included), clamped at
  kappa so that a target leading by kappa is pushed no further (p >= 0.999 needs about 9).
An attack's confidence is the objective's class probability: p(target) for the two
targeted objectives, the largest class probability for max_confidence.

The attacks:
- pgd: x <- P(x + step_size * sign(gradient)), P the clip into the box, from the given
  images (or a random point of the box): the rule of ART's ProjectedGradientDescent,
  which the tests check step for step.
- apgd: Croce and Hein's APGD (ICML 2020, "Reliable evaluation of adversarial robustness
  with an ensemble of diverse parameter-free attacks"): the same sign step with momentum
  0.75, its step size halved per image at checkpoints (apgd_checkpoints, should_halve),
  restarts from random points of the box.

Both run one loop (AttackSteps): the whole batch in one tf.function call per block of
steps, one forward and one backward pass per step; per image the best point seen (the
highest objective), its objective and confidence. An image whose confidence reaches cap is
frozen at that point and leaves the batch; its steps_to_cap is the number of steps it had
made (0: the start itself; restarts count on from the previous ones' steps). A restart
runs only the images that have not reached the cap and keeps, per image, the best point
over all runs. Logits or gradients that are not finite stop the attack with ModelNotFinite:
a NaN model has no result.
"""
import math
import weakref

import numpy as np

import cnn
import interval_bounds
from common import UserError

OBJECTIVES = ("cross_entropy", "max_confidence", "margin")
TARGETED_OBJECTIVES = ("cross_entropy", "margin")
MARGIN_KAPPA = 20.0  # backwork's margin_kappa: "margin" stops pushing once the target leads by this.
BLOCK_STEPS = 50  # Steps per compiled call; between calls the host only checks whether any image still moves.

# APGD's constants, as Croce and Hein chose them (and the AutoAttack code keeps them).
APGD_MOMENTUM = 0.75  # alpha: the weight of the new step against the previous move.
APGD_RHO = 0.75  # Condition 1 halves unless at least this fraction of the steps raised the objective.
# Checkpoint fractions in hundredths (exact, so that 0.41 * 100 is 41, not 41.000000000000007):
# p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06).
FIRST_CHECKPOINT, CHECKPOINT_SHRINK, MIN_CHECKPOINT_GAP = 22, 3, 6


class ModelNotFinite(RuntimeError):
    """The model gave logits or input gradients that are not finite: the attack has no result."""


# ----------------------------------------------------------------------------- boxes


def whole_box(images):
    """The unbounded threat model: every image of [0, 1], as (lower, upper) of the images' shape."""
    images = np.asarray(images, np.float32)
    return np.zeros_like(images), np.ones_like(images)


def ball(images, eps):
    """The l-infinity ball of radius eps around each image, inside [0, 1]: (lower, upper)."""
    eps = interval_bounds.check_radius(eps)  # One rule for a radius, here and in the certified bounds.
    images = np.asarray(images, np.float32)
    return np.clip(images - eps, 0.0, 1.0), np.clip(images + eps, 0.0, 1.0)


def random_points(lower, upper, rng):
    """A uniformly random point of each box: (N, H, W, C) float32."""
    return (lower + rng.random(lower.shape, dtype=np.float32) * (upper - lower)).astype(np.float32)


def box_widths(lower, upper):
    """Each box's widest pixel range (N,): APGD's first step size.

    Croce and Hein start at 2 eps, the width of the ball. The same rule for any box is its
    width: 2 eps for the ball (wherever one pixel lies at least eps from 0 and from 1, as in
    any noise image; an all-black start gets eps), and 1 for the whole box, which is the ball
    of radius 0.5 around the grey image 0.5, so 2 x 0.5.
    """
    return (upper - lower).reshape(len(lower), -1).max(axis=1).astype(np.float32)


# ------------------------------------------------------------------------ objectives


def objective_values(logits, targets, objective, num_classes=None, kappa=MARGIN_KAPPA):
    """Each image's objective (N,), to raise, and confidence (N,) from its logits (N, outputs).

    targets (N,) int are the target classes (ignored by max_confidence); num_classes counts
    the outputs that are classes (the first ones; None: all).
    """
    import tensorflow as tf

    log_probabilities = tf.nn.log_softmax(logits)  # (N, outputs), stable however far apart the logits
    if objective == "max_confidence":
        values = tf.reduce_max(log_probabilities[:, :num_classes], axis=1)
        return values, tf.exp(values)
    target_log_probabilities = tf.gather(log_probabilities, targets, batch_dims=1)
    if objective == "cross_entropy":
        return target_log_probabilities, tf.exp(target_log_probabilities)
    target_logits = tf.gather(logits, targets, batch_dims=1)
    others = tf.where(tf.one_hot(targets, tf.shape(logits)[1]) > 0, tf.constant(-np.inf, logits.dtype), logits)
    values = tf.minimum(target_logits - tf.reduce_max(others, axis=1), kappa)
    return values, tf.exp(target_log_probabilities)


# ------------------------------------------------------------------ APGD's step size


def apgd_checkpoints(steps):
    """APGD's checkpoints w_j = ceil(p_j * steps) for the p_j <= 1, without repeats: [0, 22, 41, ...].

    The AutoAttack code computes the same gaps in whole steps (int(0.22 n), less int(0.03 n)
    each time, at least int(0.06 n)); for 100 or 1000 steps both agree, for a few dozen
    they differ by a step or two. This is the paper's rule.
    """
    fractions, previous = [0, FIRST_CHECKPOINT], 0
    while True:
        gap = max(fractions[-1] - previous - CHECKPOINT_SHRINK, MIN_CHECKPOINT_GAP)
        if fractions[-1] + gap > 100:
            break
        previous = fractions[-1]
        fractions.append(fractions[-1] + gap)
    return sorted({-(-fraction * steps // 100) for fraction in fractions})  # Integer ceilings.


def checkpoint_intervals(steps):
    """(steps + 1,) int32: at each checkpoint w_j (j >= 1) the steps since w_{j-1}, elsewhere 0."""
    checkpoints = apgd_checkpoints(steps)
    intervals = np.zeros(steps + 1, np.int32)
    for previous, checkpoint in zip(checkpoints, checkpoints[1:]):
        intervals[checkpoint] = checkpoint - previous
    return intervals


def should_halve(increases, interval, halved_last, best_unchanged, rho=APGD_RHO):
    """APGD's test at a checkpoint, per image: halve the step size (and go back to the best point)?

    Condition 1: fewer than rho * interval of the interval's steps raised the objective
    (increases of interval). Condition 2: the step size was not halved at the last
    checkpoint and the best objective has not risen since. Works on NumPy arrays and on
    tensors alike (increases and interval as floats). This follows the paper where the
    AutoAttack code differs: the code halves also at exactly rho * interval rises, and never
    applies condition 2 at the first checkpoint (the paper's may hold there: the step size is
    unchanged since w_0 = 0).
    """
    return (increases < rho * interval) | (~halved_last & best_unchanged)


# ------------------------------------------------------------------ the compiled side

# The per-image state AttackSteps reads but never changes during a run (start sets it).
READ_ONLY = ("lower", "upper", "targets")


class AttackSteps:
    """A batch's state (tf.Variables) and the compiled block of steps that moves it; traced once.

    Works on the model's float32 logits. With depthwise_gradient the first convolution's input
    gradient is taken as one depthwise convolution (cnn.input_gradient_model): the same
    gradient up to float rounding, and faster on a CPU.
    """

    def __init__(self, model, objective, batch_size, num_classes=None, kappa=MARGIN_KAPPA, depthwise_gradient=True):
        import tensorflow as tf

        model = cnn.float32_model(model)
        logits = cnn.logits_model(model)
        self.network = cnn.input_gradient_model(logits) if depthwise_gradient else logits
        self.model_name, self.batch_size = model.name, batch_size
        self.objective, self.num_classes, self.kappa = objective, num_classes, kappa
        image_shape = (batch_size, *model.input_shape[1:])
        images, vector = tf.zeros(image_shape), tf.zeros([batch_size])
        # previous: the point before (APGD's momentum); best_gradient: the gradient at the best point, where a
        # halving image goes back to; last_objective: the last point's, against which condition 1 counts rises;
        # best_at_checkpoint and halved_last: condition 2's memory of the last checkpoint.
        self.state = {name: tf.Variable(images) for name in ("lower", "upper", "images", "previous", "best_images",
                                                             "best_gradient")}
        self.state.update({name: tf.Variable(vector) for name in ("best_objective", "best_confidence",
                                                                  "last_objective", "best_at_checkpoint",
                                                                  "step_size")})
        self.state.update({name: tf.Variable(tf.zeros([batch_size], tf.int32))
                           for name in ("targets", "increases", "steps_to_cap")})
        self.state.update({name: tf.Variable(tf.zeros([batch_size], tf.bool)) for name in ("halved_last", "active")})
        self.momentum, self.rho, self.cap = tf.Variable(1.0), tf.Variable(APGD_RHO), tf.Variable(2.0)
        self.intervals = tf.Variable(tf.zeros([1], tf.int32), shape=tf.TensorShape([None]))
        self.diverged_at = tf.Variable(-1)
        scalar = tf.TensorSpec([], tf.int32)
        self.run_block = tf.function(self._run_block, input_signature=[scalar, scalar])
        self.finish = tf.function(self._finish, input_signature=[scalar])

    def start(self, images, lower, upper, targets, step_sizes, active, schedule, cap):
        """A fresh run from images (N, H, W, C) of the images where active (N,) bool.

        schedule is (momentum, rho, intervals): 1, any, zeros for PGD; cap None never freezes.
        """
        momentum, rho, intervals = schedule
        infinity = np.full(self.batch_size, np.inf, np.float32)
        values = {"lower": lower, "upper": upper, "images": images, "previous": images, "best_images": images,
                  "best_gradient": np.zeros_like(images), "best_objective": -infinity,
                  "best_confidence": np.zeros_like(infinity), "last_objective": infinity,
                  "best_at_checkpoint": -infinity, "step_size": step_sizes, "targets": targets,
                  "increases": np.zeros(self.batch_size, np.int32), "steps_to_cap": np.full(self.batch_size, -1),
                  "halved_last": np.zeros(self.batch_size, bool), "active": active}
        for name, value in values.items():
            self.state[name].assign(np.asarray(value, self.state[name].dtype.as_numpy_dtype))
        self.momentum.assign(momentum)
        self.rho.assign(rho)
        self.intervals.assign(np.asarray(intervals, np.int32))
        self.cap.assign(2.0 if cap is None else cap)  # A probability never reaches 2.
        self.diverged_at.assign(-1)

    def run(self, steps, attack):
        """steps steps of the images still active, then the last point's objective; raises ModelNotFinite."""
        done = 0
        while done < steps and self.state["active"].numpy().any():
            chunk = min(BLOCK_STEPS, steps - done)
            self.run_block(chunk, done)
            done += chunk
            self._raise_if_diverged(attack)
        self.finish(steps)
        self._raise_if_diverged(attack)

    def result(self):
        """The run's best point per image: {images, objective, confidence, steps_to_cap} as NumPy."""
        return {"images": self.state["best_images"].numpy(), "objective": self.state["best_objective"].numpy(),
                "confidence": self.state["best_confidence"].numpy(),
                "steps_to_cap": self.state["steps_to_cap"].numpy().astype(np.int64)}

    def _raise_if_diverged(self, attack):
        step = int(self.diverged_at.numpy())
        if step >= 0:
            raise ModelNotFinite(f"model {self.model_name!r} gave logits or input gradients that are not finite at "
                                 f"step {step} of {attack}; check that its weights are finite (no result is returned)")

    # -- inside the compiled calls

    def _run_block(self, num_steps, first_step):
        import tensorflow as tf

        for index in tf.range(num_steps):
            # A batch of none would fail in the convolutions; a diverged run stops at once.
            if tf.reduce_any(self.state["active"]) and self.diverged_at < 0:
                self._step(first_step + index)

    def _gather(self):
        """The active images' rows (M,) and their state {name: (M, ...)}."""
        import tensorflow as tf

        moving = tf.where(self.state["active"])[:, 0]
        return moving, {name: tf.gather(variable, moving) for name, variable in self.state.items()}

    def _store(self, moving, state):
        for name, variable in self.state.items():
            if name not in READ_ONLY:
                variable.scatter_nd_update(moving[:, None], state[name])

    def _step(self, step):
        """One step of the active images: one forward and one backward pass, best point, cap, checkpoint, move."""
        import tensorflow as tf

        moving, state = self._gather()
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(state["images"])
            logits = self.network(state["images"], training=False)
            values, confidence = objective_values(logits, state["targets"], self.objective, self.num_classes,
                                                  self.kappa)
            total = tf.reduce_sum(values)
        gradient = tape.gradient(total, state["images"])
        if tf.reduce_all(tf.math.is_finite(logits)) and tf.reduce_all(tf.math.is_finite(gradient)):
            self._update(moving, state, step, values, confidence, gradient)
        else:
            self.diverged_at.assign(step)

    def _update(self, moving, state, step, values, confidence, gradient):
        state = self._record(state, step, values, confidence, gradient)
        state, gradient = self._checkpoint(state, step, gradient)
        self._store(moving, self._move(state, gradient, step))

    def _finish(self, step):
        """The objective of the last point of the images still active (a forward pass only)."""
        import tensorflow as tf

        if tf.reduce_any(self.state["active"]) and self.diverged_at < 0:
            moving, state = self._gather()
            logits = self.network(state["images"], training=False)
            values, confidence = objective_values(logits, state["targets"], self.objective, self.num_classes,
                                                  self.kappa)
            if tf.reduce_all(tf.math.is_finite(logits)):
                self._store(moving, self._record(state, step, values, confidence))
            else:
                self.diverged_at.assign(step)

    def _record(self, state, step, values, confidence, gradient=None):
        """Best point, objective rises and the cap, for the point each image is at (after step steps)."""
        import tensorflow as tf

        reached = confidence >= self.cap
        # A point that reaches the cap is where the image stops, whatever the objective did before.
        improved = (values > state["best_objective"]) | reached
        pixels = improved[:, None, None, None]
        state = {**state, "best_images": tf.where(pixels, state["images"], state["best_images"]),
                 "best_objective": tf.where(improved, values, state["best_objective"]),
                 "best_confidence": tf.where(improved, confidence, state["best_confidence"]),
                 "increases": state["increases"] + tf.cast(values > state["last_objective"], tf.int32),
                 "last_objective": values,
                 "steps_to_cap": tf.where(reached, step, state["steps_to_cap"]), "active": ~reached}
        if gradient is not None:
            state["best_gradient"] = tf.where(pixels, gradient, state["best_gradient"])
        return state

    def _checkpoint(self, state, step, gradient):
        """At an APGD checkpoint, halve the step size of the images should_halve picks and send them back
        to their best point (with its gradient). Step 0 is w_0: it only records the best objective."""
        import tensorflow as tf

        interval = self.intervals[step]
        checkpoint = (interval > 0) | (step == 0)
        halve = (interval > 0) & should_halve(tf.cast(state["increases"], tf.float32), tf.cast(interval, tf.float32),
                                              state["halved_last"],
                                              state["best_objective"] <= state["best_at_checkpoint"], self.rho)
        pixels = halve[:, None, None, None]
        state = {**state, "step_size": tf.where(halve, state["step_size"] / 2, state["step_size"]),
                 "images": tf.where(pixels, state["best_images"], state["images"]),
                 "last_objective": tf.where(halve, state["best_objective"], state["last_objective"]),
                 "increases": tf.where(checkpoint, 0, state["increases"]),
                 "best_at_checkpoint": tf.where(checkpoint, state["best_objective"], state["best_at_checkpoint"]),
                 "halved_last": tf.where(checkpoint, halve, state["halved_last"])}
        return state, tf.where(pixels, state["best_gradient"], gradient)

    def _move(self, state, gradient, step):
        """The sign step, clipped into the box, then APGD's momentum, clipped again; capped images stay."""
        import tensorflow as tf

        images, previous, lower, upper = state["images"], state["previous"], state["lower"], state["upper"]
        target = tf.clip_by_value(images + state["step_size"][:, None, None, None] * tf.sign(gradient), lower, upper)
        momentum = tf.where(step > 0, self.momentum, 1.0)  # The first step has no previous move.
        # x + alpha (z - x) + (1 - alpha)(x - previous), written so that alpha = 1 (PGD) gives z exactly.
        moved = tf.clip_by_value(target + (1 - momentum) * (2 * images - target - previous), lower, upper)
        moving = state["active"][:, None, None, None]
        return {**state, "images": tf.where(moving, moved, images), "previous": tf.where(moving, images, previous)}


# One AttackSteps per model and settings, traced once and reused by every later call. Keyed weakly by
# the model: the steps hold only views of its layers, so a model nobody uses frees its entry.
_COMPILED = weakref.WeakKeyDictionary()


def compiled_steps(model, objective, batch_size, num_classes=None, kappa=MARGIN_KAPPA, depthwise_gradient=True):
    """The AttackSteps of these settings for model, built and traced on first use."""
    settings = (objective, batch_size, num_classes, float(kappa), bool(depthwise_gradient))
    by_settings = _COMPILED.setdefault(model, {})
    if settings not in by_settings:
        by_settings[settings] = AttackSteps(model, *settings)
    return by_settings[settings]


# --------------------------------------------------------------------- the host side


def run_attack(model, images, lower, upper, objective, targets, steps, restarts, step_sizes, schedule, options):
    """The shared loop of every attack: restarts, the best point over them, steps_to_cap counted on.

    options: {random_start, seed, cap, num_classes, kappa, depthwise_gradient, attack}. The
    first run starts from images (or a random point of the box with random_start); each later
    run from a fresh random point of the box, for the images that have not reached the cap.
    """
    count = len(images)
    compiled = compiled_steps(model, objective, count, options["num_classes"], options["kappa"],
                              options["depthwise_gradient"])
    rng = np.random.default_rng(options["seed"])
    targets = np.zeros(count, np.int32) if targets is None else np.asarray(targets, np.int32)
    best = None
    for restart in range(restarts):
        open_images = np.ones(count, bool) if best is None else best["steps_to_cap"] < 0
        if not open_images.any():
            break
        starts = images if restart == 0 and not options["random_start"] else random_points(lower, upper, rng)
        compiled.start(np.clip(starts, lower, upper), lower, upper, targets, step_sizes, open_images, schedule,
                       options["cap"])
        compiled.run(steps, options["attack"])
        found = compiled.result()
        found["steps_to_cap"] = np.where(found["steps_to_cap"] >= 0, found["steps_to_cap"] + restart * steps, -1)
        best = found if best is None else _better(best, found)
    return best


def _better(best, found):
    """Per image, the better of two runs' results: found where it reached the cap or rose higher."""
    better = (found["steps_to_cap"] >= 0) | (found["objective"] > best["objective"])
    return {name: np.where(better.reshape(-1, *[1] * (value.ndim - 1)), found[name], value)
            for name, value in best.items()}


# ---------------------------------------------------------------------- the checks


def _is_number(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_count(attack, name, value):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise UserError(f"{attack}: {name} must be an integer >= 1, not {value!r}")


def _check_step_size(attack, name, value):
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{attack}: {name} must be a finite number > 0, not {value!r}")


def check_box(attack, images, lower, upper):
    """Refuse a box that is not one: other shapes than the images', lower above upper, outside [0, 1]."""
    fix = "build it with box_attacks.ball(images, eps) or whole_box(images)"
    if np.shape(lower) != np.shape(images) or np.shape(upper) != np.shape(images):
        raise UserError(f"{attack}: lower {np.shape(lower)} and upper {np.shape(upper)} must have the images' shape "
                        f"{np.shape(images)}; {fix}")
    if not (np.all(np.isfinite(lower)) and np.all(np.isfinite(upper))):
        raise UserError(f"{attack}: lower and upper must be finite; {fix}")
    if np.any(lower > upper):
        raise UserError(f"{attack}: lower exceeds upper at {int(np.sum(lower > upper))} pixels; "
                        f"a box needs lower <= upper; {fix}")
    if np.min(lower) < 0 or np.max(upper) > 1:
        raise UserError(f"{attack}: the box must lie inside [0, 1] (lower >= 0, upper <= 1), the images the network "
                        f"knows; {fix}")


def check_attack(attack, model, images, lower, upper, objective, targets, cap, num_classes):
    """The checks every attack shares: images, box, objective and targets, cap and the class count."""
    shape, outputs = tuple(model.input_shape[1:]), model.output_shape[-1]
    if np.ndim(images) != 4 or tuple(np.shape(images)[1:]) != shape or len(images) == 0:
        raise UserError(f"{attack}: images must be a non-empty batch of the model's shape "
                        f"(N, {', '.join(map(str, shape))}), not {np.shape(images)}")
    if not np.all(np.isfinite(images)):
        raise UserError(f"{attack}: images must be finite; some pixels are NaN or infinite")
    check_box(attack, images, lower, upper)
    check_objective(attack, objective, targets, len(images), outputs)
    if cap is not None and (not _is_number(cap) or not 0 < cap <= 1):
        raise UserError(f"{attack}: cap must be a probability in (0, 1] or None (never stop early), not {cap!r}")
    if num_classes is not None and (not isinstance(num_classes, (int, np.integer)) or not 1 <= num_classes <= outputs):
        raise UserError(f"{attack}: num_classes must be an integer in [1, {outputs}] (the model's outputs) or None, "
                        f"not {num_classes!r}")


def check_objective(attack, objective, targets, count, outputs):
    """A known objective, and for a targeted one a target class per image among the model's outputs."""
    if objective not in OBJECTIVES:
        raise UserError(f"{attack}: objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
    if objective not in TARGETED_OBJECTIVES:
        return
    if targets is None or np.shape(targets) != (count,):
        raise UserError(f"{attack}: objective {objective!r} needs targets, one class per image ({count}), "
                        f"not {None if targets is None else np.shape(targets)}")
    if not np.issubdtype(np.asarray(targets).dtype, np.integer) or np.min(targets) < 0 or np.max(targets) >= outputs:
        raise UserError(f"{attack}: targets must be integer classes in [0, {outputs - 1}]")


# --------------------------------------------------------------------------- the attacks


def check_pgd(steps, step_size, restarts):
    _check_count("pgd", "steps", steps)
    _check_step_size("pgd", "step_size", step_size)
    _check_count("pgd", "restarts", restarts)


def pgd(model, images, lower, upper, objective, targets=None, steps=100, step_size=0.01, restarts=1,
        random_start=False, seed=0, cap=None, num_classes=None, kappa=MARGIN_KAPPA, depthwise_gradient=True):
    """Projected signed-gradient ascent of objective in the box [lower, upper]; a results dict.

    Each step: x <- clip(x + step_size * sign(gradient), lower, upper). Returns NumPy arrays:
    images (N, H, W, C), the best point per image; objective and confidence (N,) there;
    steps_to_cap (N,), -1 where the confidence never reached cap.
    """
    check_attack("pgd", model, images, lower, upper, objective, targets, cap, num_classes)
    check_pgd(steps, step_size, restarts)
    step_sizes = np.full(len(images), step_size, np.float32)
    schedule = (1.0, APGD_RHO, np.zeros(steps + 1, np.int32))  # No momentum, no checkpoint.
    options = {"random_start": random_start, "seed": seed, "cap": cap, "num_classes": num_classes, "kappa": kappa,
               "depthwise_gradient": depthwise_gradient, "attack": "pgd"}
    return run_attack(model, np.asarray(images, np.float32), np.asarray(lower, np.float32),
                      np.asarray(upper, np.float32), objective, targets, steps, restarts, step_sizes, schedule, options)


def check_apgd(steps, restarts, rho, initial_step_size):
    _check_count("apgd", "steps", steps)
    _check_count("apgd", "restarts", restarts)
    if not _is_number(rho) or not 0 < rho <= 1:
        raise UserError(f"apgd: rho must be a number in (0, 1], not {rho!r}")
    if initial_step_size is not None:
        _check_step_size("apgd", "initial_step_size", initial_step_size)


def apgd(model, images, lower, upper, objective, targets=None, steps=100, restarts=1, random_start=False, seed=0,
         cap=None, num_classes=None, kappa=MARGIN_KAPPA, rho=APGD_RHO, initial_step_size=None,
         depthwise_gradient=True):
    """Croce and Hein's APGD of objective in the box [lower, upper]; the results dict pgd returns.

    The step size starts at the box's width (box_widths: 2 eps for the ball, 1 for the
    whole box) unless initial_step_size is given, and is halved per image at the
    checkpoints (apgd_checkpoints) where should_halve says so, the image going back to its
    best point. Restarts beyond the first start from random points of the box.
    """
    check_attack("apgd", model, images, lower, upper, objective, targets, cap, num_classes)
    check_apgd(steps, restarts, rho, initial_step_size)
    lower, upper = np.asarray(lower, np.float32), np.asarray(upper, np.float32)
    step_sizes = (box_widths(lower, upper) if initial_step_size is None
                  else np.full(len(images), initial_step_size, np.float32))
    schedule = (APGD_MOMENTUM, rho, checkpoint_intervals(steps))
    options = {"random_start": random_start, "seed": seed, "cap": cap, "num_classes": num_classes, "kappa": kappa,
               "depthwise_gradient": depthwise_gradient, "attack": "apgd"}
    return run_attack(model, np.asarray(images, np.float32), lower, upper, objective, targets, steps, restarts,
                      step_sizes, schedule, options)


# ---------------------------------------------------------------------------- Square

# Square's schedule (Andriushchenko et al. ECCV 2020): the fraction of the image a square covers starts at
# p_init and is halved after these iterations of a 10,000-query run (scaled to the run's queries).
SQUARE_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_fraction(p_init, query, queries):
    """The fraction of the image Square's square covers at this query: p_init halved at SQUARE_HALVINGS."""
    scaled = int(query / queries * 10_000)
    return p_init / 2 ** sum(scaled > halving for halving in SQUARE_HALVINGS)


def square_sides(p_init, queries, height, width):
    """[(first query, count, side)]: the runs of queries with one square side, from the schedule above."""
    sides = [max(1, min(height, width, round(math.sqrt(square_fraction(p_init, query, queries) * height * width))))
             for query in range(1, queries + 1)]
    runs = []
    for query, side in enumerate(sides, start=1):
        if runs and runs[-1][2] == side:
            runs[-1][1] += 1
        else:
            runs.append([query, 1, side])
    return [tuple(run) for run in runs]


class SquareSteps:
    """Square's batch state and its compiled block of queries: each query, for every image at once, one
    random square of the image set to a random corner of the box, kept where it raises the objective."""

    def __init__(self, model, objective, batch_size, num_classes=None, kappa=MARGIN_KAPPA):
        import tensorflow as tf

        model = cnn.float32_model(model)
        self.network, self.model_name = cnn.logits_model(model), model.name
        self.objective, self.num_classes, self.kappa = objective, num_classes, kappa
        images, vector = tf.zeros((batch_size, *model.input_shape[1:])), tf.zeros([batch_size])
        self.state = {name: tf.Variable(images) for name in ("lower", "upper", "images")}
        self.state.update({"objective": tf.Variable(vector), "confidence": tf.Variable(vector),
                           "targets": tf.Variable(tf.zeros([batch_size], tf.int32)),
                           "steps_to_cap": tf.Variable(tf.zeros([batch_size], tf.int32)),
                           "active": tf.Variable(tf.zeros([batch_size], tf.bool))})
        self.cap, self.diverged_at = tf.Variable(2.0), tf.Variable(-1)
        scalar = tf.TensorSpec([], tf.int32)
        self.run_block = tf.function(self._run_block, input_signature=[scalar, scalar, scalar,
                                                                       tf.TensorSpec([], tf.int64)])

    def start(self, images, lower, upper, targets, cap, seed):
        """From the better of images and Square's vertical stripes (each column a random corner of the box)."""
        import tensorflow as tf

        count = len(images)
        stripes = tf.random.stateless_uniform([count, 1, images.shape[2], images.shape[3]], [seed, -1]) < 0.5
        stripes = np.where(stripes.numpy(), upper, lower)
        values = [self._values(candidate, targets) for candidate in (images, stripes)]
        better = values[1][0] > values[0][0]
        chosen = np.where(better[:, None, None, None], stripes, images)
        state = {"lower": lower, "upper": upper, "images": chosen, "targets": targets,
                 "objective": np.where(better, values[1][0], values[0][0]),
                 "confidence": np.where(better, values[1][1], values[0][1])}
        cap = 2.0 if cap is None else cap  # A probability never reaches 2.
        state["steps_to_cap"] = np.where(state["confidence"] >= cap, 0, -1)
        state["active"] = state["steps_to_cap"] < 0
        for name, value in state.items():
            self.state[name].assign(np.asarray(value, self.state[name].dtype.as_numpy_dtype))
        self.cap.assign(cap)
        self.diverged_at.assign(-1)

    def _values(self, images, targets):
        logits = self.network(images, training=False)
        values, confidence = objective_values(logits, targets, self.objective, self.num_classes, self.kappa)
        if not (np.all(np.isfinite(logits)) and np.all(np.isfinite(values))):
            raise ModelNotFinite(f"model {self.model_name!r} gave logits that are not finite at Square's start; "
                                 "check that its weights are finite (no result is returned)")
        return values.numpy(), confidence.numpy()

    def _run_block(self, count, first_query, side, seed):
        import tensorflow as tf

        state, (batch, height, width, channels) = self.state, self.state["images"].shape
        rows, columns = tf.range(height)[None, :, None, None], tf.range(width)[None, None, :, None]
        for index in tf.range(count):
            if self.diverged_at >= 0 or not tf.reduce_any(state["active"]):
                break
            query = first_query + index
            key = tf.stack([seed, tf.cast(query, tf.int64)])
            room = tf.cast(tf.stack([height, width]) - side + 1, tf.float32)  # Positions a square can take.
            corner = tf.cast(tf.random.stateless_uniform([batch, 2], key) * room, tf.int32)  # Its top-left pixel.
            top, left = corner[:, 0, None, None, None], corner[:, 1, None, None, None]
            inside = (rows >= top) & (rows < top + side) & (columns >= left) & (columns < left + side)
            signs = tf.random.stateless_uniform([batch, 1, 1, channels], key + [0, 1]) < 0.5  # Per image and channel.
            vertex = tf.where(signs, state["upper"], state["lower"])
            candidate = tf.where(inside & state["active"][:, None, None, None], vertex, state["images"])
            logits = self.network(candidate, training=False)
            values, confidence = objective_values(logits, state["targets"], self.objective, self.num_classes,
                                                  self.kappa)
            if not tf.reduce_all(tf.math.is_finite(logits)):
                self.diverged_at.assign(query)
                break
            better = (values > state["objective"]) & state["active"]
            state["images"].assign(tf.where(better[:, None, None, None], candidate, state["images"]))
            state["objective"].assign(tf.where(better, values, state["objective"]))
            state["confidence"].assign(tf.where(better, confidence, state["confidence"]))
            reached = better & (confidence >= self.cap)
            state["steps_to_cap"].assign(tf.where(reached, query, state["steps_to_cap"]))
            state["active"].assign(state["active"] & ~reached)


def check_square(queries, p_init):
    _check_count("square", "queries", queries)
    if not _is_number(p_init) or not 0 < p_init <= 1:
        raise UserError(f"square: p_init must be a number in (0, 1] (the fraction of the image the first square "
                        f"covers), not {p_init!r}")


def square(model, images, lower, upper, objective, targets=None, queries=5000, p_init=0.8, seed=0, cap=None,
           num_classes=None, kappa=MARGIN_KAPPA):
    """Andriushchenko et al.'s Square attack (ECCV 2020) of objective in the box [lower, upper], compiled.

    Gradient-free, so a flat or masked gradient does not stop it: each query sets one random
    square per image (its side from square_sides: p_init of the image at first, smaller later)
    to a random corner of the box, per channel, and keeps it where the objective rose. One
    forward pass per query for the whole batch. Returns the dict pgd returns (steps_to_cap in
    queries: 0 is the start).
    """
    check_attack("square", model, images, lower, upper, objective, targets, cap, num_classes)
    check_square(queries, p_init)
    images, lower, upper = (np.asarray(array, np.float32) for array in (images, lower, upper))
    targets = np.zeros(len(images), np.int32) if targets is None else np.asarray(targets, np.int32)
    by_settings = _COMPILED.setdefault(model, {})
    settings = ("square", objective, len(images), num_classes, float(kappa))
    if settings not in by_settings:
        by_settings[settings] = SquareSteps(model, objective, len(images), num_classes, kappa)
    steps = by_settings[settings]
    steps.start(images, lower, upper, targets, cap, seed)
    for first_query, count, side in square_sides(p_init, queries, *images.shape[1:3]):
        steps.run_block(count, first_query, side, np.int64(seed))
        if int(steps.diverged_at.numpy()) >= 0:
            raise ModelNotFinite(f"model {steps.model_name!r} gave logits that are not finite at query "
                                 f"{int(steps.diverged_at.numpy())} of square; check that its weights are finite")
    state = steps.state
    return {"images": state["images"].numpy(), "objective": state["objective"].numpy(),
            "confidence": state["confidence"].numpy(), "steps_to_cap": state["steps_to_cap"].numpy().astype(np.int64)}
