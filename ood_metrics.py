"""The numbers an out-of-distribution evaluation reports, from confidences and distances alone.

Two threat models, as issue 23 sets them:

- eps-ball (Hein et al. CVPR 2019, "ACET"; Bitterwolf et al. NeurIPS 2020, "GOOD"): each
  out-of-distribution point may move anywhere within an l-infinity ball. AUC, AAUC and
  GAUC say how well the model's top-class confidence tells in-distribution test images
  from those points: as they are, after the worst attack found in the ball, and at a
  certified upper bound over the whole ball. Beside them, the fraction of points an attack
  brought to p >= cap, and the fraction certified never to get there.
- unbounded: attacks start from noise and may reach any image in [0, 1]. An image counts as
  fooled only if it also looks like no training image (novelty_threshold); one that came
  as close to a training image as real test images do drew a class image, counted apart.

No model is run here: the evaluation passes in probabilities, bounds and distances.
"""
import numpy as np

import attacks

OUTCOMES = ("fooled", "class_image", "not_fooled")  # classify_unbounded's verdicts.
# A certified bound may sit this far below a confidence an attack reached (float32 rounding)
# before it is called unsound.
BOUND_TOLERANCE = 1e-5


def _scores(values, name):
    values = np.asarray(values, np.float64).ravel()
    if not len(values):
        raise ValueError(f"{name} is empty: an AUC needs at least one score on each side")
    return values


# ------------------------------------------------------------------ the eps-ball


def log_confidence(logits, num_classes):
    """Each image's log top-class probability (N,) from its logits, over the first num_classes outputs
    (the softmax over all of them): the top probability's log without its rounding, as the attacks'
    "max_confidence" objective raises it.

    -log1p(sum over the other outputs j of exp(z_j - z_top)), in float64: it tells apart margins of
    20 and 30 (probabilities 1 - 2e-9 and 1 - 9e-14, both exactly 1.0 in float32, and log_softmax's
    z_top - logsumexp(z) is 0.0 for both in float32) up to margins of about 700.
    """
    logits = np.asarray(logits, np.float64)
    if not 1 <= num_classes <= logits.shape[1]:  # A model's extra "none" output is no class.
        raise ValueError(f"num_classes {num_classes} must be between 1 and the {logits.shape[1]} outputs")
    rows = np.arange(len(logits))
    top = logits[:, :num_classes].argmax(axis=1)
    others = np.exp(logits - logits[rows, top][:, None])
    others[rows, top] = 0.0
    return -np.log1p(others.sum(axis=1))


def auc_columns(in_scores, clean_scores, attacked_scores=None, certified_scores=None):
    """AUC, AAUC and GAUC in percent: P(an in-distribution test image is more confident than an
    out-of-distribution point), ties counted half; 100 is a perfect detector, 50 a coin.

    Each OOD point is scored by its confidence as it is (AUC), by the highest one an attack
    reached in its ball (AAUC; never below its clean confidence, since the point is in its
    own ball), and by its certified upper bound over the ball (GAUC). A column whose scores
    are not given is None.

    >>> columns = auc_columns([0.9, 0.8, 0.7], [0.1, 0.8, 0.95, 0.5], attacked_scores=[0.2, 0.8, 0.95, 0.99])
    >>> columns["auc"], columns["aauc"], columns["gauc"]
    (62.5, 37.5, None)

    (AUC: 0.9 beats 0.1, 0.8, 0.5; 0.8 beats 0.1, 0.5 and ties 0.8; 0.7 beats 0.1, 0.5:
    7.5 of 12 pairs. AAUC, against 0.2, 0.8, 0.95, 0.99: 2 + 1.5 + 1 = 4.5 of 12.)
    """
    in_scores, clean_scores = _scores(in_scores, "in_scores"), _scores(clean_scores, "clean_scores")
    columns = {"auc": 100 * attacks.roc_auc(clean_scores, in_scores), "aauc": None, "gauc": None}
    worst = clean_scores
    if attacked_scores is not None:
        worst = np.maximum(clean_scores, _same_points(attacked_scores, clean_scores, "attacked_scores"))
        columns["aauc"] = 100 * attacks.roc_auc(worst, in_scores)
    if certified_scores is not None:
        bounds = _same_points(certified_scores, clean_scores, "certified_scores")
        if np.any(bounds < worst - BOUND_TOLERANCE):
            point = int(np.argmax(worst - bounds))
            raise ValueError(f"certified bound {bounds[point]} of point {point} is below the confidence "
                             f"{worst[point]} reached there: the bound is unsound")
        columns["gauc"] = 100 * attacks.roc_auc(bounds, in_scores)
    return columns


