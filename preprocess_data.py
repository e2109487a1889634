"""Augment the training set with backworked images and retrain: are the artifacts fixed?

    python preprocess_data.py --results runs/default/backwork --model runs/default/model.keras
                              [CONFIG] [--data PATH] [--out DIR] [--steps N] [--from-scratch]
                              [--rounds K] [--target uniform|extra_class|control|outlier_exposure|acet|good|prood]
                              [--seed N] [--ood NPZ] [--transfer-from MODEL]
    python preprocess_data.py --judge --model runs/default/model.keras [--ood NPZ] [CONFIG] [--out DIR]

The backworked ("fooling") images, plus blank and uniform-noise images, join the training
set as "none of the digits", and the model is retrained on it. The defences share every
line of the rounds code and differ only in what "none" means (augment.target):

- uniform: the added images get the soft label 1/classes for every class;
- extra_class: the network gets one more output, a "none of these" class (the same
  topology with classes + 1 outputs, every other weight carried over), and the added
  images are labelled with it. Backwork still targets the original classes;
- control: the same rounds of retraining with nothing added, so that a drop in fooling
  is credited to a defence only beyond what more training alone does;
- outlier_exposure, acet, good: the control's retraining plus that defence's loss term on an
  extra batch in every step (defences.py, its [defence] keys);
- prood: the classifier left as it is and a discriminator trained beside it for the round's
  steps, the two combined into one model (defences.with_discriminator); one round only.

Every image of a study is made with one [backwork] setting: fooling images made with
another (a different loss or save_freq, say) are refused with the --set that matches them.

The original model and every round's model face the attack suite (attacks.py, [augment]
attacks): backwork with each loss, the strongest with longer budgets and restarts, ART's
PGD and gradient-free Square attack, and transfer from other models, each with the
fraction fooled, its 95% Wilson interval, median steps and distance to the digits. An
attack that fails on the undefended model is reported as misconfigured and left out. The
images each round adds come from the previous round's strongest backwork loss
(augment.train_on), so the defence trains against what beats it.

Before any retraining, a held-out set is backworked from the original model with another
seed (augment.heldout_seed) and never trained on: how every round's model classifies it
says whether the defence generalises. The "none" score (p(none), or 1 - the top class
probability) is measured against test digits on the attacks' images, noise and blank
images and natural non-digits (--ood, e.g. Fashion-MNIST): ROC AUC and the rejection
rate at the threshold that keeps 99% of test digits.

The original and every round's model are also judged as the field judges a defence
(evaluation.py, [evaluation], unless augment.evaluate is false; augment.evaluate_rounds =
"final" judges the last round's model alone): in the eps-ball around
1,000 points of each out-of-distribution set (AUC, AAUC, GAUC, fooled and certified
fractions) and in the whole image box from noise starts (the worst case over the attacks,
class images apart). --judge runs that evaluation on one model alone, without a study:
report.json's "evaluation", evaluation.png and config.toml in --out (default: the
model's folder's evaluation/).

Writes, in --out: heldout/results_{label}.pkl, round{r}/model.keras,
round{r}/backwork/results_{label}.pkl (the images the next round adds) and backwork.png,
model.keras (the last round's), config.toml, report.json and report.png, and each
round's evaluation.png.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

import attacks
import backwork_loop
import cnn
import common
import configurator
import datasets
import defences
import evaluation
import figures
import results_format
import trainer
from common import UserError

TARGETS = configurator.DEFENCES
ADDING_TARGETS = ("uniform", "extra_class")  # The targets that add fooling images to the training set.

# ----------------------------------------------------------------------- augmentation


def none_targets(count, num_classes, target):
    """Training targets meaning "none of the digits": uniform over the classes, or the extra class."""
    if target == "uniform":
        return np.full((count, num_classes), 1.0 / num_classes, np.float32)
    targets = np.zeros((count, num_classes + 1), np.float32)
    targets[:, num_classes] = 1.0
    return targets


def model_outputs(num_classes, target):
    """The outputs a study's model has: the classes, plus "none" for extra_class."""
    return num_classes + (target == "extra_class")


def add_none_examples(data, images, num_classes, seed, target="uniform"):
    """Training set plus images labelled "none" (see none_targets), shuffled; other splits untouched."""
    targets = trainer.to_targets(data["y_train"], model_outputs(num_classes, target))
    all_images = np.concatenate([data["x_train"], images.astype(np.float32)])
    all_targets = np.concatenate([targets, none_targets(len(images), num_classes, target)])
    order = np.random.default_rng(seed).permutation(len(all_images))
    return {**data, "x_train": all_images[order], "y_train": all_targets[order]}


