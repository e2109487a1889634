"""Backwork inputs: find images a trained CNN is sure about that look like nothing to us.

    python cnn_backwork.py --model runs/default/model.keras [CONFIG] [--data PATH]
                           [--labels 3 | 0-9 | 1,4,7] [--num-examples 8] [--out DIR] [--seed N]
                           [--worker I/N]
    python cnn_backwork.py --evaluate runs/default/backwork --model MODEL [MODEL ...]
    python cnn_backwork.py --ood fashion_mnist.npz --model MODEL [MODEL ...]

For each label, a batch of images is optimised until the network gives that label a
probability of prob_cap_min or more while the images stay far, at every layer, from the
label's training examples and from each other. The cost is backwork_cost.py's; the loop
that optimises it is backwork_loop.py's (its compiled and host halves); this module is
the command: which labels, where the results go, the figures, --evaluate (do the
images fool other models too?) and --ood (how confident is the model on natural images of
another dataset?). docs/benchmarks.md has where a run's time goes.

loss(l, x) is backwork.loss (backwork_cost.label_loss): "probability", the original
1 - p(l | x), whose gradient vanishes where p(l) is near 0; "log_probability",
-log p(l | x); or "margin", the largest other logit minus l's, clamped below at
-margin_kappa (Carlini and Wagner).

Each label writes results_{label}.pkl (results_format.label_results_path; read them with
results_format.load_results) to the output folder (default: backwork/ beside the model)
as it stops, plus backwork.png and worst_training.png (drawn from every results_{label}.pkl
in the folder). Nothing is saved for a label that diverged.

On several machines, each process takes its share of the labels into the same folder (on
a shared filesystem): with --worker I/N (I from 0), or where TensorFlow's TF_CONFIG is set,
from its chief and worker tasks (the chief first). Worker I takes every N-th of the sorted
labels from the I-th, so no two workers take the same label and none needs to talk to
another; a label's images are the same whichever worker runs it, as they are for a batch.
Each run writes its TensorBoard logs to logs/<date-time> (worker I to logs/worker_I/<date-time>),
and each worker draws the figures from every results file in the folder when it ends, saying
which of the model's labels are still missing (preprocess_data.py needs all of them).
"""
import argparse
import os
import re
from pathlib import Path

import numpy as np

import attacks
import backwork_loop
import cnn
import common
import configurator
import datasets
import distributed
import figures
import results_format
from common import UserError

# ---------------------------------------------------------------------------- backwork


# --------------------------------------------------------------------------- transfer




def _same_file(first, second):
    try:
        return Path(first).resolve() == Path(second).resolve()
    except (OSError, RuntimeError, TypeError, ValueError):
        return False


def evaluate(results_dir, model_paths):
    """{model path: fooling_numbers} for a folder of results on each model (do the images transfer?).

    Each model's numbers say whether the images were made from it ("made_from_it": every label's
    results name it as their "model"); on any other model they measure transfer.
    """
    results = results_format.load_results_folder(results_dir, "--evaluate")
    if not results:
        raise UserError(f"{results_dir} holds no results_<label>.pkl; run cnn_backwork.py first or fix --evaluate")
    first, name = results[min(results)], f"results_{min(results)}.pkl"
    images = common.with_channel(first["images"])
    # Every label's images go through each model in one batch: all must be one model's.
    results_format.check_results_fit(results, results_dir, images.shape[1:], first["probs"].shape[1],
                                     shape_of=f"{name}'s", classes_of=name, fix="keep one model's results in a folder")
    cap = results_format.recorded_options(first).get("prob_cap_min", 0.999)  # Optional in a file.
    numbers = {}
    for path in model_paths:
        model = cnn.load_trained_model(path, images)
        if model.output_shape[-1] <= max(results):
            raise UserError(f"model {path} has {model.output_shape[-1]} classes, fewer than the labels "
                            f"{sorted(results)} of {results_dir}; use models of the same classes")
        made_from_it = all(_same_file(result.get("model", ""), path) for result in results.values())
        numbers[str(path)] = {**attacks.fooling_numbers(model, results, cap), "made_from_it": made_from_it}
    return numbers


