"""Train a CNN on an image dataset (MNIST by default, [data] dataset) from a topology dict.

    python proc_mnist.py [CONFIG] [--data PATH] [--out DIR] [--steps N] [--seed N]
                         [--set section.key=value ...] [--resume]

With defence.method set (configs/acet.toml, say), every step also trains that defence's term
(defences.py).

This is the command: its files, --resume and the run's folder. The network is cnn.py's and
the training trainer.py's (build_model and train are imported here, so that
proc_mnist.build_model and proc_mnist.train keep working in a notebook).

trainer.train runs the [train] recipe in compiled calls of about a second each, so Ctrl-C
or SIGTERM stops it at once. The command then saves what was reached (also when
interrupted during the final evaluation or the save) and exits 130; --resume continues
it with its whole history. A loss or gradient that is not finite stops training: the
last finite weights are saved, exit 2.
"""
import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import cnn
import common
import configurator
import datasets
import defences
import distributed
import trainer
from cnn import build_model  # noqa: F401  The notebook API: proc_mnist.build_model(topology).
from common import UserError
from trainer import train  # noqa: F401  The notebook API: proc_mnist.train(data, config).

# ------------------------------------------------------------------------------ files


def plot_training_curve(history, path, title):
    figure, (loss_axis, accuracy_axis) = common.pyplot().subplots(1, 2, figsize=(10, 3.5))
    losses = [(record["step"], record["loss"]) for record in history if record.get("loss") is not None]
    accuracies = [(record["step"], 100 * record["val_accuracy"]) for record in history
                  if record.get("val_accuracy") is not None]
    loss_axis.plot(*zip(*losses)) if losses else None
    loss_axis.set(xlabel="step", ylabel="training loss", yscale="log", title=title)
    accuracy_axis.plot(*zip(*accuracies)) if accuracies else None
    accuracy_axis.set(xlabel="step", ylabel="validation accuracy (%)")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
    common.save_figure(figure, path)


def save_run(out_dir, model, config, metrics):
    """Write everything a finished (or stopped) run leaves behind, each file atomically.

    The model is skipped if its weights are not finite (it never is after train()).
    """
    out_dir = Path(out_dir)
    if trainer.weights_are_finite(model):
        cnn.save_model(model, out_dir / "model.keras")
    configurator.save_run_config(out_dir / "config.toml", config, metrics.get("data"))  # The data used, not the one asked for.
    common.write_json(out_dir / "metrics.json", metrics)  # Strict JSON: a missing number is null.
    if metrics["history"]:
        plot_training_curve(metrics["history"], out_dir / "training_curve.png", title=out_dir.name)


# ------------------------------------------------------------------------------- main


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description="Train a CNN on an image dataset from a topology config.")
    configurator.add_common_arguments(parser, "train")
    parser.add_argument("--out", help="output folder (default: runs/<config name>, after the dataset if not MNIST)")
    parser.add_argument("--steps", type=int, help="total optimisation steps (overrides train.num_steps)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its saved model, optimizer and step")
    return parser.parse_args(argv)


MAX_METRICS_BYTES = 1 << 28  # 256 MiB: a record per log_every steps is a few hundred bytes.


def _read_earlier_metrics(out_dir):
    """The metrics.json of the run to resume (None if it has none); a damaged one is refused."""
    path = Path(out_dir) / "metrics.json"
    if not os.path.lexists(path):
        print(f"note: {path} is missing; the resumed run's history starts here")
        return None
    fix = "train afresh without --resume or in another --out"
    data = common.read_input(path, "metrics.json", fix, MAX_METRICS_BYTES)  # A FIFO or a device is refused.
    try:
        metrics = json.loads(data)
        steps, seconds, history = metrics["steps"], metrics["seconds"], metrics["history"]
        if not (isinstance(steps, int) and isinstance(seconds, (int, float)) and isinstance(history, list)
                and all(isinstance(record, dict) and isinstance(record.get("step"), int) for record in history)):
            raise ValueError("steps, seconds or history have the wrong type")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as error:
        raise UserError(f"cannot resume {out_dir}: its metrics.json is damaged ({type(error).__name__}: "
                        f"{common.shortened(str(error), 200)}); {fix}") from None
    return metrics


def _resumable_model(path, images):
    """The saved model with its optimizer state; a model saved without one is refused."""
    model = cnn.load_trained_model(path, images, compile=True)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or int(optimizer.iterations.numpy()) == 0:
        raise UserError(f"cannot resume {path}: it was saved without its optimizer state (step count and Adam "
                        "moments); train afresh without --resume")
    return model