def augment_data(data, results_dir, num_classes=None, seed=0):
    """Add the final backworked images of results_dir with a uniform label (the original's name).

    num_classes defaults to the classes of the data's labels.
    """
    num_classes = num_classes or datasets.count_classes(data)
    images, _ = results_format.read_fooling_images(results_dir, data["x_train"].shape[1:], num_classes)
    return add_none_examples(data, images, num_classes, seed)


def blank_and_noise_images(shape, num_blank, num_noise, seed):
    noise = np.random.default_rng(seed).uniform(0.0, 1.0, (num_noise,) + tuple(shape)).astype(np.float32)
    return np.concatenate([np.zeros((num_blank,) + tuple(shape), np.float32), noise])


def augment_random_data(data, num_blank=800, num_noise=800, num_classes=None, seed=0):
    """Add blank and uniform-noise images with a uniform label (the original's name); num_classes as augment_data."""
    num_classes = num_classes or datasets.count_classes(data)
    images = blank_and_noise_images(data["x_train"].shape[1:], num_blank, num_noise, seed)
    return add_none_examples(data, images, num_classes, seed)


def with_extra_class(model):
    """The same network with one more output ("none of these"); every other weight carried over.

    The new class's row of the logits layer starts from Keras' own initialisation (small
    random weights, zero bias), so the old classes' scores are unchanged at the start.
    """
    import keras

    config = model.get_config()
    for layer in config["layers"]:
        if layer["name"] == "logits":
            layer["config"]["units"] += 1
    wider = keras.Model.from_config(config)
    for layer in model.layers:
        weights = layer.get_weights()
        if layer.name == "logits":
            kernel, bias = wider.get_layer("logits").get_weights()  # (units, classes + 1), (classes + 1,)
            kernel[:, :-1], bias[:-1] = weights
            weights = [kernel, bias]
        wider.get_layer(layer.name).set_weights(weights)
    return wider


# ------------------------------------------------------------------------ measurement


def fooling_numbers(model, results, cap, prefix):
    """attacks.fooling_numbers with each key prefixed by the name of the image set."""
    return {f"{prefix}_{key}": value for key, value in attacks.fooling_numbers(model, results, cap).items()}


def difficulty(results, budgets):
    """From step-exact steps_to_reach: the fraction fooled within each budget and the median steps.

    An image that never reached the cap counts as needing more than any budget; the median
    is None when fewer than half of the images were fooled at all.
    """
    steps = np.concatenate([result["steps_to_reach"] for result in results.values()]).astype(float)
    steps[steps < 0] = np.inf
    median = float(np.median(steps))
    return {"fooled_fraction": float(np.mean(np.isfinite(steps))),
            "fooled_within": {str(budget): float(np.mean(steps <= budget)) for budget in budgets},
            "median_steps_to_fool": median if np.isfinite(median) else None,
            "backwork_steps": int(max(result["steps"] for result in results.values()))}


def _top_digit_probability(probabilities, num_classes):
    """Mean over images of the largest probability among the original classes (an extra one left out)."""
    return float(probabilities[:, :num_classes].max(axis=1).mean())


def measure_model(model, data, sets, num_classes, cap):
    """Test accuracy over the original classes, blank/noise confidence, and each fooling set's numbers.

    sets maps a name to backwork results ({label: results}); blank and noise images come in
    data['blank'] and data['noise']. With an extra class, its probability is reported too.
    """
    probabilities = {name: cnn.predict(model, data[key])
                     for name, key in [("test", "x_test"), ("blank", "blank"), ("noise", "noise")]}
    metrics = {"test_accuracy": float(np.mean(probabilities["test"][:, :num_classes].argmax(axis=1)
                                              == data["y_test"])),
               "blank_top_prob": _top_digit_probability(probabilities["blank"], num_classes),
               "noise_top_prob": _top_digit_probability(probabilities["noise"], num_classes)}
    for name, results in sets.items():
        metrics.update(fooling_numbers(model, results, cap, name))
    if model.output_shape[-1] > num_classes:
        probabilities["heldout"] = cnn.predict(model, results_format.final_images(sets["heldout"]))
        metrics.update({f"{name}_none_prob": float(values[:, num_classes].mean())
                        for name, values in probabilities.items()})
    return metrics


# --------------------------------------------------------------------------- retraining