def _same_points(values, clean_scores, name):
    values = np.asarray(values, np.float64).ravel()
    if len(values) != len(clean_scores):
        raise ValueError(f"{name} has {len(values)} points, clean_scores {len(clean_scores)}: they must be the same")
    return values


def worst_case(confidences_by_attack):
    """Each point's highest confidence over the attacks, and which attack reached it.

    confidences_by_attack maps an attack's name to its (N,) confidences on the same N
    points; include "clean" (the points as they are) so that no worst case falls below the
    clean confidence. A tie goes to "clean", then to the attack first by name, so the same
    numbers always name the same attack (no attack is credited for what the point already had).
    Returns {"confidence": (N,), "attack": (N,) names, "counts": {attack: points it was worst on}}.
    """
    if not confidences_by_attack:
        raise ValueError("worst_case needs at least one attack's confidences")
    names = sorted(confidences_by_attack, key=lambda name: (name != "clean", name))
    columns = [np.asarray(confidences_by_attack[name], np.float64).ravel() for name in names]
    lengths = {name: len(column) for name, column in zip(names, columns)}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"every attack must score the same points; the lengths differ: {lengths}")
    table = np.stack(columns, axis=1)  # (N, attacks)
    best = np.argmax(table, axis=1)  # The first maximum: the tie order above.
    counts = np.bincount(best, minlength=len(names))
    return {"confidence": table[np.arange(len(table)), best], "attack": np.asarray(names)[best],
            "counts": {name: int(count) for name, count in zip(names, counts)}}


def _fraction(hits, name):
    hits = np.asarray(hits, bool)
    low, high = attacks.wilson_interval(int(hits.sum()), len(hits))
    return {name: int(hits.sum()), "count": int(len(hits)), "fraction": float(hits.mean()) if len(hits) else 0.0,
            "interval": [low, high]}


def fooled_fraction_in_ball(confidences, cap):
    """The points whose (worst-case attacked) confidence reached cap: count, fraction, 95% Wilson interval."""
    return _fraction(np.asarray(confidences) >= cap, "fooled")


def certified_fraction(bounds, cap):
    """The points whose certified bound is below cap, so that no attack can ever fool them there."""
    return _fraction(np.asarray(bounds) < cap, "certified")


# ------------------------------------------------------------------- unbounded


def own_class_distances(data, count=None):
    """Each test image's mean squared pixel distance to the nearest training image of its own
    class (the first count test images; all by default): how far real class images lie."""
    images, labels = data["x_test"][:count], np.asarray(data["y_test"][:count]).ravel()
    return attacks.nearest_training_distances(data, images, labels)


def novelty_threshold(test_distances, quantile=0.99):
    """The nearest-training distance above which an image looks like no training image.

    The smallest distance at or below which `quantile` of the test images' own distances
    fall, so that at most 1 - quantile of real test images would be called novel.
    """
    test_distances = np.asarray(test_distances, np.float64).ravel()
    if not len(test_distances):
        raise ValueError("novelty_threshold needs the test images' distances; none were given")
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile {quantile} must be in (0, 1]")
    return float(np.quantile(test_distances, quantile, method="inverted_cdf"))


def classify_unbounded(probabilities_of_target, distances, cap, threshold):
    """Each attacked image's verdict (N,): "fooled", "class_image" or "not_fooled".

    "fooled": p(target) >= cap and its nearest-training distance above threshold (it looks
    like no training image). "class_image": p(target) >= cap but as near a training image as
    real test images are: the attack drew a class image, which is no fault of the model.
    """
    probabilities, distances = np.asarray(probabilities_of_target).ravel(), np.asarray(distances).ravel()
    if len(probabilities) != len(distances):
        raise ValueError(f"{len(probabilities)} probabilities but {len(distances)} distances")
    reached = probabilities >= cap
    novel = distances > threshold
    return np.where(reached & novel, "fooled", np.where(reached, "class_image", "not_fooled"))


def unbounded_summary(outcomes, threshold):
    """Counts and fractions of each verdict, the 95% Wilson interval of "fooled", and the threshold used."""
    outcomes = np.asarray(outcomes)
    summary = {"count": int(len(outcomes)), "threshold": float(threshold)}
    for outcome in OUTCOMES:
        hits = int(np.sum(outcomes == outcome))
        summary[outcome] = hits
        summary[f"{outcome}_fraction"] = hits / len(outcomes) if len(outcomes) else 0.0
    summary["fooled_interval"] = list(attacks.wilson_interval(summary["fooled"], len(outcomes)))
    return summary
