"""Defences against confident outputs far from the data: each one a loss term added to every training step.

The study finds noise images an MNIST CNN classifies with p >= 0.999. Three published defences
claim to remove such confidence. Each is one function here that returns a trainer.ExtraTerm (an
extra batch drawn inside the compiled step, in the same forward pass as the class images, its
loss added with a weight), so that training from scratch (proc_mnist.py, defence.method) and the
study's retraining (preprocess_data.py --target) run every one through the same step:

- outlier_exposure (Hendrycks, Mazeika and Dietterich, ICLR 2019): each step draws outliers
  from a pool built once (outlier_pool) and trains them towards the uniform label.
- acet (Hein, Andriushchenko and Bitterwolf, CVPR 2019): each step draws noise in the graph
  (noise_batch), moves it inside its eps-ball to where the model is most confident (a PGD,
  attack_in_ball) and trains that point towards the uniform label.
- good (Bitterwolf, Meinke and Hein, NeurIPS 2020): each step draws outliers from the pool and
  lowers an interval bound on the logits over the eps-ball around each (good_loss): a
  certificate that holds against every attack, not one attack's failure.
- prood (Meinke, Bitterwolf and Hein, NeurIPS 2022): the classifier is left as it is; a
  discriminator (in or out of distribution) is trained beside it, the pool's outliers on an
  interval bound over their balls (discriminator_loss), and the two are combined into one model,
  p(y|x) = p(in|x) p(y|x, in) + (1 - p(in|x)) / K (with_discriminator; cnn.combine_with_discriminator).
  GOOD's bound costs the classifier accuracy; this one cannot, since argmax p(y|x) is the classifier's.

Their parameters are the [defence] keys of configs/default.toml, the one place of their
defaults, checked by configurator's value rules as each function starts. Every draw is seeded
by (defence.seed, optimizer step) with stateless random ops, so a resumed run draws what an
uninterrupted one would.
"""
import dataclasses
import sys
import zlib

import numpy as np

import cnn
import configurator
import interval_bounds
import ood_sets
import trainer
from common import UserError

POOL_SIZE = 6000  # Outliers built once per run, shared evenly by the sources (19 MB at 28x28).
PERMUTATION_SOURCES = 2000  # Training images whose pixels acet's noise permutes (a constant in the graph).
# Each random stream of a step gets its own salt, so a defence's draws share no bits with the
# trainer's shifts and flips, which are seeded by (train.seed, step) too.
POOL_STREAM, NOISE_STREAM = zlib.crc32(b"defences.pool"), zlib.crc32(b"defences.noise")
PHOTO_SMALLEST_CROP = 1 / 15  # A photo crop's height is at least this fraction of the photo's.

# The [defence] keys each defence reads (defence.method names it; the others it ignores).
PARAMETERS = {
    "outlier_exposure": ("outlier_exposure_weight", "outlier_batch", "outlier_sources", "seed"),
    "acet": ("acet_weight", "outlier_batch", "eps", "attack_steps", "attack_step_size", "seed"),
    "good": ("good_weight", "outlier_batch", "outlier_sources", "eps", "ramp_fraction", "certified_fraction",
             "seed"),
    "prood": ("prood_weight", "outlier_batch", "outlier_sources", "eps", "ramp_fraction", "box_attack_fraction",
              "attack_steps", "attack_step_size", "seed"),
}


COLLAPSED_IN_FRACTION = 0.5  # prood: a discriminator calling fewer test images "in" than this learned nothing


def _parameters(method, parameters):
    """The [defence] section for method: parameters over configs/default.toml's, each checked by the value rules."""
    defaults = configurator.default_config()["defence"]
    return configurator.merge_config({"defence": defaults}, {"defence": dict(parameters or {})},
                                     source=f"defences.{method}")["defence"]


def check_config(config, method):
    """Refuse before any work a defence this run cannot train: its extra batch is drawn on one device."""
    if method in PARAMETERS and config["train"]["distribute"] != "none":
        raise UserError(f"defence {method!r} draws its extra batch inside the training step, on one device; "
                        "set train.distribute = \"none\"")


def _key(seed, step, stream):
    """The stateless random key of one stream of one step: (seed, step) folded with the stream's salt."""
    import tensorflow as tf

    key = tf.stack([tf.constant(seed, tf.int64), tf.cast(step, tf.int64)])
    return tf.random.experimental.stateless_fold_in(key, stream)


# ----------------------------------------------------------------------- the outlier pool