def retrain(model, data, config, round_index, progress=print):
    """Continue training model on data (or train a fresh one) for this round's steps (with augment.target's
    loss term where it is a defences.py one)."""
    augment = config["augment"]
    train_options = {**config["train"], "seed": augment["seed"] + round_index}
    if augment["from_scratch"]:
        import keras

        # The same architecture as the given model, freshly initialised, whatever the config says.
        keras.utils.set_random_seed(train_options["seed"])
        model = keras.models.clone_model(model)
    else:
        # The model's own schedule (train.schedule, warm-up) fitted to the retraining steps.
        train_options["num_steps"] = augment["retrain_steps"]
        train_options["warmup_steps"] = min(train_options["warmup_steps"], augment["retrain_steps"] - 1)
    if augment["target"] in defences.CLASSIFIER_KEPT:  # The classifier is not trained: it needs no optimizer.
        round_config = {**config, "train": train_options, "defence": defences.round_section(config, round_index)}
        return defences.with_discriminator(model, data, round_config, progress)
    if not augment["from_scratch"]:
        # A fresh optimizer (the original reloaded only the parameters) that restarts the step count.
        model = trainer.compile_for_training(model, trainer.learning_rate_schedule(train_options))
    extra_term = defences.study_term(model, data, config, round_index, train_options["num_steps"])
    model, metrics = trainer.train(data, {**config, "train": train_options}, model=model, progress=progress,
                                   extra_term=extra_term)
    return model, metrics


def _check_training_finished(metrics, round_index):
    """Stop the study on an interrupted or diverged retraining: its model is no round's result."""
    if metrics.get("diverged"):
        raise UserError(f"retraining in round {round_index} diverged at step {metrics['steps']}; "
                        "lower train.learning_rate (--set train.learning_rate=...) and run again")
    if metrics.get("interrupted"):
        raise KeyboardInterrupt


def backwork(model, data, config, labels, out_dir, progress=print):
    """Backwork labels of model into out_dir (results and backwork.png); returns results and seconds."""
    start = time.perf_counter()
    results = backwork_loop.backwork_labels(data, config["backwork"], model, labels, progress=progress)
    save_backwork(results, out_dir)
    return results, time.perf_counter() - start


def save_backwork(results, out_dir):
    """Every class's results_{label}.pkl and backwork.png in out_dir."""
    for result in results.values():
        results_format.save_label_results(out_dir, result)
    figures.plot_results(results, out_dir / "backwork.png")


