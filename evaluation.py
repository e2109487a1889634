"""Judge a model the way the out-of-distribution literature does: two threat models, 1,000+ points.

A defence that claims to fix overconfidence far from the data is judged on whole sets of
out-of-distribution points, by the worst of several attacks per point, and where it can be
by a bound that no attack can beat (Hein et al. CVPR 2019, "ACET"; Bitterwolf et al.
NeurIPS 2020, "GOOD"; Meinke et al. NeurIPS 2022, "ProoD"). Evaluation.run(model) reports:

- the eps-ball (run_ball): for each set of points that are none of the classes (uniform
  noise, letters rendered from fonts the defences never train on, and the --ood data, e.g.
  Fashion-MNIST for an MNIST model), `points` points, each free to move in its l-infinity
  ball of radius eps inside [0, 1]. Attacks raise the top-class confidence there: APGD on
  the max-confidence objective (restarts after the first from random points of the ball)
  and the gradient-free Square on a subset (a flat region stops gradients, not Square),
  both compiled (box_attacks.py) and run to the end: AAUC needs each point's highest
  confidence, not the first above the cap.
  Each point's worst case over the attacks gives AAUC; its certified upper bound from
  interval bound propagation (interval_bounds.py) gives GAUC; AUC is the points as they
  are. Beside them: the fraction of points brought to p >= cap in their ball, and the
  fraction certified never to get there, each with a 95% Wilson interval.
- the unbounded box (run_unbounded): starts_per_class starts per class from each noise
  family (ood_sets.NOISE_FAMILIES: a flat region around one family hides nothing), each
  attacked towards its class in the whole box [0, 1] by targeted APGD (cross-entropy),
  and square_starts_per_class of them per class (drawn at random from every family's starts) by
  Square. A start is fooled when some attack brought it to p(class) >= cap
  and it still looks like no training image (its nearest training image of the class is
  farther than `novelty_quantile` of the test images' own); an image as near a training
  image as real test images are is counted apart as a class image, never as fooled.

Our compiled attacks (box_attacks.py: PGD, APGD, Square) do the work; ART's PGD runs on a
few starts beside ours as the independent check (art_check), and the study's attack suite
(attacks.py) keeps ART's own Square. The sets and starts are drawn once, so every
model of a study faces the same points.
"""
import time

import numpy as np

import attacks
import box_attacks
import cnn
import common
import interval_bounds
import ood_metrics
import ood_sets

SQUARE_SIZES = (0.8, 0.3)  # Square's first square covers this fraction of the image: one run each.


# ------------------------------------------------------------------------ the points


def ball_points(data, section, ood_images=None):
    """{set name: (points, H, W, C) float32}: the eps-ball's points, drawn once from section's seed."""
    shape, count, seed = data["x_test"].shape[1:], section["points"], section["seed"]
    sets = {}
    for name in section["sets"]:
        if name == "uniform":
            sets[name] = ood_sets.noise_images("uniform", count, shape, seed)
        elif name == "letters":
            images, _ = ood_sets.letters(count, shape[:2], seed, ood_sets.EVALUATION_FONTS)
            sets[name] = np.repeat(images, shape[2], axis=3) if images.shape[3] != shape[2] else images
        elif ood_images is not None:  # "ood": only where the other data was given (--ood).
            sets[name] = np.asarray(ood_images[:count], np.float32)
    return sets


def unbounded_starts(data, section, labels):
    """(images, targets, families): starts_per_class starts per class from each noise family."""
    shape, per_class = data["x_test"].shape[1:], section["starts_per_class"]
    images, targets, families = [], [], []
    for family_index, family in enumerate(section["noise_families"]):
        count = per_class * len(labels)
        source = data["x_test"] if family in ood_sets.NEEDS_SOURCE_IMAGES else None
        images.append(ood_sets.noise_images(family, count, shape, section["seed"] + family_index, source))
        targets.append(np.tile(np.asarray(labels, np.int64), per_class))
        families += [family] * count
    return np.concatenate(images), np.concatenate(targets), np.asarray(families)


def subset(count, size, seed):
    """A fixed random choice of size indices out of count (sorted): the points Square also attacks."""
    return np.sort(np.random.default_rng(seed).permutation(count)[:min(size, count)])


def square_starts(targets, per_class, seed):
    """A fixed random choice of per_class start indices of each class (sorted): the whole-box starts
    Square also attacks. Per class rather than overall so that every class has the same weight in
    the fraction the conclusion may stand on (20 per class: a Wilson half-width of about 0.07)."""
    generator, chosen = np.random.default_rng(seed), []
    for label in np.unique(targets):
        of_label = np.flatnonzero(targets == label)
        chosen.append(generator.permutation(of_label)[:min(per_class, len(of_label))])
    return np.sort(np.concatenate(chosen))