def source_models(results_dir):
    """The models (as recorded) the images of results_dir were made from."""
    results = results_format.load_label_results(results_dir)
    return sorted({result.get("model", "unrecorded") for result in results.values()})


def transfer_table(numbers):
    lines = ["mean p(target)  > 0.5   > 0.99  images made from it  model"]
    lines += [f"{values['mean_p']:>14.4f}  {values['above_0.5']:>5.1%}  {values['above_0.99']:>6.1%}  "
              f"{'yes' if values.get('made_from_it') else 'NO (transfer)':<19}  {path}"
              for path, values in numbers.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------- other data (--ood)

OOD_LEVELS = (0.99, 0.999)  # Top-probability levels at which --ood counts confident images.


def confidence_numbers(probabilities, names, top=3):
    """How confident a model is on images of another dataset (no answer is right):

    the fraction of images whose top class probability reaches each of OOD_LEVELS, the mean top
    probability, and each class (with its name) by how often it is predicted, most often first.
    probabilities (N, classes); names the classes' names (datasets.class_names).
    """
    top_p, predicted = probabilities.max(axis=1), probabilities.argmax(axis=1)  # (N,), (N,)
    counts = np.bincount(predicted, minlength=probabilities.shape[1])
    classes = [{"class": int(index), "name": names[index], "predicted": float(counts[index] / len(predicted)),
                **{f"at_{level}": float(np.mean((predicted == index) & (top_p >= level))) for level in OOD_LEVELS}}
               for index in np.argsort(-counts, kind="stable")[:top]]
    return {"images": int(len(top_p)), "mean_top_p": float(top_p.mean()),
            **{f"top_p_at_{level}": float(np.mean(top_p >= level)) for level in OOD_LEVELS},
            "most_predicted": classes}


def confidence_by_class(probabilities, names, ood_labels, ood_names):
    """For each class of the other data (named ood_names), how often the model is confident
    (top p >= OOD_LEVELS[0]) on its images, and as which of its own classes (names) most often:

    [{"class", "name", "images", "confident", "as_class", "as_name", "as_share"}], where
    "confident" and "as_share" are fractions of that class's images ("as_*" None where none is).
    """
    top_p, predicted = probabilities.max(axis=1), probabilities.argmax(axis=1)  # (N,), (N,)
    confident = top_p >= OOD_LEVELS[0]
    rows = []
    for label in np.unique(ood_labels):
        mine = ood_labels == label
        counts = np.bincount(predicted[mine & confident], minlength=probabilities.shape[1])
        as_class = int(counts.argmax()) if counts.any() else None
        rows.append({"class": int(label), "name": ood_names[label], "images": int(mine.sum()),
                     "confident": float(confident[mine].mean()), "as_class": as_class,
                     "as_name": None if as_class is None else names[as_class],
                     "as_share": None if as_class is None else float(counts[as_class] / mine.sum())})
    return rows


def by_class_table(rows):
    lines = [f"  {'its class':>12}  p >= {OOD_LEVELS[0]}  most often as (share of the class)"]
    for row in rows:
        as_text = "-" if row["as_class"] is None else f"{row['as_name']!r} {row['as_share']:.1%}"
        lines.append(f"  {row['name']:>12}  {row['confident']:>9.1%}  {as_text}")
    return "\n".join(lines)


def ood_table(numbers):
    header = "  ".join(f">= {level}" for level in OOD_LEVELS)
    lines = [f"mean top p  {header}  most predicted (share; share at p >= {OOD_LEVELS[0]})  model"]
    for path, values in numbers.items():
        levels = "  ".join(f"{values[f'top_p_at_{level}']:>{len(str(level)) + 3}.1%}" for level in OOD_LEVELS)
        classes = ", ".join(f"{row['name']!r} {row['predicted']:.0%} ({row[f'at_{OOD_LEVELS[0]}']:.0%})"
                            for row in values["most_predicted"])
        lines.append(f"{values['mean_top_p']:>10.4f}  {levels}  {classes}  {path}")
    return "\n".join(lines)


def ood_command(args):
    """--ood: each --model's confidence on the test images of another dataset, printed and written as JSON."""
    images, provenance, numbers = None, None, {}
    for path in args.model:
        model = cnn.load_trained_model(path, images)
        if images is None:  # The first model says what image shape the other data must have.
            images, labels, provenance = datasets.read_ood_images(args.ood, model.input_shape[1:])
            ood_names = datasets.class_names(datasets.provenance_dataset(provenance), int(labels.max()) + 1)
        names = datasets.class_names(datasets.provenance_dataset(configurator.model_data_record(path)),
                                   model.output_shape[-1])
        probabilities = cnn.predict(model, images)
        numbers[str(path)] = {**confidence_numbers(probabilities, names),
                              "by_ood_class": confidence_by_class(probabilities, names, labels, ood_names)}
    print(f"how confident each model is on the {len(images)} test images of {args.ood} (none is of its classes):")
    print(ood_table(numbers))
    for path, values in numbers.items():
        print(f"by the other data's own classes, {path}:")
        print(by_class_table(values["by_ood_class"]))
    out_dir = common.ensure_writable_dir(args.out or Path(args.model[0]).parent)
    path = out_dir / f"ood_{Path(args.ood).stem}.json"
    common.write_json(path, {"ood": str(args.ood), "ood_data": provenance, "levels": list(OOD_LEVELS),
                             "models": numbers})
    print(f"written to {path}")
    return 0


# ---------------------------------------------------------------------------- figures


# ------------------------------------------------------------------------------- main


def parse_labels(text, num_classes):
    """'3', '0-9' or '1,4,7' -> sorted list of labels, each checked against num_classes.

    Each part is range-checked before it is expanded, so '0-100000000' fails at once.
    """
    labels = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise UserError(f"--labels {text!r} must look like 3, 0-9 or 1,4,7")
        first, last = int(match[1]), int(match[2] or match[1])
        if not 0 <= first <= last < num_classes:
            raise UserError(f"--labels {text!r}: labels must be between 0 and {num_classes - 1}, "
                            "each range low-high with low <= high")
        labels.update(range(first, last + 1))
    return sorted(labels)


def summary_table(results):
    names = figures.results_class_names(results)
    width = max([5, *(len(name) for name in names)])
    lines = [f"{'label':>{width}}  min p     mean p    reached  steps  reinit  seconds  nearest train dist"]
    for label, result in sorted(results.items()):
        probabilities = result["probs"][:, label]
        reached = int(np.sum(probabilities >= result["options"]["prob_cap_min"]))
        lines.append(f"{names[label]:>{width}}  {probabilities.min():.5f}  {probabilities.mean():.5f}  "
                     f"{reached:>3}/{len(probabilities):<3}  {result['steps']:>5}  {result['reinitialised']:>6}  "
                     f"{result['seconds']:>7.1f}  {result['nearest_training_distance'].mean():.4f}")
    return "\n".join(lines)


def draw_figures(out_dir):
    """backwork.png and worst_training.png from every results file in out_dir; returns those results.

    Other workers may write results files while this one draws, and the last figure renamed
    into place wins; so the figures are drawn again until no results file changed during a
    draw. Then whichever worker renames last drew every label written before it finished.
    """
    while True:
        before = results_format.results_signature(out_dir)
        # Labels that other processes wrote too; a damaged neighbour must not fail this run.
        every_label = results_format.load_label_results(out_dir, skip_unreadable=True)
        figures.plot_results(every_label, out_dir / "backwork.png")
        figures.plot_worst_training(every_label, out_dir / "worst_training.png")
        if results_format.results_signature(out_dir) == before:
            return every_label


def folder_status(every_label, num_classes, out_dir):
    """The closing line: how many of the model's labels out_dir holds, and which are still missing."""
    missing = sorted(set(range(num_classes)) - set(every_label))
    if not missing:
        return (f"results and figures in {out_dir}: all {num_classes} labels of the model; "
                "preprocess_data.py can go on")
    return (f"results and figures in {out_dir}: {num_classes - len(missing)} of the model's {num_classes} labels; "
            f"still missing {missing} (other workers may still be running; preprocess_data.py needs every label)")


def _config_among_models(args):
    """Take a .toml that --model swallowed as the config: `--model MODEL CONFIG`, as every other
    script is given, reads as that. --model takes several paths (for --evaluate and --ood) and
    argparse gives it every path that follows; a model is a .keras archive, so a .toml is never one."""
    configs = [path for path in args.model if Path(path).suffix == ".toml"]
    if not configs:
        return args
    if len(configs) > 1 or args.config is not None:
        raise UserError(f"give one config, not {', '.join(filter(None, [args.config, *configs]))}")
    models = [path for path in args.model if path not in configs]
    if not models:
        raise UserError(f"--model {configs[0]} names a config, not a model; give --model MODEL [CONFIG]")
    args.config, args.model = configs[0], models
    return args


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description="Backwork strongly classified spurious inputs.")
    configurator.add_common_arguments(parser, "backwork")
    parser.add_argument("--model", nargs="+", default=["runs/default/model.keras"],
                        help="model trained by proc_mnist.py (with --evaluate: one or more models)")
    parser.add_argument("--evaluate", metavar="RESULTS_DIR",
                        help="backwork nothing: report how each --model classifies the images of RESULTS_DIR "
                             "(printed, and written to RESULTS_DIR/transfer.json or --out)")
    parser.add_argument("--ood", metavar="NPZ",
                        help="backwork nothing: report how confident each --model is on the test images of "
                             "another dataset (a Keras-layout .npz of the same image size), written to "
                             "ood_<name>.json beside the first model or in --out")
    parser.add_argument("--labels", help="labels to backwork: 3, 0-9 or 1,4,7 (default: all)")
    parser.add_argument("--num-examples", type=int, help="images per label (overrides backwork.num_examples)")
    parser.add_argument("--out", help="output folder (default: backwork/ beside the model)")
    parser.add_argument("--worker", metavar="I/N",
                        help="backwork only worker I's share of the labels (I from 0, N workers: every N-th "
                             "label from the I-th), into the same --out as the others on a shared filesystem "
                             "(default: from TF_CONFIG's chief and worker tasks if it is set, else every label)")
    return _config_among_models(parser.parse_args(argv))