class Study:
    """The rounds of one defence: what stays fixed across rounds, and what each round adds."""

    def __init__(self, original, data, config, trained_results, heldout_results, out_dir, progress=print,
                 suite=None, judged=None):
        self.original, self.data, self.config, self.out_dir = original, data, config, Path(out_dir)
        self.num_classes = original.output_shape[-1]
        self.cap = config["backwork"]["prob_cap_min"]
        self.sets = {"original_fooling": trained_results, "heldout": heldout_results}
        self.trained_images = results_format.final_images(trained_results)
        self.progress = progress
        self.suite = suite or attacks.AttackSuite(data, config, self.num_classes, progress=progress)
        self.judged = judged  # The field's evaluation (evaluation.Evaluation), None where augment.evaluate is off.

    def measure(self, model, fresh_results=None):
        metrics = measure_model(model, self.data, self.sets, self.num_classes, self.cap)
        metrics["trained_fooling_top_prob"] = _top_digit_probability(cnn.predict(model, self.trained_images),
                                                                     self.num_classes)
        if fresh_results is not None:  # Do a round's fresh fooling images fool the original model too?
            metrics.update(fooling_numbers(self.original, fresh_results, self.cap, "fresh_on_original"))
        return metrics

    def attack(self, model, round_index):
        """The attack suite on model: its rows, the none-score separation, and the images to train on next."""
        start = time.perf_counter()
        self.progress(f"round {round_index}: attack suite ({', '.join(self.suite.attacks)})")
        rows, backworked, finals = self.suite.run(model)
        if round_index == 0:
            for name in self.suite.check_sanity(rows):
                # Loud, and on stderr: a broken attack's zeros would read as robustness.
                print(f"MISCONFIGURED ATTACK: {name} {self.suite.disabled[name]}; its rows are marked so in every "
                      "round and left out of every conclusion (check its settings in [augment])", file=sys.stderr)
        strongest = attacks.strongest_attack(rows)
        metrics = {"attacks": rows, "attack_seconds": time.perf_counter() - start,
                   "strongest_attack": None if strongest is None else
                   {"attack": strongest[0], "fooled_fraction": strongest[1], "interval": strongest[2]},
                   "none_separation": self.separation(model, finals)}
        train_on = self.config["augment"]["train_on"]
        if backworked:
            train_on = attacks.strongest_loss(rows) if train_on == "strongest" else train_on
            metrics["train_on"] = train_on
        return metrics, backworked.get(train_on)

    def separation(self, model, finals):
        """How well the model's "none" score tells test digits from each kind of non-digit."""
        digits = attacks.none_scores(cnn.predict(model, self.data["x_test"]), self.num_classes)
        others = {f"attack_{name}": images for name, images in finals.items()}
        others["heldout"] = results_format.final_images(self.sets["heldout"])
        others["noise_and_blank"] = np.concatenate([self.data["noise"], self.data["blank"]])
        if "ood" in self.data:
            others["ood"] = self.data["ood"]
        scores = {name: attacks.none_scores(cnn.predict(model, images), self.num_classes)
                  for name, images in others.items()}
        self.last_scores = (digits, scores)  # For the report's ROC panel.
        return {name: attacks.separation(digits, values) for name, values in scores.items()}

    def augmented_data(self, round_index):
        """The training set of a round: the data plus every fooling image so far and blank and noise
        images, labelled "none"; for the control, the data alone (the same steps, nothing added)."""
        augment, seed = self.config["augment"], self.config["augment"]["seed"] + round_index
        if augment["target"] not in ADDING_TARGETS:
            alone = " alone" if augment["target"] == "control" else " with the defence's term"
            self.progress(f"round {round_index}: {augment['target']}, training on the {len(self.data['x_train'])} "
                          f"original examples{alone}")
            return self.data
        extra = blank_and_noise_images(self.data["x_train"].shape[1:], augment["num_blank"], augment["num_noise"],
                                       seed)
        augmented = add_none_examples(self.data, np.concatenate([self.trained_images, extra]), self.num_classes,
                                      seed, augment["target"])
        self.progress(f"round {round_index}: training on {len(augmented['x_train'])} examples "
                      f"({len(self.trained_images)} backworked, {len(extra)} blank and noise)")
        return augmented

    def run_round(self, round_index, model):
        """Augment with every fooling image so far, retrain, measure, attack; returns (model, metrics)."""
        augment = self.config["augment"]
        augmented = self.augmented_data(round_index)
        if augment["target"] == "extra_class" and model.output_shape[-1] == self.num_classes:
            model = with_extra_class(model)
        model, train_metrics = retrain(model, augmented, self.config, round_index, self.progress)
        _check_training_finished(train_metrics, round_index)
        round_dir = self.out_dir / f"round{round_index}"
        cnn.save_model(model, round_dir / "model.keras")
        attack_metrics, fresh = self.attack(model, round_index)
        start = time.perf_counter()
        metrics = {"round": round_index, **self.measure(model, fresh), **attack_metrics,
                   "num_fooling_images_trained": len(self.trained_images), "train_steps": train_metrics["steps"],
                   "train_seconds": train_metrics["seconds"]}
        if "in_fraction" in train_metrics:  # prood: the share of test images its discriminator calls "in".
            metrics["discriminator_in_fraction"] = train_metrics["in_fraction"]
        if fresh is not None:  # The images the next round adds: saved, measured for difficulty, kept.
            save_backwork(fresh, round_dir / "backwork")
            metrics.update(difficulty(fresh, augment["difficulty_budgets"]))
            self.trained_images = np.concatenate([self.trained_images, results_format.final_images(fresh)])
        metrics["measure_seconds"] = time.perf_counter() - start
        metrics.update(evaluate_round(self.judge_of(round_index), model, round_dir, round_index, self.progress))
        return model, metrics

    def judge_of(self, round_index):
        """The evaluation for round_index's model, or None where augment.evaluate_rounds leaves that round out."""
        return self.judged if round_index in judged_rounds(self.config["augment"]) else None


def judged_rounds(augment):
    """The rounds whose model the field's evaluation judges: none, the last, or every one (0 = the original)."""
    if not augment["evaluate"]:
        return set()
    return {augment["rounds"]} if augment["evaluate_rounds"] == "final" else set(range(augment["rounds"] + 1))


# ------------------------------------------------------------------------------ report


def report_table(rounds):
    """Per round: accuracy, confidence on non-digits, and the difficulty of the images trained on next."""
    budgets = list(rounds[0]["fooled_within"])
    lines = ["round  test acc  held-out p  at cap  trained p  blank p  noise p  fooled <= "
             + "/".join(budgets) + " steps  median  seconds (train/attacks)"]
    for metrics in rounds:
        within = " ".join(f"{metrics['fooled_within'][budget]:.2f}" if budget in metrics.get("fooled_within", {})
                          else "   -" for budget in budgets)
        median = metrics.get("median_steps_to_fool")
        lines.append(f"{metrics['round']:>5}  {metrics['test_accuracy']:>7.2%}  {metrics['heldout_mean_p']:>10.3f}  "
                     f"{metrics['heldout_at_cap']:>6.2f}  {metrics['trained_fooling_top_prob']:>9.3f}  "
                     f"{metrics['blank_top_prob']:>7.3f}  {metrics['noise_top_prob']:>7.3f}  {within:>22}  "
                     f"{median if median is not None else 'never':>6}  "
                     f"{metrics.get('train_seconds', 0):.0f}/{metrics.get('attack_seconds', 0):.0f}")
    return "\n".join(lines)


