"""The attack suite: how hard is a model to fool, by every attack a reviewer would try?

A defence that only stops the attack it was built against proves nothing (Carlini et al.
2019, "On Evaluating Adversarial Robustness"; Athalye et al. 2018). preprocess_data.py
runs this suite on the original model and on every round's model, on the same starts
(attack_examples uniform-noise images per class, drawn as backwork draws them), and
reports for each attack the fraction of images it brought to p(class) >= prob_cap_min
(the full softmax, a "none" output included), a 95% Wilson interval, the median steps of
the fooled ones and their mean squared pixel distance to the nearest training image of
the class (real digits are 0.004-0.033 from theirs):

- backwork with each loss of [augment] attacks ("probability", "log_probability",
  "margin"; backwork_cost.label_loss), distance terms and re-initialisation included, at
  the round's budget (backwork.max_num_steps). The strongest of them is then run again
  with the budget doubled twice and restarted with three other seeds: the table is
  converged only if neither added more than CONVERGED_WITHIN of the images.
- "pgd": the Adversarial Robustness Toolbox's targeted ProjectedGradientDescent, an
  implementation independent of ours, over the logits with cross-entropy, eps = 1 (only
  the [0, 1] box binds) and no distance terms.
- "square": ART's SquareAttack, gradient-free (random square patches kept when they lower
  the logit margin), so a flat or masked gradient does not stop it.
- "transfer": fooling images made on other models (the original's held-out set, and an
  independently trained model's with --transfer-from) scored on this one.

On the undefended model every attack must fool at least SANITY_FRACTION of its images;
one that does not is misconfigured (a wrong loss sign, a clipped step, a broken library
call), so the run says so loudly and marks its rows misconfigured in every round: the
tables print that instead of its numbers, and no conclusion uses them.

none_scores and separation measure the other half of a defence: how well its "none"
score tells test digits from fooling images, noise and natural non-digits (ROC AUC and
the rejection rate at the threshold that keeps 99% of test digits).
"""
import math
import time

import numpy as np

import backwork_cost
import backwork_loop
import cnn
import configurator
import datasets
import results_format

SANITY_FRACTION = 0.9  # On the undefended model an attack must fool at least this fraction.
CONVERGED_WITHIN = 0.025  # Doubling the budget or restarting may add at most this (2 of 80 images).
RESTART_SEEDS = 3  # Restarts of the strongest backwork loss, each with another seed.
BUDGET_DOUBLINGS = 2  # The strongest loss also runs with 2x and 4x the round's budget.
GRADIENT_ATTACKS = ("pgd",)
GRADIENT_FREE_ATTACKS = ("square",)
ATTACKS = configurator.BACKWORK_LOSSES + GRADIENT_ATTACKS + GRADIENT_FREE_ATTACKS + ("transfer",)


# ------------------------------------------------------------------------- statistics