def evaluate_command(args):
    numbers = evaluate(args.evaluate, args.model)
    made_from = source_models(args.evaluate)
    print(f"how each model classifies the backworked images of {args.evaluate} (made from {', '.join(made_from)}):")
    print(transfer_table(numbers))
    if len(made_from) > 1:
        print(f"note: the images of {args.evaluate} were made from {len(made_from)} different models")
    out_dir = common.ensure_writable_dir(args.out or args.evaluate)
    common.write_json(out_dir / "transfer.json", {"results": str(args.evaluate), "made_from": made_from,
                                                  "models": numbers})
    print(f"written to {out_dir / 'transfer.json'}")
    return 0


def choose_labels(args, num_classes, worker):
    """The labels this process backworks: its worker's share of --labels (default: every class)."""
    index, count = worker
    requested = parse_labels(args.labels or f"0-{num_classes - 1}", num_classes)
    labels = distributed.worker_share(requested, index, count)
    if count > 1 and labels:
        print(f"worker {index} of {count} (numbered from 0) takes labels {labels} of {requested}")
    elif count > 1:
        print(f"worker {index} of {count} takes none of labels {requested}: there are more workers than "
              "labels; nothing to do")
    return labels


def backwork_and_save(data, config, model, labels, out_dir, log_dir, model_path):
    """Backwork labels, saving each label's results file and logging to log_dir as it goes; return the results."""
    with common.summary_writer(log_dir) as writer:  # Closed on Ctrl-C and SIGTERM too.
        def save(label, result):  # Each label as it finishes: an interrupted run keeps the done ones.
            results_format.save_label_results(out_dir, {**result, "model": str(model_path)})
            common.write_images(writer, result["steps"], f"label_{label}/images", result["images"])

        def log(label, step, cost, probabilities):
            common.write_scalars(writer, step, {f"label_{label}/cost": cost,
                                                f"label_{label}/p_min": probabilities.min(),
                                                f"label_{label}/p_mean": probabilities.mean()})

        return backwork_loop.backwork_labels(data, config["backwork"], model, labels, on_label=save, on_record=log)