def attack_table(rounds):
    """Per round and attack: fooled / count, the 95% interval, median steps, distance of the fooled."""
    lines = ["round  attack                      fooled    95% interval    median  distance  converged"]
    for metrics in rounds:
        for name, row in metrics.get("attacks", {}).items():
            if row.get("misconfigured"):
                lines.append(f"{metrics['round']:>5}  {name:<26}  MISCONFIGURED (left out: it fooled too few of "
                             "the undefended model's images)")
                continue
            median = "-" if row["median_steps"] is None else f"{row['median_steps']:.0f}"
            distance = "-" if row["distance"] is None else f"{row['distance']:.3f}"
            converged = ""
            if "convergence" in row:
                convergence = row["convergence"]
                within = "/".join(f"{value:.2f}" for value in convergence["fooled_within"].values())
                converged = (f"{'yes' if convergence['converged'] else 'NO'} (x1/x2/x4 budget {within}, "
                             f"any of {1 + len(convergence['restart_seeds'])} seeds "
                             f"{convergence['any_seed_fraction']:.2f})")
            low, high = row["interval"]
            lines.append(f"{metrics['round']:>5}  {name:<26}  {row['fooled']:>3}/{row['count']:<4}  "
                         f"[{low:.3f}, {high:.3f}]  {median:>6}  {distance:>8}  {converged}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------- main


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description="Augment with backworked images and retrain, in rounds.")
    configurator.add_common_arguments(parser, "augment")
    parser.add_argument("--results", help="folder of results_{label}.pkl from cnn_backwork.py (for a study)")
    parser.add_argument("--judge", action="store_true",
                        help="judge --model alone in both threat models ([evaluation]), without a study")
    parser.add_argument("--model", required=True, help="the model those results were backworked from")
    parser.add_argument("--out", help="output folder (default: <model folder>-aug-<target>)")
    parser.add_argument("--steps", type=int, help="retraining steps per round")
    parser.add_argument("--from-scratch", action="store_true", help="train a fresh model on the augmented set")
    parser.add_argument("--rounds", type=int, help="backwork -> augment -> retrain rounds (augment.rounds)")
    parser.add_argument("--target", choices=TARGETS, help="the defence: uniform soft label, an extra class, "
                                                          "control (the same retraining with nothing added), or a "
                                                          "loss term of defences.py")
    parser.add_argument("--ood", help="natural non-digits for the \"none\" ROC: a Keras-layout .npz of the same "
                                      "image size, its test images used (augment.ood_data)")
    parser.add_argument("--transfer-from", metavar="MODEL",
                        help="an independently trained model whose fooling images are scored on every round's model")
    return parser.parse_args(argv)


def resolve_config(args):
    """Defaults, then the config the model was trained with (beside it) unless CONFIG is given,
    then the flags; so retraining uses the model's own learning rate and batch size."""
    base, trained_with = None, Path(args.model).parent / "config.toml"
    if args.config is None and trained_with.is_file():
        base = configurator.saved_config(trained_with)
        print(f"starting from {trained_with}, the config the model was trained with")
    flags = {"from_scratch": True if args.from_scratch else None, "rounds": args.rounds, "target": args.target,
             "ood_data": args.ood}
    config = configurator.resolve_cli_config(args, "augment", base=base, flags={"augment": flags})
    if args.steps is not None:
        section, key = ("train", "num_steps") if config["augment"]["from_scratch"] else ("augment", "retrain_steps")
        config = configurator.merge_config(config, {section: {key: args.steps}}, "--steps")
    if config["augment"]["heldout_seed"] == config["backwork"]["seed"]:
        raise UserError("augment.heldout_seed must differ from backwork.seed, or the held-out set repeats "
                        "the trained-on one; change either")
    check_train_on(config["augment"])
    check_classifier_kept(config["augment"])
    defences.check_config(config, config["augment"]["target"])
    return drop_unreachable_budgets(config)


