"""Augment the training set with backworked images and retrain: are the artifacts fixed?

    python preprocess_data.py --results runs/default/backwork --model runs/default/model.keras
                              [CONFIG] [--data PATH] [--out runs/default-aug] [--steps N]
                              [--from-scratch] [--rounds K] [--seed N]

The backworked ("fooling") images, plus blank and uniform-noise images, join the training
set with a uniform label (1/classes for every class: "none of the digits"), and the model
is retrained on it. Each round then backworks the new model afresh with the same budget:
the fraction of images that still reach the probability cap, and the steps they need,
say how hard fooling has become. Those fresh images are what the next round adds.

Writes, in --out: model.keras (the last round's), round{r}/model.keras and
round{r}/backwork/results_{label}.pkl for each round, report.json and report.png.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

import cnn_backwork
import common
import proc_mnist
from common import UserError

# ----------------------------------------------------------------------- augmentation


def uniform_targets(count, num_classes):
    return np.full((count, num_classes), 1.0 / num_classes, np.float32)


def add_uniform_examples(data, images, num_classes, seed):
    """Training set plus images with uniform soft labels, shuffled; other splits untouched."""
    targets = proc_mnist.to_targets(data["y_train"], num_classes)
    all_images = np.concatenate([data["x_train"], images.astype(np.float32)])
    all_targets = np.concatenate([targets, uniform_targets(len(images), num_classes)])
    order = np.random.default_rng(seed).permutation(len(all_images))
    return {**data, "x_train": all_images[order], "y_train": all_targets[order]}


def read_fooling_images(results_dir, image_shape, num_classes):
    """The final images of every results_{label}.pkl, checked against the data and model."""
    results_dir = Path(results_dir)
    if results_dir.is_file():
        raise UserError(f"--results wants the folder holding results_<label>.pkl, not the file {results_dir}; "
                        f"use --results {results_dir.parent}")
    if not results_dir.is_dir():
        raise UserError(f"results folder {results_dir} does not exist; run cnn_backwork.py first or fix --results")
    results = cnn_backwork.load_label_results(results_dir)
    missing = sorted(set(range(num_classes)) - set(results))
    if missing:
        raise UserError(f"{results_dir} has no results for labels {missing}; run "
                        f"cnn_backwork.py --labels {','.join(map(str, missing))} first")
    images = []
    for label, result in sorted(results.items()):
        label_images = np.asarray(result["images"], np.float32)
        label_images = common.with_channel(label_images)
        if label_images.shape[1:] != tuple(image_shape):
            raise UserError(f"results_{label}.pkl holds images of shape {label_images.shape[1:]}, the data "
                            f"{tuple(image_shape)}; backwork a model trained on this data")
        if np.asarray(result["probs"]).shape[-1] != num_classes:
            raise UserError(f"results_{label}.pkl has {np.asarray(result['probs']).shape[-1]} classes, the "
                            f"model {num_classes}; use results of a model with the same classes")
        images.append(label_images)
    return np.concatenate(images), results


def augment_data(data, results_dir, num_classes=10, seed=0):
    """Add the final backworked images of results_dir with a uniform label (the original's name)."""
    images, _ = read_fooling_images(results_dir, data["x_train"].shape[1:], num_classes)
    return add_uniform_examples(data, images, num_classes, seed)


def blank_and_noise_images(shape, num_blank, num_noise, seed):
    noise = np.random.default_rng(seed).uniform(0.0, 1.0, (num_noise,) + tuple(shape)).astype(np.float32)
    return np.concatenate([np.zeros((num_blank,) + tuple(shape), np.float32), noise])


def augment_random_data(data, num_blank=800, num_noise=800, num_classes=10, seed=0):
    """Add blank and uniform-noise images with a uniform label (the original's name)."""
    images = blank_and_noise_images(data["x_train"].shape[1:], num_blank, num_noise, seed)
    return add_uniform_examples(data, images, num_classes, seed)


# ------------------------------------------------------------------------ measurement


def mean_top_probability(model, images):
    if len(images) == 0:
        return float("nan")
    probabilities = common.predict(model, images)
    return float(probabilities.max(axis=1).mean())


def fooling_difficulty(results, threshold):
    """Fraction of backworked images reaching threshold, and the mean steps those needed."""
    probabilities = np.concatenate([result["probs"][:, label] for label, result in results.items()])
    steps = np.concatenate([result["steps_to_reach"] for result in results.values()])
    reached = steps[steps > 0]
    return {"fooled_fraction": float(np.mean(probabilities >= threshold)),
            "mean_steps_to_fool": float(reached.mean()) if len(reached) else float("nan"),
            "backwork_steps": int(sum(result["steps"] for result in results.values())),
            "backwork_seconds": float(sum(result["seconds"] for result in results.values()))}


def measure_model(model, data, fooling_images, eval_noise):
    return {"test_accuracy": proc_mnist.accuracy(model, data["x_test"], data["y_test"]),
            "fooling_top_prob": mean_top_probability(model, fooling_images),
            "blank_top_prob": mean_top_probability(model, np.zeros_like(eval_noise[:1])),
            "noise_top_prob": mean_top_probability(model, eval_noise)}


# --------------------------------------------------------------------------- retraining


def retrain(model, data, config, round_index, progress=print):
    """Continue training model on data (or train a fresh one) for this round's steps."""
    augment = config["augment"]
    train_options = {**config["train"], "seed": augment["seed"] + round_index}
    if augment["from_scratch"]:
        import keras

        # The same architecture as the given model, freshly initialised, whatever the config says.
        keras.utils.set_random_seed(train_options["seed"])
        model = keras.models.clone_model(model)
    else:
        # A fresh optimizer, as the original reloaded only the parameters; it also restarts the step count.
        model = proc_mnist.compile_for_training(model, train_options["learning_rate"])
        train_options["num_steps"] = augment["retrain_steps"]
    model, metrics = proc_mnist.train(data, {**config, "train": train_options}, model=model, progress=progress)
    return model, metrics


def _check_training_finished(metrics, round_index):
    """Stop the study on an interrupted or diverged retraining: its model is no round's result."""
    if metrics.get("diverged"):
        raise UserError(f"retraining in round {round_index} diverged at step {metrics['steps']}; "
                        "lower train.learning_rate (--set train.learning_rate=...) and run again")
    if metrics.get("interrupted"):
        raise KeyboardInterrupt


def run_round(round_index, model, data, fooling_images, config, out_dir, eval_noise, progress=print):
    """Augment with every fooling image found so far, retrain, measure, backwork afresh."""
    augment = config["augment"]
    extra = blank_and_noise_images(data["x_train"].shape[1:], augment["num_blank"], augment["num_noise"],
                                   augment["seed"] + round_index)
    augmented = add_uniform_examples(data, np.concatenate([fooling_images, extra]), model.output_shape[-1],
                                     augment["seed"] + round_index)
    progress(f"round {round_index}: training on {len(augmented['x_train'])} examples "
             f"({len(fooling_images)} backworked, {len(extra)} blank and noise)")
    model, train_metrics = retrain(model, augmented, config, round_index, progress)
    _check_training_finished(train_metrics, round_index)
    round_dir = Path(out_dir) / f"round{round_index}"
    proc_mnist.save_model(model, round_dir / "model.keras")
    metrics = measure_model(model, data, fooling_images, eval_noise)
    progress(f"round {round_index}: backworking the retrained model with the same budget")

    def save(label, result):
        common.save_results(round_dir / "backwork" / f"results_{label}.pkl",
                            {**result, "model": str(round_dir / "model.keras")})

    results = cnn_backwork.get_faulty_input_layer(data, config, model, progress=progress, on_label=save)
    metrics.update(fooling_difficulty(results, config["backwork"]["prob_cap_min"]))
    metrics.update(round=round_index, train_steps=train_metrics["steps"], train_seconds=train_metrics["seconds"],
                   num_fooling_images_trained=len(fooling_images))
    new_images = np.concatenate([common.with_channel(result["images"]) for _, result in sorted(results.items())])
    return model, metrics, new_images


# ------------------------------------------------------------------------------ report


def report_table(rounds):
    lines = ["round  test acc  fooling p  blank p  noise p  fooled    steps to fool  backwork s"]
    for metrics in rounds:
        lines.append(f"{metrics['round']:>5}  {metrics['test_accuracy']:>7.2%}  {metrics['fooling_top_prob']:>9.3f}  "
                     f"{metrics['blank_top_prob']:>7.3f}  {metrics['noise_top_prob']:>7.3f}  "
                     f"{metrics['fooled_fraction']:>6.1%}  {metrics['mean_steps_to_fool']:>13.0f}  "
                     f"{metrics['backwork_seconds']:>10.0f}")
    return "\n".join(lines)


def plot_report(rounds, path):
    pyplot = common.pyplot()
    indices = [metrics["round"] for metrics in rounds]
    figure, (confidence_axis, fooling_axis) = pyplot.subplots(1, 2, figsize=(10, 3.6))
    for key, name in [("fooling_top_prob", "trained-on fooling images"), ("blank_top_prob", "blank image"),
                      ("noise_top_prob", "fresh noise"), ("test_accuracy", "test accuracy")]:
        confidence_axis.plot(indices, [metrics[key] for metrics in rounds], marker="o", label=name)
    confidence_axis.axhline(0.1, color="gray", linestyle=":", label="uniform (0.1)")
    confidence_axis.set(xlabel="round (0: original model)", ylabel="mean top probability / accuracy",
                        ylim=(0, 1.05), xticks=indices)
    confidence_axis.legend(fontsize=7)
    fooling_axis.bar(indices, [metrics["fooled_fraction"] for metrics in rounds])
    fooling_axis.set(xlabel="round", ylabel="fraction of fresh backwork fooled", ylim=(0, 1.05), xticks=indices)
    for index, metrics in zip(indices, rounds):
        fooling_axis.annotate(f"{metrics['mean_steps_to_fool']:.0f} steps", (index, metrics["fooled_fraction"]),
                              ha="center", va="bottom", fontsize=8)
    figure.suptitle("does retraining with backworked images remove the artifacts?")
    common.save_figure(figure, path)


# -------------------------------------------------------------------------------- main


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description="Augment with backworked images and retrain.")
    proc_mnist.add_common_arguments(parser, "augment")
    parser.add_argument("--results", required=True, help="folder of results_{label}.pkl from cnn_backwork.py")
    parser.add_argument("--model", required=True, help="the model those results were backworked from")
    parser.add_argument("--out", help="output folder (default: <model folder>-aug)")
    parser.add_argument("--steps", type=int, help="retraining steps per round")
    parser.add_argument("--from-scratch", action="store_true", help="train a fresh model on the augmented set")
    parser.add_argument("--rounds", type=int, help="backwork -> augment -> retrain rounds (augment.rounds)")
    return parser.parse_args(argv)