def _note_schedule_end(optimizer, total_steps):
    """Say so when a resumed run goes past the end of its saved schedule (cosine: learning rate 0)."""
    schedule = optimizer._learning_rate
    end = getattr(schedule, "decay_steps", None)
    if end is not None and total_steps > end + schedule.warmup_steps:
        rate = float(schedule(end + schedule.warmup_steps))
        print(f"note: the saved learning-rate schedule ends at step {end + schedule.warmup_steps}; "
              f"steps after it use its final rate {rate:g}")


def _merge_sessions(earlier, metrics):
    """One run's metrics over every session: whole history, total seconds and examples."""
    if earlier is None:
        return {**metrics, "sessions": 1}
    done_before = earlier["steps"]
    offset = float(earlier["seconds"])
    examples_before = earlier.get("examples", earlier.get("examples_per_second", 0.0) * offset)
    history = [record for record in earlier["history"] if record["step"] <= done_before]
    history += [{**record, "seconds": record["seconds"] + offset} for record in metrics["history"]]
    seconds, examples = offset + metrics["seconds"], examples_before + metrics["examples"]
    return {**metrics, "seconds": seconds, "examples": examples,
            "examples_per_second": examples / seconds if seconds else 0.0,
            "sessions": earlier.get("sessions", 1) + 1, "history": history}


def main(argv=None):
    args = parse_arguments(argv)
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps {args.steps} must be at least 1 (the total number of optimisation steps)")
    flags = {"train": {"num_steps": args.steps}}
    config = configurator.resolve_cli_config(args, "train", flags=flags)
    defences.check_config(config, config["defence"]["method"])
    out_dir = Path(args.out) if args.out else default_out_dir(args.config, config, args.data)
    model, earlier = None, None
    if args.resume:
        if not os.path.isfile(out_dir / "model.keras"):
            raise UserError(f"nothing to resume in {out_dir}: it has no model.keras; drop --resume or fix --out")
        earlier = _read_earlier_metrics(out_dir)
        # The run's own saved config underneath the config file, --set and the flags.
        config = configurator.resolve_cli_config(args, "train", base=configurator.saved_config(out_dir / "config.toml"),
                                                 flags=flags)
    # First of all TensorFlow work: a cluster's collective ops are set up as the strategy is made.
    # "auto" precision is resolved here, once (it may ask TensorFlow for a GPU), so the saved config.toml says what ran.
    config, strategy = trainer.prepare(config)
    chief = distributed.is_chief(strategy)
    data = datasets.split_validation(configurator.load_data(args, config), config["data"]["validation_size"])
    if args.resume:
        # The data the run was trained on so far, or --allow-other-data (noted, and recorded in metrics.json).
        data["provenance"] = configurator.check_model_data(out_dir / "model.keras", data["provenance"],
                                                           args.allow_other_data)
        with distributed.scope(strategy):  # Its variables mirrored, as a new model's would be.
            model, earlier = _resumed(out_dir, data, config["train"], earlier)
        if model is None:
            return 0
    elif os.path.isfile(out_dir / "model.keras"):  # Never replace a model of other data without a word.
        configurator.check_model_data(out_dir / "model.keras", data["provenance"], args.allow_other_data,
                                      what="the data to train on",
                                      fix="choose another --out (or leave it out: the default folder names the data)")
    if chief:  # Checked before training; common.run_cli removes the folder again if the run leaves it empty.
        common.ensure_writable_dir(out_dir)
    print(f"training on {len(data['x_train'])} examples, validating on {len(data['x_val'])}; "
          + (f"output in {out_dir}" if chief else "the chief writes the outputs"))
    # Closed on Ctrl-C and SIGTERM too; only the chief writes files. Each session (a resumed one too)
    # logs to its own logs/<date-time>, so TensorBoard shows the sessions one after the other.
    log_dir = common.session_log_dir(out_dir / "logs")
    model, extra_term = _with_defence(model, data, config)
    with common.summary_writer(log_dir) if chief else contextlib.nullcontext() as writer:
        model, metrics = trainer.train_prepared(data, config, model=model, writer=writer, strategy=strategy,
                                                extra_term=extra_term)  # SIGTERM is Ctrl-C.
        model = _with_discriminator(model, data, config, metrics, writer)
    with common.InterruptsDeferred() as deferred:
        return _finish(out_dir, model, config, _merge_sessions(earlier, metrics), earlier, deferred, chief)


def _with_defence(model, data, config):
    """(model, extra term) of defence.method: its term closes over the model, so a new model is made here."""
    method = config["defence"]["method"]
    if method == "none":
        return model, None
    print(f"defence: {method} (defences.py), every step with {config['defence']['outlier_batch']} extra images")
    model = trainer.model_to_train(model, config, data)  # Defences train on one device: no strategy scope.
    if method in defences.CLASSIFIER_KEPT:  # Refused now, not after the classifier has trained.
        defences.check_classifier_precision(model)
    return model, defences.make_term(method, model, data["x_train"], config["defence"], config["train"]["num_steps"])