def check_train_on(augment):
    """Refuse a suite that could not give a round its fooling images to add."""
    losses = [name for name in augment["attacks"] if name in configurator.BACKWORK_LOSSES]
    if augment["target"] in ADDING_TARGETS and not losses:
        raise UserError(f"augment.attacks {augment['attacks']} has no backwork loss, so no round would have fooling "
                        f"images to add; add one of {', '.join(configurator.BACKWORK_LOSSES)}")
    if augment["train_on"] != "strongest" and augment["train_on"] not in augment["attacks"]:
        raise UserError(f"augment.train_on = {augment['train_on']!r} is not in augment.attacks {augment['attacks']}; "
                        "add it there or use train_on = \"strongest\"")


def check_classifier_kept(augment):
    """Refuse what a defence that keeps the classifier (prood) cannot do: a second round, or training afresh."""
    if augment["target"] not in defences.CLASSIFIER_KEPT:
        return
    if augment["rounds"] != 1:
        raise UserError(f"--target {augment['target']} trains its discriminator once, beside the classifier; "
                        f"use --rounds 1 (not {augment['rounds']})")
    if augment["from_scratch"]:
        raise UserError(f"--target {augment['target']} keeps the classifier as it is; drop --from-scratch")


def drop_unreachable_budgets(config):
    """Leave out, with a note, difficulty budgets above backwork.max_num_steps: no run reaches them, so
    their fractions would only repeat the last one's as if measured. The config records what is kept."""
    budgets, steps = config["augment"]["difficulty_budgets"], config["backwork"]["max_num_steps"]
    kept = [budget for budget in budgets if budget <= steps]
    if not kept:
        raise UserError(f"every augment.difficulty_budgets {budgets} exceeds backwork.max_num_steps = {steps}; "
                        "give budgets up to it or raise backwork.max_num_steps")
    if kept != budgets:
        print(f"note: difficulty budgets {[budget for budget in budgets if budget > steps]} are left out: "
              f"above backwork.max_num_steps = {steps}, no backwork reaches them")
        config["augment"]["difficulty_budgets"] = kept
    return config


# Backwork keys that may differ between image sets of one study: which images, not how they are made.
PER_SET_KEYS = {"seed", "num_examples"}


def _same_kind(value, reference):
    """Whether a recorded option can be compared with the config's: both numbers (not bools), both
    bools, both str, or both lists (a file's options are plain values: results_format checks them)."""
    kinds = [bool, (int, float), str, list]
    return any(isinstance(value, kind) and isinstance(reference, kind)
               and isinstance(value, bool) == isinstance(reference, bool) for kind in kinds)


def check_one_backwork_setting(results, results_dir, backwork):
    """Refuse fooling images made with another [backwork] setting than the study's: every image of a
    study comes from one setting (a results file made before backwork.loss existed used "probability")."""
    differing = {}
    for label, result in sorted(results.items()):
        recorded = {"loss": "probability", **results_format.recorded_options(result)}
        for key, value in recorded.items():
            if key in backwork and key not in PER_SET_KEYS and not _same_kind(value, backwork[key]):
                raise UserError(f"{results_dir}/results_{label}.pkl records backwork.{key} = {common.shown(value)}, "
                                f"which is no {type(backwork[key]).__name__}; backwork it again with cnn_backwork.py")
        differing.update({key: value for key, value in recorded.items()
                          if key in backwork and key not in PER_SET_KEYS and value != backwork[key]})
    if differing:
        pairs = ", ".join(f"backwork.{key} = {common.shortened(repr(value), 80)} (the study's: {backwork[key]!r})"
                          for key, value in sorted(differing.items()))
        fixes = " ".join(f"--set backwork.{key}={configurator.toml_value(value)}" for key, value in sorted(differing.items()))
        raise UserError(f"the fooling images in {results_dir} were made with {pairs}; one setting for every image "
                        f"of a study: give {fixes}, or backwork them again with the study's config")


def write_round_summary(writer, metrics):
    """A round's numbers for TensorBoard, at step = the round (fooled_within as one tag per budget)."""
    values = {f"round/{key}": value for key, value in metrics.items()
              if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "round"}
    within = metrics.get("fooled_within", {})
    values.update({f"round/fooled_within_{budget}": value for budget, value in within.items()})
    values.update({f"attack/{name}": row["fooled_fraction"] for name, row in metrics.get("attacks", {}).items()})
    if "evaluation" in metrics:
        values.update({f"evaluation/{name}": value for name, value in evaluation.headline(metrics["evaluation"]).items()
                       if value is not None})
    common.write_scalars(writer, metrics["round"], values)


def write_report(out_dir, model, config, report, roc_scores=None):
    """Everything the study leaves behind; called also when it stops early (report['complete'])."""
    if model is not None:
        cnn.save_model(model, out_dir / "model.keras")
    configurator.save_run_config(out_dir / "config.toml", config, report["data"])  # The data used, as training records it.
    common.write_json(out_dir / "report.json", report)
    if report["rounds"]:
        figures.plot_report(report["rounds"], config["augment"]["target"], out_dir / "report.png", roc_scores,
                    datasets.provenance_dataset(report["data"]))