def resolve_config(args):
    """Defaults, then the config the model was trained with (beside it) unless CONFIG is given,
    then the flags; so retraining uses the model's own learning rate and batch size."""
    base, trained_with = None, Path(args.model).parent / "config.toml"
    if args.config is None and trained_with.is_file():
        base = common.load_config(trained_with)
        print(f"starting from {trained_with}, the config the model was trained with")
    if args.from_scratch:
        args.set.append("augment.from_scratch=true")
    if args.rounds is not None:
        args.set.append(f"augment.rounds={args.rounds}")
    config = proc_mnist.resolve_cli_config(args, "augment", base=base)
    if args.steps is not None:
        key = "train.num_steps" if config["augment"]["from_scratch"] else "augment.retrain_steps"
        config = common.merge_config(config, common.parse_override(f"{key}={args.steps}"), "--steps")
    return config


def write_report(out_dir, model, config, report):
    """Everything the study leaves behind; called also when it stops early (report['complete'])."""
    if model is not None:
        proc_mnist.save_model(model, out_dir / "model.keras")
    common.atomic_write_bytes(out_dir / "config.toml", common.dump_toml(config).encode())
    common.write_json(out_dir / "report.json", report)
    plot_report(report["rounds"], out_dir / "report.png")


def main(argv=None):
    args = parse_arguments(argv)
    model_path = common.check_model_file(args.model)
    config = resolve_config(args)
    out_dir = common.ensure_writable_dir(args.out or model_path.parent.with_name(model_path.parent.name + "-aug"))
    data = common.split_validation(common.load_mnist(args.data), config["data"]["validation_size"])
    model = common.load_trained_model(model_path, data["x_train"])
    fooling_images, original_results = read_fooling_images(args.results, data["x_train"].shape[1:],
                                                           model.output_shape[-1])
    eval_noise = np.random.default_rng(10_000 + config["augment"]["seed"]).uniform(
        0, 1, (config["augment"]["num_eval_noise"],) + data["x_train"].shape[1:]).astype(np.float32)
    rounds = [{"round": 0, **measure_model(model, data, fooling_images, eval_noise),
               **fooling_difficulty(original_results, config["backwork"]["prob_cap_min"])}]
    report = {"model": str(model_path), "results": str(args.results), "complete": False, "rounds": rounds}
    print(report_table(rounds))
    all_fooling, last_model = fooling_images, None
    try:
        for round_index in range(1, config["augment"]["rounds"] + 1):
            model, metrics, new_images = run_round(round_index, model, data, all_fooling, config, out_dir,
                                                   eval_noise)
            rounds.append(metrics)
            last_model, all_fooling = model, np.concatenate([all_fooling, new_images])
            print(report_table(rounds))
        report["complete"] = True
    finally:
        # Whatever stopped the study (Ctrl-C, SIGTERM, a diverged retraining), the rounds that
        # finished are reported, marked incomplete, with the last finished round's model.
        write_report(out_dir, last_model, config, report)
        if not report["complete"]:
            print(f"stopped after {len(rounds) - 1} of {config['augment']['rounds']} rounds; "
                  f"the report in {out_dir} covers those and says complete: false", file=sys.stderr)
    print(f"report in {out_dir / 'report.json'} and {out_dir / 'report.png'}")
    return 0


if __name__ == "__main__":
    common.run_cli(main)