# ------------------------------------------------------------------- the evaluation


class Evaluation:
    """The points of both threat models for one dataset, drawn once; run(model) judges a model on them."""

    def __init__(self, data, config, num_classes, ood_images=None, progress=print):
        self.data, self.section, self.num_classes = data, config["evaluation"], num_classes
        self.cap, self.progress = config["backwork"]["prob_cap_min"], progress
        self.ball_sets = ball_points(data, self.section, ood_images)
        labels = [label for label in range(num_classes) if np.any(data["y_train"] == label)]
        self.starts, self.targets, self.families = unbounded_starts(data, self.section, labels)
        # How far real test images lie from the nearest training image of their class: the novelty rule.
        test_count = min(self.section["novelty_test_points"], len(data["x_test"]))
        self.test_distances = ood_metrics.own_class_distances(data, test_count)
        self.threshold = ood_metrics.novelty_threshold(self.test_distances, self.section["novelty_quantile"])

    def run(self, model):
        """Both threat models on model: {"eps", "cap", "in_distribution", "ball", "unbounded", "art_check",
        "seconds"}, every fraction with its 95% interval."""
        start, self.last_scores = time.perf_counter(), {}
        model = cnn.float32_model(model)
        test_logits = cnn.predict(cnn.logits_model(model), self.data["x_test"])  # One pass: scores and accuracy.
        in_scores = ood_metrics.log_confidence(test_logits, self.num_classes)
        report = {"eps": self.section["eps"], "cap": self.cap,
                  "in_distribution": {"count": len(in_scores), "mean_confidence": float(np.exp(in_scores).mean()),
                                      "accuracy": float(np.mean(test_logits[:, :self.num_classes]
                                                                .argmax(axis=1) == self.data["y_test"]))},
                  "ball": {name: self.run_ball(model, points, in_scores, name)
                           for name, points in self.ball_sets.items()}}
        report["unbounded"] = self.run_unbounded(model)
        report["art_check"] = self.art_check(model)
        report["seconds"] = time.perf_counter() - start
        return report

    # -- the eps-ball

    def _log_confidence(self, model, images):
        """Each image's log top-class probability, from its logits: the eps-ball's score.

        Ranked in log space because a confident network's top probability rounds to exactly 1.0
        in float32 for many test images (a fifth of them for the default network), and so do an
        attacked point's and a loose bound's: as probabilities those would tie, and an AUC counts
        ties half, crediting a model with no certificate at all with a GAUC of 10. The bounds
        (float32) can still round up to 0.0: that only lowers GAUC, never raises it.
        """
        return ood_metrics.log_confidence(cnn.predict(cnn.logits_model(model), images), self.num_classes)

    def run_ball(self, model, points, in_scores, name):
        """One set's AUC / AAUC / GAUC, fooled and certified fractions, and which attack was worst how often.

        in_scores and every score here are log top-class probabilities (see _log_confidence) of the
        points and of the images the attacks found; the certified bounds are their logs too.
        """
        start, section, eps = time.perf_counter(), self.section, self.section["eps"]
        clean = self._log_confidence(model, points)
        lower, upper = box_attacks.ball(points, eps)
        # No early stop at the cap here: AAUC ranks each point's highest confidence against the test images'
        # (most above 0.9999), so an attack that stopped at the cap would understate it.
        found = self._apgd(model, points, lower, upper, "max_confidence", None, cap=None)
        # Scored again from the images the attacks found, in float64 (their own objective is float32's log_softmax).
        confidences = {"clean": clean, "apgd": self._log_confidence(model, found["images"])}
        chosen = subset(len(points), section["square_points"], section["seed"])
        for size in SQUARE_SIZES:
            square = np.array(clean)  # Points Square did not attack keep their clean confidence.
            if len(chosen):
                found = self._square(model, points[chosen], lower[chosen], upper[chosen], "max_confidence", None,
                                     size, cap=None)
                square[chosen] = self._log_confidence(model, found["images"])
            confidences[f"square_{size}"] = square
        worst = ood_metrics.worst_case(confidences)
        bound = self._bounds(model, points)
        columns = ood_metrics.auc_columns(in_scores, clean, worst["confidence"], bound)
        self.last_scores[name] = {"in_distribution": in_scores, "clean": clean, "attacked": worst["confidence"],
                                  "certified": bound}  # For the figure's ROC curves.
        self.progress(f"  eps-ball {name} ({len(points)} points, eps {eps}): AUC {columns['auc']:.1f}  "
                      f"AAUC {columns['aauc']:.1f}  GAUC "
                      + ("-" if columns["gauc"] is None else f"{columns['gauc']:.1f}"))
        attacked, certain = np.exp(worst["confidence"]), None if bound is None else np.exp(bound)
        return {**columns, "count": len(points), "mean_clean": float(np.exp(clean).mean()),
                "mean_attacked": float(attacked.mean()), "mean_bound": None if bound is None else float(certain.mean()),
                "fooled": ood_metrics.fooled_fraction_in_ball(attacked, self.cap),
                "certified": None if bound is None else ood_metrics.certified_fraction(certain, self.cap),
                "worst_attack": worst["counts"], "square_points": len(chosen),
                "seconds": time.perf_counter() - start}

    def _square(self, model, images, lower, upper, objective, targets, size, cap):
        """Our compiled Square (box_attacks.square), its first square covering size of the image."""
        return box_attacks.square(model, images, lower, upper, objective, targets, queries=self.section["square_queries"],
                                  p_init=size, seed=self.section["seed"], cap=cap, num_classes=self.num_classes)

    def _bounds(self, model, points):
        """Certified upper bounds on the top-class confidence over each ball, or None for a model they
        cannot bound (a layer interval_bounds does not know): the report then says so."""
        try:
            interval_bounds.check_model_supported(model)
        except common.UserError as error:
            self.progress(f"  no certified bound: {error}")
            return None
        return interval_bounds.log_confidence_upper_bounds(model, points, self.section["eps"], self.num_classes)

    # -- the whole box

    def run_unbounded(self, model):
        """Per start the worst verdict over the attacks; summaries per attack, per family and overall."""
        start, section = time.perf_counter(), self.section
        lower, upper = box_attacks.whole_box(self.starts)
        found = self._apgd(model, self.starts, lower, upper, "cross_entropy", self.targets, cap=self.cap)
        finals = {"apgd": (found["images"], found["confidence"])}
        chosen = square_starts(self.targets, section["square_starts_per_class"], section["seed"])
        start_confidence = cnn.target_probabilities(model, self.starts, self.targets)  # Starts Square did not attack.
        for size in SQUARE_SIZES:
            images, confidence = self.starts.copy(), start_confidence.copy()
            if len(chosen):
                found = self._square(model, self.starts[chosen], lower[chosen], upper[chosen], "margin",
                                     self.targets[chosen], size, cap=self.cap)
                images[chosen], confidence[chosen] = found["images"], found["confidence"]
            finals[f"square_{size}"] = (images, confidence)
        verdicts = {name: self._verdicts(images, confidence) for name, (images, confidence) in finals.items()}
        worst = worst_verdict(verdicts)
        summarise = ood_metrics.unbounded_summary
        summary = {"starts": len(self.starts), "threshold": self.threshold, "square_starts": len(chosen),
                   "worst": summarise(worst, self.threshold),
                   # Each attack on the starts it ran on: Square's fraction is of its subset, not of every start.
                   "by_attack": {name: summarise(outcomes if name == "apgd" else outcomes[chosen], self.threshold)
                                 for name, outcomes in verdicts.items()},
                   "all_attacks": summarise(worst[chosen], self.threshold),
                   "by_family": {family: summarise(worst[self.families == family], self.threshold)
                                 for family in section["noise_families"]},
                   "seconds": time.perf_counter() - start}
        summary["strongest"] = strongest(summary)
        fooled = summary["strongest"]
        self.progress(f"  unbounded ({len(self.starts)} starts): fooled {fooled['fooled_fraction']:.3f} "
                      f"[{fooled['fooled_interval'][0]:.3f}, {fooled['fooled_interval'][1]:.3f}] "
                      f"({fooled['over']}), class images {fooled['class_image']}")
        return summary

    def _verdicts(self, images, confidence):
        distances = attacks.nearest_training_distances(self.data, images, self.targets)
        return ood_metrics.classify_unbounded(confidence, distances, self.cap, self.threshold)

    def _apgd(self, model, images, lower, upper, objective, targets, cap=None):
        """APGD over the images in batches of evaluation.batch_size (one compiled loop per batch size); an
        image stops at cap (the unbounded count needs only that), None runs every step."""
        section, results = self.section, []
        for first in range(0, len(images), section["batch_size"]):
            rows = slice(first, first + section["batch_size"])
            results.append(box_attacks.apgd(
                model, images[rows], lower[rows], upper[rows], objective, None if targets is None else targets[rows],
                steps=section["apgd_steps"], restarts=section["apgd_restarts"], seed=section["seed"] + first,
                cap=cap, num_classes=self.num_classes))
        return {name: np.concatenate([result[name] for result in results]) for name in results[0]}

    # -- the independent check

    def art_check(self, model):
        """Our PGD and ART's, the same targeted PGD from the same starts in the whole box: fooled counts
        with intervals, which must overlap (they are two implementations of one attack)."""
        section = self.section
        chosen = subset(len(self.starts), section["art_check_points"], section["seed"] + 1)
        images, targets = self.starts[chosen], self.targets[chosen]
        lower, upper = box_attacks.whole_box(images)
        ours = box_attacks.pgd(model, images, lower, upper, "cross_entropy", targets, steps=section["apgd_steps"],
                               step_size=0.01, cap=self.cap, num_classes=self.num_classes)
        _, art_steps = attacks.run_pgd(model, images, targets, self.cap, section["apgd_steps"], 0.01,
                                       progress=lambda line: None)
        rows = {"ours": ours["steps_to_cap"] >= 0, "art": art_steps >= 0}
        result = {name: {"fooled": int(hits.sum()), "count": len(hits),
                         "interval": list(attacks.wilson_interval(int(hits.sum()), len(hits)))}
                  for name, hits in rows.items()}
        low = max(result["ours"]["interval"][0], result["art"]["interval"][0])
        high = min(result["ours"]["interval"][1], result["art"]["interval"][1])
        result["agree"] = bool(low <= high)
        if not result["agree"]:
            print(f"WARNING: our PGD fooled {result['ours']['fooled']} and ART's {result['art']['fooled']} of "
                  f"{len(chosen)} starts: the two implementations disagree", flush=True)
        return result