def wilson_interval(successes, count, z=1.96):
    """The 95% Wilson score interval of a binomial fraction: (low, high), (0, 1) for no trials.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or count
    successes, which is where a defence's numbers live.
    """
    if count == 0:
        return 0.0, 1.0
    fraction = successes / count
    denominator = 1 + z * z / count
    centre = (fraction + z * z / (2 * count)) / denominator
    half = z * math.sqrt(fraction * (1 - fraction) / count + z * z / (4 * count * count)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def attack_row(steps, distances, budget, unit):
    """One attack's numbers from each image's steps to fool (-1: never) and nearest-training distance."""
    steps = np.asarray(steps, np.int64)
    fooled = (steps >= 0) & (steps <= budget)
    low, high = wilson_interval(int(fooled.sum()), len(steps))
    return {"fooled": int(fooled.sum()), "count": int(len(steps)), "fooled_fraction": float(fooled.mean()),
            "interval": [low, high], "median_steps": float(np.median(steps[fooled])) if fooled.any() else None,
            "distance": float(np.mean(np.asarray(distances)[fooled])) if fooled.any() else None,
            "budget": int(budget), "unit": unit}


# ----------------------------------------------------------------------- the starts


def starts(data, labels, count, seed):
    """Uniform-noise starts, count per class, the first images backwork draws with this seed: (N, H, W, C), (N,)."""
    images = [backwork_loop.initial_images(data["x_train"][:1], count, np.random.default_rng([seed, label]), False)
              for label in labels]
    return np.concatenate(images), np.repeat(np.asarray(labels, np.int64), count)




def nearest_training_distances(data, images, targets):
    """Each image's mean squared pixel distance to the nearest training image of its class."""
    distances = np.zeros(len(images), np.float32)
    for label in np.unique(targets):
        rows = targets == label
        distances[rows] = backwork_cost.nearest_distances(images[rows], data["x_train"][data["y_train"] == label])
    return distances


# ------------------------------------------------------------------- the library's


def art_classifier(model):
    """ART's view of model: the logits (ART's attacks want scores before the softmax), boxed to [0, 1]."""
    import warnings

    import keras

    with warnings.catch_warnings():  # ART says at import that it found no PyTorch, which it needs not here.
        warnings.filterwarnings("ignore", message="PyTorch not found")
        from art.estimators.classification import TensorFlowV2Classifier


    return TensorFlowV2Classifier(model=cnn.logits_model(model), nb_classes=model.output_shape[-1],
                                  input_shape=tuple(model.input_shape[1:]), clip_values=(0.0, 1.0),
                                  loss_object=keras.losses.CategoricalCrossentropy(from_logits=True))




def run_pgd(model, images, targets, cap, iterations, step_size, check_every=10, progress=print):
    """ART's targeted PGD from images; returns the final images and each one's steps to fool (-1: never).

    PGD is run check_every iterations at a time from where it stopped, which with eps = 1
    (the projection never binds, only the [0, 1] box) and no random start is the same
    trajectory as one long run; an image that reaches the cap leaves the batch, so the
    steps are exact to check_every iterations and the fooled ones cost nothing more.
    """
    classifier, classes = art_classifier(model), model.output_shape[-1]  # First: it imports ART quietly.
    from art.attacks.evasion import ProjectedGradientDescent

    images, steps = images.copy(), np.full(len(images), -1, np.int64)
    done = 0
    while done < iterations:
        moving = np.flatnonzero(steps < 0)
        if not len(moving):
            break
        chunk = min(check_every, iterations - done)
        attack = ProjectedGradientDescent(classifier, norm=np.inf, eps=1.0, eps_step=step_size, max_iter=chunk,
                                          targeted=True, num_random_init=0, batch_size=len(moving),
                                          verbose=False)
        images[moving] = attack.generate(images[moving], y=datasets.one_hot(targets[moving], classes))
        done += chunk
        reached = cnn.target_probabilities(model, images[moving], targets[moving]) >= cap
        steps[moving[reached]] = done
    progress(f"  pgd: {np.mean(steps >= 0):.0%} fooled after {done} iterations")
    return images, steps


def run_square(model, images, targets, cap, queries, seed, progress=print):
    """ART's targeted SquareAttack; returns the final images and the queries each needed (-1: never).

    ART's Square is untargeted as it ships: its loss is the true class's logit margin and
    its criterion "no longer that class". Here the loss is the largest other logit minus
    the target's, which it lowers, and the criterion is p(target) >= cap. The criterion is
    called on the whole batch before each iteration, and each iteration evaluates one new
    candidate per image, so the call at which an image first passes counts its queries.
    """
    classifier, classes = art_classifier(model), model.output_shape[-1]  # First: it imports ART quietly.
    from art.attacks.evasion import SquareAttack

    steps, calls = np.full(len(images), -1, np.int64), [0]

    def margin(batch, target_rows):
        logits = classifier.predict(batch, batch_size=len(batch))
        wanted = target_rows.argmax(axis=1)
        target_logits = logits[np.arange(len(batch)), wanted]
        logits[np.arange(len(batch)), wanted] = -np.inf
        return logits.max(axis=1) - target_logits

    def reached(logits, target_rows):
        logits = logits - logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        passed = probabilities[np.arange(len(logits)), target_rows.argmax(axis=1)] >= cap
        if len(logits) == len(images):  # The whole batch, in order: the per-iteration check.
            steps[passed & (steps < 0)] = calls[0]
            calls[0] += 1
        return passed

    np.random.seed(seed)  # ART draws its squares from NumPy's global generator.
    # ART's first square covers p_init of the image (0.8 by default); on a small or narrow image that
    # square is wider than its shorter side and ART fails to place it. 0.8 where it fits (MNIST).
    height, width = images.shape[1:3]
    p_init = min(0.8, (min(height, width) - 1) ** 2 / (height * width))
    attack = SquareAttack(classifier, norm=np.inf, eps=1.0, max_iter=queries, nb_restarts=1, p_init=p_init,
                          batch_size=len(images), verbose=False, loss=margin, adv_criterion=reached)
    final = attack.generate(images.copy(), y=datasets.one_hot(targets, classes)).astype(np.float32)
    # The last iteration's candidate is accepted after the last check: count it here.
    late = (cnn.target_probabilities(model, final, targets) >= cap) & (steps < 0)
    steps[late] = queries + 1
    progress(f"  square: {np.mean(steps >= 0):.0%} fooled within {queries} queries")
    return final, steps


# --------------------------------------------------------------------------- the suite


class AttackSuite:
    """[augment] attacks, run on one model after another with the same starts and settings."""

    def __init__(self, data, config, num_classes, transfer_sets=None, progress=print):
        augment = config["augment"]
        self.data, self.progress, self.augment = data, progress, augment
        self.backwork = {**config["backwork"], "num_examples": augment["attack_examples"]}
        self.labels = list(range(num_classes))
        self.cap, self.budget = self.backwork["prob_cap_min"], self.backwork["max_num_steps"]
        self.attacks = list(augment["attacks"])
        self.disabled = {}  # attack -> why it was left out (the sanity check)
        self.images, self.targets = starts(data, self.labels, augment["attack_examples"], self.backwork["seed"])
        # name -> (images, targets, nearest-training distances), made on other models once.
        self.transfer_sets = transfer_sets or {}

    def enabled(self, attack):
        return attack in self.attacks

    def run(self, model):
        """({attack: row}, {loss: backwork results}, {attack: final images}) for one model."""
        rows, backworked, finals, cache = {}, {}, {}, {}
        for loss in filter(self.enabled, configurator.BACKWORK_LOSSES):
            backworked[loss], rows[loss] = self._backwork(model, loss, self.backwork["seed"], self.budget, cache)
            finals[loss] = results_format.final_images(backworked[loss])
        for name in self.disabled.keys() & rows.keys():
            rows[name]["misconfigured"] = True
        if backworked and not rows[strongest_loss(rows)].get("misconfigured"):
            strongest = strongest_loss(rows)
            rows[strongest]["convergence"] = self._convergence(model, strongest, backworked[strongest], cache)
        del cache  # The training activations of every class: gigabytes for MNIST.
        if self.enabled("pgd"):
            rows["pgd"], finals["pgd"] = self._library_attack(model, "pgd")
        if self.enabled("square"):
            rows["square"], finals["square"] = self._library_attack(model, "square")
        if self.enabled("transfer"):
            for name, (images, targets, distances) in self.transfer_sets.items():
                fooled = cnn.target_probabilities(model, images, targets) >= self.cap
                rows[f"transfer_{name}"] = {**attack_row(np.where(fooled, 0, -1), distances, 0, "none"),
                                            "family": "transfer"}
        for name in self.disabled.keys() & rows.keys():
            rows[name]["misconfigured"] = True
        return rows, backworked, finals

    def _backwork(self, model, loss, seed, max_steps, cache):
        start = time.perf_counter()
        options = {**self.backwork, "loss": loss, "seed": seed, "max_num_steps": max_steps}
        results = backwork_loop.backwork_labels(self.data, options, model, self.labels,
                                                progress=lambda line: None, reference_cache=cache)
        steps, distances = results_format.steps_and_distances(results)
        row = {**attack_row(steps, distances, max_steps, "steps"), "family": "backwork",
               "seed": seed, "seconds": time.perf_counter() - start}
        self.progress(f"  backwork {loss} (seed {seed}, {max_steps} steps): {row['fooled']}/{row['count']} fooled "
                      f"in {row['seconds']:.0f} s")
        return results, row

    def _convergence(self, model, loss, results, cache):
        """The strongest loss with the budget doubled twice and three other seeds: did the fraction stop rising?"""
        steps, _ = results_format.steps_and_distances(results)
        budgets = [self.budget * 2 ** doubling for doubling in range(BUDGET_DOUBLINGS + 1)]
        if np.all(steps >= 0):
            return {"fooled_within": {str(budget): 1.0 for budget in budgets}, "restart_seeds": [],
                    "any_seed_fraction": 1.0, "best_fraction": 1.0,
                    "best_interval": list(wilson_interval(len(steps), len(steps))),
                    "converged": True, "note": "every image was fooled within the round's budget"}
        longest, _ = self._backwork(model, loss, self.backwork["seed"], budgets[-1], cache)
        long_steps, _ = results_format.steps_and_distances(longest)
        within = {str(budget): float(np.mean((long_steps >= 0) & (long_steps <= budget))) for budget in budgets}
        any_seed, best = steps >= 0, long_steps >= 0
        seeds = [self.backwork["seed"] + 100 + restart for restart in range(1, RESTART_SEEDS + 1)]
        for seed in seeds:
            restarted, _ = self._backwork(model, loss, seed, self.budget, cache)
            any_seed |= results_format.steps_and_distances(restarted)[0] >= 0
        best |= any_seed
        added_by_budget = within[str(budgets[-1])] - within[str(budgets[-2])]
        added_by_restarts = float(any_seed.mean() - np.mean(steps >= 0))
        return {"fooled_within": within, "restart_seeds": seeds, "any_seed_fraction": float(any_seed.mean()),
                "added_by_last_doubling": added_by_budget, "added_by_restarts": added_by_restarts,
                "best_fraction": float(best.mean()),
                "best_interval": list(wilson_interval(int(best.sum()), len(best))),
                # The small margin keeps 1 of 40 images (exactly 0.025 up to float rounding) within the bound.
                "converged": bool(max(added_by_budget, added_by_restarts) <= CONVERGED_WITHIN + 1e-9)}

    def _library_attack(self, model, attack):
        start, augment = time.perf_counter(), self.augment
        if attack == "pgd":
            images, steps = run_pgd(model, self.images, self.targets, self.cap, augment["pgd_steps"],
                                    augment["pgd_step_size"], progress=self.progress)
            budget, unit = augment["pgd_steps"], "iterations"
        else:
            images, steps = run_square(model, self.images, self.targets, self.cap, augment["square_queries"],
                                       self.backwork["seed"], progress=self.progress)
            budget, unit = augment["square_queries"] + 1, "queries"
        distances = nearest_training_distances(self.data, images, self.targets)
        family = "library (gradient)" if attack in GRADIENT_ATTACKS else "library (gradient-free)"
        return {**attack_row(steps, distances, budget, unit), "family": family,
                "seconds": time.perf_counter() - start}, images

    def check_sanity(self, rows):
        """On the undefended model: leave out, loudly, every attack that did not fool (about) every image."""
        failed = [name for name, row in rows.items()
                  if row["family"] != "transfer" and row["fooled_fraction"] < SANITY_FRACTION]
        for name in failed:
            self.disabled[name] = (f"fooled {rows[name]['fooled_fraction']:.0%} of the undefended model's images, "
                                   f"below the {SANITY_FRACTION:.0%} any working attack reaches")
            rows[name]["misconfigured"] = True
            rows[name].pop("convergence", None)
        return failed


def strongest_loss(rows):
    """The backwork loss that fooled most images, the fewer median steps breaking a tie; a misconfigured
    one only where every loss is (its images are still what a round can train on)."""
    losses = [loss for loss in configurator.BACKWORK_LOSSES if loss in rows]
    losses = [loss for loss in losses if not rows[loss].get("misconfigured")] or losses
    return max(losses, key=lambda loss: (rows[loss]["fooled_fraction"], -(rows[loss]["median_steps"] or math.inf)))


def strongest_attack(rows):
    """(name, fraction, interval) of the attack that fooled most, counting the strongest loss's longer runs."""
    best = None
    for name, row in rows.items():
        if row.get("misconfigured"):
            continue
        fraction, interval = row["fooled_fraction"], row["interval"]
        if "convergence" in row:
            fraction, interval = row["convergence"]["best_fraction"], row["convergence"]["best_interval"]
        if best is None or fraction > best[1]:
            best = (name, fraction, interval)
    return best


# ------------------------------------------------------------------ the "none" score


def none_scores(probabilities, num_classes):
    """How strongly a model says "none of these": p(none) with an extra output, else 1 - its top class p."""
    if probabilities.shape[1] > num_classes:
        return probabilities[:, num_classes]
    return 1.0 - probabilities[:, :num_classes].max(axis=1)


def roc_auc(negatives, positives):
    """P(a positive scores above a negative), ties counted half: the area under the ROC curve."""
    negatives = np.sort(np.asarray(negatives, np.float64))
    positives = np.asarray(positives, np.float64)
    below = np.searchsorted(negatives, positives, side="left")
    not_above = np.searchsorted(negatives, positives, side="right")
    return float(np.mean(below + 0.5 * (not_above - below)) / len(negatives))


def separation(digit_scores, other_scores, keep=0.99):
    """ROC AUC of other images against digits, and the fraction rejected where keep of the digits pass.

    The threshold is the smallest score at or below which keep of the digits fall; an
    image is rejected ("none") when its score is above it.
    """
    threshold = float(np.quantile(digit_scores, keep, method="inverted_cdf"))
    return {"auc": roc_auc(digit_scores, other_scores), "threshold": threshold,
            "rejected": float(np.mean(np.asarray(other_scores) > threshold)),
            "digits_kept": float(np.mean(np.asarray(digit_scores) <= threshold))}


def roc_curve(digit_scores, other_scores):
    """(false positive rate, true positive rate) at every threshold, for a figure: digits are the negatives."""
    digits, others = np.sort(digit_scores), np.sort(other_scores)
    thresholds = np.unique(np.concatenate([digits, others]))[::-1]
    false = 1.0 - np.searchsorted(digits, thresholds, side="left") / len(digits)
    true = 1.0 - np.searchsorted(others, thresholds, side="left") / len(others)
    return np.concatenate([[0.0], false]), np.concatenate([[0.0], true])


def fooling_numbers(model, results, cap):
    """How model classifies backworked images: mean target probability and fractions above levels."""
    probabilities = cnn.target_probabilities(model, results_format.final_images(results),
                                             results_format.final_labels(results))
    return {"mean_p": float(probabilities.mean()), "above_0.5": float(np.mean(probabilities > 0.5)),
            "above_0.99": float(np.mean(probabilities > 0.99)), "at_cap": float(np.mean(probabilities >= cap))}