def check_folder_fits(out_dir, model):
    """Refuse an output folder that holds results of another model (other classes or image size)
    before any work: its figures are drawn from every results file in it, which must fit together."""
    if not os.path.isdir(out_dir):  # Never raises: ensure_writable_dir says what is wrong with --out.
        return
    existing = results_format.load_label_results(out_dir, skip_unreadable=True, warn=lambda line: None)
    results_format.check_results_fit(existing, out_dir, model.input_shape[1:], model.output_shape[-1],
                                     shape_of="the model's", fix="choose another --out for this model")


def main(argv=None):
    args = parse_arguments(argv)
    base = configurator.model_data_config(args.model[0]) if args.config is None else None  # The model's dataset.
    config = configurator.resolve_cli_config(args, "backwork", base=base,  # Ranges are checked here, before loading.
                                             flags={"backwork": {"num_examples": args.num_examples}})  # Ranges are checked here, before loading.
    report = "--evaluate" if args.evaluate else "--ood" if args.ood else None
    if args.evaluate and args.ood:
        raise UserError("--evaluate and --ood are two reports; give one of them per run")
    if report and args.worker:
        raise UserError(f"--worker shares out the labels to backwork; {report} backworks none, so leave it out")
    worker = None if report else distributed.resolve_worker(args.worker)  # Also before loading.
    for path in args.model:
        cnn.check_model_file(path)
    if args.evaluate:
        return evaluate_command(args)
    if args.ood:
        return ood_command(args)
    if len(args.model) != 1:
        raise UserError("backwork takes one --model; several models are for --evaluate RESULTS_DIR")
    args.model = args.model[0]
    data = configurator.load_data(args, config)
    # The model's own data, or --allow-other-data (noted, and recorded in every results file's "data").
    data["provenance"] = configurator.check_model_data(args.model, data["provenance"], args.allow_other_data)
    model = cnn.load_trained_model(args.model, data["x_train"])
    num_classes = model.output_shape[-1]
    labels = choose_labels(args, num_classes, worker)
    if not labels:
        return 0
    out_dir = Path(args.out or Path(args.model).parent / "backwork")
    check_folder_fits(out_dir, model)
    # Made only once this process has labels, so that a worker with none leaves no folder; an
    # unwritable --out is still found in seconds, before the backwork.
    out_dir = common.ensure_writable_dir(out_dir)
    for label in labels:
        if results_format.label_results_path(out_dir, label).exists():
            print(f"results_{label}.pkl already exists in {out_dir}; this run replaces it")
    index, count = worker
    log_dir = out_dir / "logs"
    if count > 1:  # Workers sharing a folder log to their own subfolders: no two write to the same one.
        log_dir = log_dir / f"worker_{index}"
    log_dir = common.session_log_dir(log_dir)  # Each run its own logs/[worker_I/]<date-time>, never merged.
    results = backwork_and_save(data, config, model, labels, out_dir, log_dir, args.model)
    print(summary_table(results))
    every_label = draw_figures(out_dir)
    print(folder_status(every_label, num_classes, out_dir))
    return 0


if __name__ == "__main__":
    common.run_cli(main)