def strongest(summary):
    """The unbounded number a conclusion stands on: the larger fooled fraction of the worst case over
    every start (APGD on all of them, Square on a subset) and over the starts every attack ran on.

    Square runs on square_starts_per_class starts per class only (it is the slow one); where it fools
    far more than APGD (a defence that flattens the gradient near noise), the subset's fraction, with its wider
    interval, is the fair number, and the fraction over every start would understate it."""
    rows = [("every start", summary["worst"]), (f"the {summary['square_starts']} starts every attack ran on",
                                               summary["all_attacks"])]
    over, row = max(rows, key=lambda pair: (pair[1]["count"] > 0, pair[1]["fooled_fraction"]))
    return {**row, "over": over}


def worst_verdict(verdicts):
    """Per start, the worst verdict over the attacks: fooled if any attack fooled it, else a class image
    if any drew one, else not fooled."""
    table = np.stack(list(verdicts.values()))  # (attacks, starts)
    return np.where((table == "fooled").any(axis=0), "fooled",
                    np.where((table == "class_image").any(axis=0), "class_image", "not_fooled"))


def table(report):
    """The evaluation as text: one line per eps-ball set, one for the unbounded worst case, the ART check."""
    lines = [f"eps-ball (eps {report['eps']}, p >= {report['cap']}):  set        points    AUC   AAUC   GAUC   "
             "fooled [95%]          certified [95%]"]
    for name, row in report["ball"].items():
        gauc = "    -" if row["gauc"] is None else f"{row['gauc']:6.1f}"
        certified = "-" if row["certified"] is None else _fraction_text(row["certified"])
        lines.append(f"{'':33}{name:<10} {row['count']:>6}  {row['auc']:5.1f}  {row['aauc']:5.1f} {gauc}   "
                     f"{_fraction_text(row['fooled']):<21} {certified}")
    worst = report["unbounded"]["strongest"]
    low, high = worst["fooled_interval"]
    lines.append(f"unbounded ({report['unbounded']['starts']} noise starts): fooled {worst['fooled_fraction']:.3f} "
                 f"[{low:.3f}, {high:.3f}] over {worst['over']}, drew a class image {worst['class_image']}")
    check = report["art_check"]
    lines.append(f"ART's PGD beside ours ({check['ours']['count']} starts): ours {check['ours']['fooled']}, "
                 f"ART {check['art']['fooled']}, {'agree' if check['agree'] else 'DISAGREE'}")
    return "\n".join(lines)


def _fraction_text(row):
    low, high = row["interval"]
    return f"{row['fraction']:.3f} [{low:.3f}, {high:.3f}]"


def headline(report):
    """The evaluation's numbers in one dict of short names, for tables and TensorBoard."""
    numbers = {"unbounded_fooled": report["unbounded"]["strongest"]["fooled_fraction"]}
    for name, row in report["ball"].items():
        numbers.update({f"{name}_{column}": row[column] for column in ("auc", "aauc", "gauc")})
        numbers[f"{name}_fooled"] = row["fooled"]["fraction"]
    return numbers