def heldout_backwork(model, data, config, out_dir):
    """A second fooling set from the original model, with another seed, that no round trains on."""
    heldout_config = {**config, "backwork": {**config["backwork"], "seed": config["augment"]["heldout_seed"]}}
    print(f"backworking a held-out set from the original model (seed {config['augment']['heldout_seed']})")
    return backwork(model, data, heldout_config, range(model.output_shape[-1]), out_dir / "heldout")


def main(argv=None):
    args = parse_arguments(argv)
    if args.judge:
        return judge(args)
    if args.results is None:
        raise UserError("a study needs --results, the folder of results_<label>.pkl from cnn_backwork.py; "
                        "or give --judge to evaluate the model alone")
    model_path = cnn.check_model_file(args.model)
    transfer_path = None if args.transfer_from is None else cnn.check_model_file(args.transfer_from)
    config = resolve_config(args)
    augment = config["augment"]
    default_out = model_path.parent.with_name(f"{model_path.parent.name}-aug-{augment['target']}")
    trained_results = results_format.load_results_folder(args.results)  # Refuse a bad file before anything slow.
    check_one_backwork_setting(trained_results, args.results, config["backwork"])
    data = datasets.split_validation(configurator.load_data(args, config), config["data"]["validation_size"])
    # The models' own data, or --allow-other-data (noted, and recorded in report.json and every results file).
    data["provenance"] = configurator.check_model_data(model_path, data["provenance"], args.allow_other_data)
    if transfer_path is not None:
        configurator.check_model_data(transfer_path, data["provenance"], args.allow_other_data)
    shape = data["x_train"].shape[1:]
    if augment["ood_data"]:
        data["ood"], _, _ = datasets.read_ood_images(augment["ood_data"], shape)  # Natural images of no class.
    out_dir = common.ensure_writable_dir(args.out or default_out)
    original = cnn.load_trained_model(model_path, data["x_train"], num_classes=datasets.count_classes(data))
    results_format.check_fooling_results(trained_results, args.results, shape, original.output_shape[-1])
    data["blank"] = np.zeros((1,) + shape, np.float32)
    data["noise"] = np.random.default_rng(10_000 + augment["seed"]).uniform(
        0, 1, (augment["num_eval_noise"],) + shape).astype(np.float32)
    report = {"model": str(model_path), "results": str(args.results), "target": augment["target"],
              "data": data["provenance"], "backwork": config["backwork"], "attacks": augment["attacks"],
              "transfer_from": None if transfer_path is None else str(transfer_path),
              "ood_data": augment["ood_data"] or None, "complete": False, "rounds": []}
    # Closed on Ctrl-C and SIGTERM too; each run of the study logs to its own logs/<date-time>.
    with common.summary_writer(common.session_log_dir(out_dir / "logs")) as writer:
        _run_study(data, config, original, trained_results, out_dir, report, writer, transfer_path)
    print(f"report in {out_dir / 'report.json'} and {out_dir / 'report.png'}")
    return 0


def check_judged_outputs(model, model_path, num_classes, target):
    """Refuse in one line a model whose outputs do not fit the config's target (classes, plus "none" for extra_class)."""
    outputs = model_outputs(num_classes, target)
    if model.output_shape[-1] != outputs:
        meaning = f"{num_classes} classes" + (' and "none"' if target == "extra_class" else "")
        raise UserError(f"model {model_path} has {model.output_shape[-1]} outputs but augment.target = {target!r} "
                        f"needs {outputs} ({meaning}); judge it with the config it was trained with (its folder's "
                        "config.toml) or set augment.target to the study's target")