def _with_discriminator(model, data, config, metrics, writer):
    """defence.method "prood": the trained classifier combined with a discriminator trained beside it
    (defences.with_discriminator; its metrics in metrics["discriminator"]); else model as it is.
    A classifier whose training stopped early, or a discriminator's that did, leaves the classifier alone."""
    if config["defence"]["method"] not in defences.CLASSIFIER_KEPT or metrics["interrupted"] or metrics["diverged"] \
            or metrics["worker_failed"]:
        return model
    combined, metrics["discriminator"] = defences.with_discriminator(model, data, config, writer=writer)
    if combined is None:
        metrics["interrupted"] = True
        print("the discriminator's training stopped: model.keras is the classifier alone; train one beside it "
              "with preprocess_data.py --target prood --rounds 1", file=sys.stderr)
        return model
    print(f"prood: {metrics['discriminator']['in_fraction']:.2%} of the test digits are \"in\" for the "
          f"discriminator ({common.format_seconds(metrics['discriminator']['seconds'])})")
    return combined


def _resumed(out_dir, data, section, earlier):
    """The saved model to go on training and the earlier metrics; (None, earlier) if it is done already."""
    model, total_steps = _resumable_model(out_dir / "model.keras", data["x_train"]), section["num_steps"]
    if cnn.precision_of(model) != section["mixed_precision"]:
        print(f"note: the saved model computes in {cnn.precision_of(model)!r}, and goes on in it; "
              f"train.mixed_precision = {section['mixed_precision']!r} applies to new models")
    step = int(model.optimizer.iterations.numpy())
    if step >= total_steps:
        print(f"nothing to do: {out_dir} is already at step {step} >= {total_steps}; "
              "give a larger --steps to train further")
        return None, earlier
    if earlier is not None and earlier["steps"] != step:
        print(f"note: model.keras is at step {step} but metrics.json at {earlier['steps']}; "
              "keeping the history up to the model's step")
        earlier = {**earlier, "steps": step}
    print(f"resuming {out_dir} at step {step}")
    _note_schedule_end(model.optimizer, total_steps)
    return model, earlier


def default_out_dir(config_path, config, data_path=None):
    """runs/<config name>, with the data in front when it is not MNIST (the dataset's name, or a local
    file's: datasets.data_label), so that a run on other data never replaces an MNIST one."""
    name = Path(config_path).stem if config_path else "default"
    dataset = datasets.data_label(data_path, config["data"]["dataset"], config["data"]["file"])
    if dataset != "mnist" and not name.startswith(dataset):
        name = f"{dataset}-{name}"
    return Path("runs") / name


def _finish(out_dir, model, config, metrics, earlier, deferred, chief=True):
    """Save what the run reached (if it reached anything new), report it, and return the exit code.

    A cluster's other workers hold the same weights as the chief and save nothing.
    """
    steps_before = earlier["steps"] if earlier is not None else 0
    saved = chief and metrics["steps"] > steps_before
    if not chief:
        print(f"worker done at step {metrics['steps']}; the chief saves the run in {out_dir}")
    elif saved:
        save_run(out_dir, model, config, metrics)
        accuracy_text = "not measured" if metrics["test_accuracy"] is None else f"{metrics['test_accuracy']:.2%}"
        print(f"test accuracy {accuracy_text} after {metrics['steps']} steps "
              f"({common.format_seconds(metrics['seconds'])}, {metrics['examples_per_second']:.0f} ex/s); "
              f"saved {out_dir / 'model.keras'}")
    else:
        print(f"no step was completed; nothing saved in {out_dir}")
    if metrics["diverged"]:
        kept = (f"the last finite weights, step {metrics['steps']}, are in {out_dir / 'model.keras'}" if saved
                else "nothing was saved")
        print(f"error: training {metrics['stop_reason']}; lower train.learning_rate "
              f"(now {config['train']['learning_rate']:g}) or raise train.warmup_steps and train afresh ({kept})",
              file=sys.stderr)
        return 2
    if metrics["worker_failed"]:
        kept = f"the weights of step {metrics['steps']} are in {out_dir / 'model.keras'}" if saved else "nothing saved"
        print(f"error: training {metrics['stop_reason']} ({kept}); restart every worker with the same "
              f"TF_CONFIG and: python proc_mnist.py --out {out_dir} --resume", file=sys.stderr)
        return 2
    if metrics["interrupted"] or deferred.interrupted:
        print(f"stopped early; continue with: python proc_mnist.py --out {out_dir} --resume")
        return 130
    return 0


if __name__ == "__main__":
    common.run_cli(main)