def _sample_photos():
    """The photos scikit-learn ships (a temple and a flower, 427 x 640 RGB uint8), or one line naming the fix."""
    try:
        from sklearn.datasets import load_sample_images

        return load_sample_images().images
    except (ImportError, OSError, ValueError) as error:
        raise UserError(f"the outlier source \"photos\" needs scikit-learn's sample photos, which did not load "
                        f"({type(error).__name__}: {error}); pip install -r requirements.txt, or leave \"photos\" "
                        "out of defence.outlier_sources") from None


def photo_crops(count, shape, seed):
    """count random crops of scikit-learn's photos (count, H, W, C) float32 in [0, 1].

    Each crop has the image's aspect, a height between PHOTO_SMALLEST_CROP and all of the
    photo's, a random place and a random mirror, and is resized (antialiased) to the image
    size: grey for one channel, colour for three (grey repeated for others).
    """
    from PIL import Image

    photos, (height, width, channels) = _sample_photos(), shape
    rng = np.random.default_rng([seed, zlib.crc32(b"photos")])
    crops = np.empty((count, height, width, channels), np.float32)
    for index in range(count):
        photo = photos[rng.integers(len(photos))]
        most = min(photo.shape[0], photo.shape[1] * height // width)
        crop_height = rng.integers(min(max(height, round(PHOTO_SMALLEST_CROP * most)), most), most + 1)
        crop_width = max(1, crop_height * width // height)
        top, left = rng.integers(photo.shape[0] - crop_height + 1), rng.integers(photo.shape[1] - crop_width + 1)
        crop = Image.fromarray(photo[top:top + crop_height, left:left + crop_width])
        crop = crop.convert("RGB" if channels == 3 else "L").resize((width, height), Image.Resampling.BILINEAR)
        pixels = np.asarray(crop, np.float32).reshape(height, width, -1) / 255.0
        crops[index] = np.fliplr(pixels) if rng.random() < 0.5 else pixels
    return crops


def _noise_families(count, shape, seed, source_images):
    """count noise images, the families of ood_sets in equal shares ("permuted": of source_images)."""
    families = list(ood_sets.NOISE_FAMILIES)
    shares = np.diff(np.linspace(0, count, len(families) + 1).round().astype(int))
    return np.concatenate([ood_sets.noise_images(family, share, shape, seed, source_images)
                           for family, share in zip(families, shares)])


def outlier_pool(shape, sources=configurator.OUTLIER_SOURCES, seed=0, source_images=None, size=POOL_SIZE):
    """(size, H, W, C) float32 in [0, 1]: the outliers outlier_exposure and good draw from, shuffled.

    The sources share the pool evenly. None is a set the evaluation (issue 23) tests on:
    - "photos": crops of the two photos scikit-learn ships (photo_crops);
    - "letters": ood_sets.letters in ood_sets.TRAINING_FONTS, which share no font file with the
      EVALUATION_FONTS of the evaluation's letters (ood_sets refuses to import otherwise);
    - "noise": ood_sets' noise families; "permuted" shuffles the pixels of source_images, which
      must be *training* images (the evaluation permutes test images). No test image of MNIST or
      Fashion-MNIST is a source. tests/test_defences.py checks the letters and the test images.
    """
    shape = tuple(int(side) for side in shape)
    shares = np.diff(np.linspace(0, size, len(sources) + 1).round().astype(int))
    makers = {"photos": lambda count: photo_crops(count, shape, seed),
              "letters": lambda count: ood_sets.letters(count, shape, seed, ood_sets.TRAINING_FONTS)[0],
              "noise": lambda count: _noise_families(count, shape, seed, source_images)}
    unknown = set(sources) - set(makers)
    if unknown:
        raise UserError(f"outlier source {', '.join(sorted(unknown))} is unknown; choose from {', '.join(makers)}")
    if "noise" in sources and source_images is None:
        raise ValueError("the \"noise\" outlier source needs source_images (training images) to permute")
    pool = np.concatenate([makers[name](share) for name, share in zip(sources, shares)])
    return pool[np.random.default_rng([seed, zlib.crc32(b"pool")]).permutation(len(pool))]


def _pool_draw(pool, count, seed):
    """draw(step): count rows of the pool (a constant of the graph), chosen by (seed, step)."""
    import tensorflow as tf

    pool = tf.constant(pool)

    def draw(step):
        rows = tf.random.stateless_uniform([count], _key(seed, step, POOL_STREAM), 0, pool.shape[0], tf.int32)
        return tf.gather(pool, rows)  # (count, H, W, C)

    return draw


# -------------------------------------------------------------------------- the defences


def outlier_exposure(model, training_images, parameters=None, num_steps=None):
    """Outlier exposure: each step, defence.outlier_batch outliers of outlier_pool towards the uniform label.

    Reads outlier_exposure_weight (the paper's 0.5), outlier_batch, outlier_sources and seed of
    parameters ([defence] keys; the others from configs/default.toml). The outliers are never a
    set the evaluation tests on (outlier_pool says why). training_images are the permuted
    family's sources; model gives the image shape; num_steps is not used.
    """
    section = _parameters("outlier_exposure", parameters)
    pool = outlier_pool(model.input_shape[1:], section["outlier_sources"], section["seed"], training_images)
    return trainer.ExtraTerm(draw=_pool_draw(pool, section["outlier_batch"], section["seed"]),
                             loss=lambda logits, images: trainer.uniform_label_loss(logits),
                             weight=section["outlier_exposure_weight"])


def _permuted(images, key):
    """Each image (N, H, W, C) with its pixels in its own random order (a colour pixel moves whole)."""
    import tensorflow as tf

    _, height, width, channels = images.shape
    flat = tf.reshape(images, [-1, height * width, channels])
    orders = tf.argsort(tf.random.stateless_uniform([tf.shape(images)[0], height * width], key), axis=1)
    return tf.reshape(tf.gather(flat, orders, batch_dims=1), [-1, height, width, channels])


def noise_batch(key, count, shape, sources):
    """count noise images (count, H, W, C) float32 in [0, 1] as ACET draws them, in the graph.

    Half uniform noise, half sources (training images) with their pixels permuted; then half of
    all blurred by a Gaussian of width uniform in [1, 2.5] pixels at 28x28 (scaled with the
    image) and stretched back to [0, 1]. key is a stateless key (2,); the same key, the same batch.
    """
    import tensorflow as tf

    keys = [tf.random.experimental.stateless_fold_in(key, part) for part in range(6)]
    height, width, channels = shape
    uniform = tf.random.stateless_uniform([count, height, width, channels], keys[0])
    rows = tf.random.stateless_uniform([count], keys[1], 0, sources.shape[0], tf.int32)
    permuted = _permuted(tf.gather(sources, rows), keys[2])
    images = tf.where(tf.random.stateless_uniform([count, 1, 1, 1], keys[3]) < 0.5, uniform, permuted)
    widths = tf.random.stateless_uniform([count], keys[4], 1.0, 2.5) * min(height, width) / 28
    blurred = ood_sets.low_pass(images, widths)  # The evaluation's low-frequency family uses the same blur.
    return tf.where(tf.random.stateless_uniform([count, 1, 1, 1], keys[5]) < 0.5, blurred, images)


def _ball(images, eps):
    """(lower, upper): the l-infinity ball of radius eps around images, clipped to the image box [0, 1]."""
    import tensorflow as tf

    return tf.clip_by_value(images - eps, 0.0, 1.0), tf.clip_by_value(images + eps, 0.0, 1.0)


def top_log_probability(logits):
    """(N,) log of each row's top class probability: what ACET's attack raises (the confidence)."""
    import tensorflow as tf

    return tf.reduce_max(tf.nn.log_softmax(logits), axis=1)


def ascend(scores, start, lower, upper, steps, step_size, objective=top_log_probability):
    """start moved by steps sign-gradient ascent steps on objective(logits) (N,), each clipped into
    [lower, upper]: PGD in the graph. scores is a logits model, run in inference mode. Returns the
    last points, as constants for the training loss."""
    import tensorflow as tf

    def step_once(step, points):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(points)
            objective_sum = tf.reduce_sum(objective(tf.cast(scores(points, training=False), tf.float32)))
        moved = points + step_size * tf.sign(tape.gradient(objective_sum, points))
        return step + 1, tf.clip_by_value(moved, lower, upper)

    start = tf.convert_to_tensor(start, tf.float32)
    _, points = tf.while_loop(lambda step, points: step < steps, step_once, (tf.constant(0), start))
    return tf.stop_gradient(points)


def attack_in_ball(scores, images, eps, steps, step_size, key):
    """images moved inside their eps-ball (and [0, 1]) to where the model is confident: ACET's PGD.

    From a uniformly random point of each ball, steps sign-gradient ascent steps on the log of
    the top class probability (ascend). Returns the last points (N, H, W, C).
    """
    import tensorflow as tf

    lower, upper = _ball(images, eps)
    start = lower + tf.random.stateless_uniform(tf.shape(images), key) * (upper - lower)
    return ascend(scores, start, lower, upper, steps, step_size)


def _permutation_sources(training_images, seed):
    """Up to PERMUTATION_SOURCES training images, chosen by seed: what acet's permuted noise shuffles."""
    images = np.asarray(training_images, np.float32)
    count = min(len(images), PERMUTATION_SOURCES)
    return images[np.random.default_rng([seed, NOISE_STREAM]).choice(len(images), count, replace=False)]


def acet(model, training_images, parameters=None, num_steps=None):
    """Adversarial confidence enhanced training: each step's noise, attacked in its eps-ball, towards the uniform label.

    Reads acet_weight (the paper's 1), outlier_batch (noise images per step), eps (0.3),
    attack_steps and attack_step_size and seed of parameters ([defence] keys). The paper
    attacks with 40 steps; the default 10 costs a quarter as much (each attack step is a forward
    and a backward pass of the noise batch, about the cost of one training step). num_steps is not used.
    """
    import tensorflow as tf

    section = _parameters("acet", parameters)
    sources = tf.constant(_permutation_sources(training_images, section["seed"]))
    scores, shape = cnn.logits_model(model), tuple(model.input_shape[1:])

    def draw(step):
        key = _key(section["seed"], step, NOISE_STREAM)
        noise = noise_batch(key, section["outlier_batch"], shape, sources)
        return attack_in_ball(scores, noise, section["eps"], section["attack_steps"], section["attack_step_size"],
                              tf.random.experimental.stateless_fold_in(key, 6))

    return trainer.ExtraTerm(draw=draw, loss=lambda logits, images: trainer.uniform_label_loss(logits),
                             weight=section["acet_weight"])


def ramped_eps(step, eps, ramp_steps):
    """eps at a step (a tensor): growing linearly from 0 at step 0 to eps at ramp_steps, then eps."""
    import tensorflow as tf

    if ramp_steps <= 0:
        return tf.constant(eps, tf.float32)
    return eps * tf.minimum(1.0, tf.cast(step, tf.float32) / ramp_steps)


def _bound_term(method, model, training_images, section, num_steps, loss_at):
    """The ExtraTerm of a defence trained on interval bounds (good, prood): each step's outliers drawn from
    outlier_pool, loss_at(logits, images, eps) with eps ramped from 0 over ramp_fraction of num_steps."""
    if section["ramp_fraction"] > 0 and not num_steps:
        raise ValueError(f"{method} needs num_steps (the run's step count) to ramp eps over")
    interval_bounds.check_model_supported(model)
    _check_batch_norm_measured(model, method)
    pool = outlier_pool(model.input_shape[1:], section["outlier_sources"], section["seed"], training_images)
    ramp_steps = section["ramp_fraction"] * (num_steps or 0)

    def loss(logits, images):  # Called in the training step, where the model has its optimizer.
        return loss_at(logits, images, ramped_eps(model.optimizer.iterations, section["eps"], ramp_steps))

    return trainer.ExtraTerm(draw=_pool_draw(pool, section["outlier_batch"], section["seed"]), loss=loss,
                             weight=section[f"{method}_weight"], frozen_batch_norm=True)


def _check_batch_norm_measured(model, method):
    """Refuse a model whose batch normalisation never saw data: a bound defence trains it frozen (trainer.ExtraTerm)."""
    for layer in cnn.batch_norm_layers(model):
        if not np.any(layer.moving_mean.numpy()) and np.all(layer.moving_variance.numpy() == 1):
            raise UserError(f"defence {method!r} trains with batch normalisation frozen at its moving statistics, "
                            f"but {layer.name}'s were never measured (a new model); train it first (proc_mnist.py "
                            f"without the defence), then fine-tune it with preprocess_data.py --target {method} "
                            "(without --from-scratch)")


def good_loss(model, logits, images, eps, certified_fraction):
    """GOOD's loss of each outlier (N,): log(1 + d^2 / 2), d a spread of its logits.

    d is the interval bound of max_{k,j} (z_k - z_j) over the eps-ball around the image for the
    certified_fraction of the batch with the lowest bounds (GOOD80: 0.8), and the spread of its
    logits (max - min, from the training pass) for the rest, which the bound cannot reach yet.
    d = 0 is the uniform output; the log keeps the loss of a far-off image from swamping the
    batch. The bound holds for every point of the ball: p_max <= exp(d) / K there.
    """
    import tensorflow as tf

    differences = interval_bounds.logit_difference_bounds_tensor(model, *_ball(images, eps))  # (N, K, K)
    bound = tf.reduce_max(differences, axis=[1, 2])  # (N,), >= 0: the k = j terms are 0.
    spread = tf.reduce_max(logits, axis=1) - tf.reduce_min(logits, axis=1)
    count = tf.shape(bound)[0]
    certified_count = tf.cast(tf.floor(certified_fraction * tf.cast(count, tf.float32)), tf.int32)
    ranks = tf.argsort(tf.argsort(bound))  # 0 for the lowest bound.
    return tf.math.log1p(tf.square(tf.where(ranks < certified_count, bound, spread)) / 2)


def good(model, training_images, parameters=None, num_steps=None):
    """GOOD: each step's outliers (outlier_pool) trained on an interval bound of their logits over the eps-ball.

    Reads good_weight (GOOD's MNIST code: 0.3), outlier_batch, outlier_sources, eps (0.3),
    ramp_fraction (eps grows from 0 over this fraction of num_steps, the run's step count, as
    the optimizer counts them), certified_fraction and seed of parameters ([defence] keys).
    The bounds are interval_bounds' (one implementation for training and judging); the model
    must be one they pass through, in float32.
    """
    section = _parameters("good", parameters)
    if cnn.precision_of(model) != "none":
        raise UserError(f"defence 'good' bounds the model in float32, but it computes in {cnn.precision_of(model)}; "
                        "set train.mixed_precision = \"none\"")
    return _bound_term("good", model, training_images, section, num_steps,
                       lambda logits, images, eps: good_loss(model, logits, images, eps,
                                                             section["certified_fraction"]))


def discriminator_loss(discriminator, images, eps):
    """ProoD's loss of each outlier (N,): -log p(out) at the worst point of its eps-ball, as the bound sees it.

    softplus(upper(s_in - s_out)) over the ball (interval_bounds): at most the cross-entropy of the
    "out" label at every point of the ball, so lowering it lowers a certified bound on p(in).
    """
    import tensorflow as tf

    differences = interval_bounds.logit_difference_bounds_tensor(discriminator, *_ball(images, eps))  # (N, 2, 2)
    return tf.math.softplus(differences[:, 1, 0])


def prood(discriminator, training_images, parameters=None, num_steps=None):
    """The extra term of ProoD's discriminator: each step's outliers (outlier_pool) towards "out", on the bound.

    Reads prood_weight, outlier_batch, outlier_sources, eps, ramp_fraction and seed of parameters
    ([defence] keys), and box_attack_fraction with attack_steps and attack_step_size (box_attacked).
    discriminator is cnn.build_discriminator's (output 1: in distribution); its class images are
    the training digits, all labelled "in" (with_discriminator does that).
    """
    section = _parameters("prood", parameters)
    term = _bound_term("prood", discriminator, training_images, section, num_steps,
                       lambda logits, images, eps: discriminator_loss(discriminator, images, eps))
    if section["box_attack_fraction"] == 0:
        return term
    return dataclasses.replace(term, draw=box_attacked(term.draw, discriminator, training_images, section))


def in_log_probability(logits):
    """(N,) log p(in) of a discriminator's logits (output 1: in distribution)."""
    import tensorflow as tf

    return tf.nn.log_softmax(logits)[:, 1]


def box_attacked(draw_outliers, discriminator, training_images, section):
    """draw(step): the outliers of draw_outliers with a box_attack_fraction share of them replaced by noise
    (noise_batch) attacked anywhere in the image box towards "in" (attack_steps sign-gradient steps of
    attack_step_size on log p(in), no ball).

    Our addition to ProoD, for the threat model this project starts from: the pool's balls
    certify the discriminator near the outliers, but an attack free in the whole box still finds
    images it calls "in" (docs/results.md). Training those images towards "out", on the bound
    of the ball around each, is ACET's idea applied to the discriminator in the whole box.
    """
    import tensorflow as tf

    count = round(section["box_attack_fraction"] * section["outlier_batch"])
    sources = tf.constant(_permutation_sources(training_images, section["seed"]))
    scores, shape = cnn.logits_model(discriminator), tuple(discriminator.input_shape[1:])

    def draw(step):
        noise = noise_batch(_key(section["seed"], step, NOISE_STREAM), count, shape, sources)
        attacked = ascend(scores, noise, 0.0, 1.0, section["attack_steps"], section["attack_step_size"],
                          in_log_probability)
        return tf.concat([draw_outliers(step)[count:], attacked], axis=0)

    return draw


def _in_distribution(data):
    """data with every label "in" (1 of 2 outputs): the discriminator's class images are the training data."""
    relabelled = dict(data)
    for split in ("train", "val", "test"):
        if f"y_{split}" in data:
            relabelled[f"y_{split}"] = np.ones(len(data[f"y_{split}"]), np.int64)
    return relabelled


def check_classifier_precision(classifier):
    """Refuse, before any training, a classifier prood cannot sit beside: its discriminator is bounded in float32."""
    if cnn.precision_of(classifier) != "none":
        raise UserError(f"defence 'prood' bounds its discriminator in float32, but the classifier computes in "
                        f"{cnn.precision_of(classifier)}; set train.mixed_precision = \"none\"")


def with_discriminator(classifier, data, config, progress=print, writer=None):
    """ProoD: a discriminator trained beside the unchanged classifier; returns (combined model or None, metrics).

    The discriminator (cnn.build_discriminator: classifier's network, starting from its weights)
    trains for train.num_steps steps with config's [train] schedule, the training digits labelled
    "in" and the outlier pool on the bound (prood). metrics are the trainer's, with test_accuracy
    the combined model's (the classifier's) and in_fraction the share of test digits the
    discriminator calls "in"; the model is None where that training was interrupted or diverged.
    """
    check_classifier_precision(classifier)
    import keras

    section = config["train"]
    keras.utils.set_random_seed(section["seed"])  # The discriminator's new logits layer: a seeded run repeats.
    discriminator = cnn.build_discriminator(classifier)
    trainer.compile_for_training(discriminator, trainer.learning_rate_schedule(section))
    term = prood(discriminator, data["x_train"], config["defence"], section["num_steps"])
    progress(f"prood: training a discriminator beside the classifier for {section['num_steps']} steps, "
             f"{config['defence']['outlier_batch']} outliers a step on the eps-ball bound")
    discriminator, metrics = trainer.train(_in_distribution(data), config, model=discriminator, progress=progress,
                                           writer=writer, extra_term=term)
    metrics["in_fraction"] = metrics["test_accuracy"]
    if metrics["interrupted"] or metrics["diverged"]:
        return None, metrics
    _warn_if_collapsed(metrics["in_fraction"], config["defence"]["eps"])
    combined = cnn.combine_with_discriminator(classifier, discriminator)
    if "x_test" in data:
        metrics["test_accuracy"] = trainer.accuracy(combined, data["x_test"], data["y_test"])
    return combined, metrics


def _warn_if_collapsed(in_fraction, eps):
    """Loud, on stderr: a discriminator that calls most test images "out" learned no separation. Its
    combined model keeps the classifier's accuracy and looks like a result; its p(in) is about constant."""
    if in_fraction is not None and in_fraction < COLLAPSED_IN_FRACTION:
        print(f"PROOD DISCRIMINATOR COLLAPSED: it calls {in_fraction:.1%} of the test images \"in\", so its "
              f"p(in) separates nothing; its interval bounds over the eps = {eps} balls were too loose to learn "
              "(docs/results.md, Fashion-MNIST); try a smaller defence.eps or more steps", file=sys.stderr)


TERMS = {"outlier_exposure": outlier_exposure, "acet": acet, "good": good}
CLASSIFIER_KEPT = ("prood",)  # Defences that leave the classifier's training alone (with_discriminator).


def make_term(method, model, training_images, section, num_steps):
    """The trainer.ExtraTerm of defence method ("none", or one that keeps the classifier: None) for model, from
    the [defence] section (or a part of it: the keys it lacks take their defaults); the keys the method does
    not read are left out."""
    if method == "none" or method in CLASSIFIER_KEPT:
        return None
    parameters = {key: value for key, value in section.items() if key in PARAMETERS[method]}
    return TERMS[method](model, training_images, parameters, num_steps)


def study_term(model, data, config, round_index, num_steps):
    """The extra term of a study round: augment.target's defence, its draws seeded anew each round; else None."""
    method = config["augment"]["target"]
    if method not in TERMS:
        return None
    return make_term(method, model, data["x_train"], round_section(config, round_index), num_steps)


def round_section(config, round_index):
    """The [defence] section of a study round: its draws seeded anew each round (defence.seed + round)."""
    return {**config["defence"], "seed": config["defence"]["seed"] + round_index}