def judge(args):
    """--judge: the evaluation of one model alone; report.json, evaluation.png and config.toml in --out."""
    model_path = cnn.check_model_file(args.model)
    config = resolve_config(args)
    data = datasets.split_validation(configurator.load_data(args, config), config["data"]["validation_size"])
    data["provenance"] = configurator.check_model_data(model_path, data["provenance"], args.allow_other_data)
    ood = (datasets.read_ood_images(config["augment"]["ood_data"], data["x_train"].shape[1:])[0]
           if config["augment"]["ood_data"] else None)
    out_dir = common.ensure_writable_dir(args.out or model_path.parent / "evaluation")
    num_classes = datasets.count_classes(data)
    # An extra_class study's model (its saved config says so) has one more output, "none"; the
    # evaluation scores the confidence over the real classes, as it does in the study's rounds.
    model = cnn.load_trained_model(model_path, data["x_train"])
    check_judged_outputs(model, model_path, num_classes, config["augment"]["target"])
    print(f"judging {model_path} in both threat models (eps {config['evaluation']['eps']}, "
          f"{config['evaluation']['points']} points per set)")
    judged = evaluation.Evaluation(data, config, num_classes, ood)
    report = {"model": str(model_path), "data": data["provenance"], "ood_data": config["augment"]["ood_data"] or None,
              "evaluation": judged.run(model)}
    configurator.save_run_config(out_dir / "config.toml", config, data["provenance"])
    common.write_json(out_dir / "report.json", report)
    figures.plot_evaluation(report["evaluation"], judged.last_scores, out_dir / "evaluation.png",
                            f"{model_path}: the field's evaluation (bars: 95% Wilson intervals)")
    print(evaluation.table(report["evaluation"]))
    print(f"report in {out_dir / 'report.json'} and {out_dir / 'evaluation.png'}")
    return 0


def evaluate_round(judged, model, round_dir, round_index, progress=print):
    """The evaluation of one round's model (None without one): its report section, and evaluation.png."""
    if judged is None:
        return {}
    progress(f"round {round_index}: the field's evaluation (both threat models)")
    report = judged.run(model)
    figures.plot_evaluation(report, judged.last_scores, round_dir / "evaluation.png",
                            f"round {round_index}: the field's evaluation (bars: 95% Wilson intervals)")
    return {"evaluation": report}


def transfer_sets(data, config, heldout, transfer_path, num_classes):
    """Fooling images made on other models, scored on every round's: (images, targets, distances) by name."""
    sets = {"original_heldout": _as_transfer_set(heldout)}
    if transfer_path is not None:
        other = cnn.load_trained_model(transfer_path, data["x_train"], num_classes=num_classes)
        backwork_section = {**config["backwork"], "num_examples": config["augment"]["attack_examples"]}
        print(f"backworking {transfer_path} for the transfer attack")
        results = backwork_loop.backwork_labels(data, backwork_section, other,
                                                range(num_classes), progress=lambda line: None)
        sets["independent_model"] = _as_transfer_set(results)
    return sets


def _as_transfer_set(results):
    _, distances = results_format.steps_and_distances(results)
    targets = np.concatenate([np.full(len(results[label]["images"]), label) for label in sorted(results)])
    return results_format.final_images(results), targets, distances


def _run_study(data, config, original, trained_results, out_dir, report, writer, transfer_path=None):
    """Round 0 (the original model) and every retraining round, each logged and reported as it ends."""
    augment, model, last_model, study = config["augment"], original, None, None
    try:
        heldout, heldout_seconds = heldout_backwork(original, data, config, out_dir)
        num_classes = original.output_shape[-1]
        suite = attacks.AttackSuite(data, config, num_classes,
                                    transfer_sets(data, config, heldout, transfer_path, num_classes))
        judged = (evaluation.Evaluation(data, config, num_classes, data.get("ood")) if augment["evaluate"]
                  else None)
        study = Study(original, data, config, trained_results, heldout, out_dir, suite=suite, judged=judged)
        attack_metrics, _ = study.attack(original, 0)
        report["rounds"].append({"round": 0, **study.measure(original), **difficulty(heldout, augment["difficulty_budgets"]),
                                 **attack_metrics, "backwork_seconds": heldout_seconds,
                                 **evaluate_round(study.judge_of(0), original, out_dir / "round0", 0)})
        report["misconfigured_attacks"] = dict(suite.disabled)
        _round_done(report, writer)
        for round_index in range(1, augment["rounds"] + 1):
            model, metrics = study.run_round(round_index, model)
            report["rounds"].append(metrics)
            last_model = model
            _round_done(report, writer)
        report["complete"] = True
    finally:
        # Whatever stopped the study (Ctrl-C, SIGTERM, a diverged retraining), the rounds that
        # finished are reported, marked incomplete, with the last finished round's model.
        write_report(out_dir, last_model, config, report, getattr(study, "last_scores", None))
        if not report["complete"]:
            print(f"stopped after {max(len(report['rounds']) - 1, 0)} of {augment['rounds']} rounds; the report "
                  f"in {out_dir} covers those and says complete: false", file=sys.stderr)


def _round_done(report, writer):
    write_round_summary(writer, report["rounds"][-1])
    print(report_table(report["rounds"]))
    print(attack_table(report["rounds"]))
    if "evaluation" in report["rounds"][-1]:
        print(evaluation.table(report["rounds"][-1]["evaluation"]))


if __name__ == "__main__":
    common.run_cli(main)
