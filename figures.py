"""The figures the scripts share: image grids of backworked images and of training examples.

Drawing only (common.pyplot imports matplotlib where a figure is drawn); the numbers come
from a results folder ({label: results}, results_format.py).
"""
import numpy as np

import attacks
import common
import datasets


def plot_image_grid(rows, title, path):
    """One row per entry of rows, a list of (row label, images, titles); grey or colour images in [0, 1].

    Each row is one strip image with its titles as text: several times faster to draw
    than one subplot per image.
    """
    pyplot = common.pyplot()
    columns = max(len(images) for _, images, _ in rows)
    height, width = next(np.shape(images)[1:3] for _, images, _ in rows if len(images))
    gap = max(1, width // 7)  # White space between images, in pixels.
    strip_width = columns * (width + gap) - gap
    figure, axes = pyplot.subplots(len(rows), 1, squeeze=False, layout="constrained",
                                   figsize=(1.3 * columns + 0.8, (1.3 * height / width + 0.3) * len(rows) + 0.4))
    for axis, (row_label, images, titles) in zip(axes[:, 0], rows):
        images = np.asarray(images, np.float32)
        strip = np.ones((height, strip_width) + images.shape[3:], np.float32)
        for column, (image, text) in enumerate(zip(images, titles)):
            left = column * (width + gap)
            strip[:, left:left + width] = image
            axis.text(left + width / 2, -0.5, text, ha="center", va="bottom", fontsize=7)
        axis.imshow(strip, cmap="gray", vmin=0, vmax=1)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_ylabel(row_label, rotation=0, ha="right", va="center", fontsize=9)
        for side in axis.spines.values():
            side.set_visible(False)
    figure.suptitle(title, fontsize=10)
    common.save_figure(figure, path)


def _probability(value):
    """A probability with enough digits to tell 0.999 from 0.9999 and 0.001 from 0."""
    return f"{value:.4f}" if value >= 0.01 else f"{value:.1e}"


def results_class_names(results):
    """The class names of {label: results} (datasets.class_names of the dataset their "data" records)."""
    if not results:
        return []
    first = next(iter(results.values()))
    return datasets.class_names(datasets.provenance_dataset(first.get("data")), first["probs"].shape[1])


def plot_results(results, path):
    """Every label's images, titled with their label probability (the original's view_results)."""
    names = results_class_names(results)
    rows = [(f"label {names[label]}", result["images"],
             [f"p = {_probability(probs[label])}" for probs in result["probs"]])
            for label, result in sorted(results.items())]
    plot_image_grid(rows, "backworked images, each titled with its label's probability", path)


def plot_worst_training(results, path):
    """The training examples classified worst for each label (the original's graph_training_set)."""
    names = results_class_names(results)
    rows = [(f"label {names[label]}", result["worst_training_images"],
             [f"p = {_probability(probs[label])}, says {names[probs.argmax()]}"
              for probs in result["worst_training_probs"]])
            for label, result in sorted(results.items()) if "worst_training_images" in result]
    plot_image_grid(rows, "training examples given the lowest probability of their label "
                          "(p of the label; the class the network says)", path)


def report_words(dataset):
    """How the report's figure names the real test images ("real"), the images of none of the classes
    ("none_of", after "images") and those images as a set ("other"): digits for MNIST."""
    if dataset == "mnist":
        return {"real": "digits", "none_of": "that are no digit", "other": "non-digits"}
    return {"real": "images", "none_of": "of none of its classes", "other": "other images"}


def plot_report(rounds, target, path, roc_scores=None, dataset="mnist"):
    """Top: test accuracy, fooling confidence, difficulty, the strongest attack. Bottom: each attack family's
    fooled fraction with its 95% interval per round, and the last round's "none" ROC curves. dataset
    (the data's name, None where unknown) picks the words: digits for MNIST, images otherwise."""
    pyplot = common.pyplot()
    judged = [metrics for metrics in rounds if "evaluation" in metrics]
    figure, axes = pyplot.subplots(3 if judged else 2, 4, figsize=(20, 12.6 if judged else 8.4))
    indices = [metrics["round"] for metrics in rounds]
    if judged:
        plot_evaluation_rounds(axes[2], judged)
    _plot_accuracy(axes[0, 0], rounds, indices)
    _plot_confidence(axes[0, 1], rounds, indices, dataset)
    _plot_difficulty(axes[0, 2], pyplot, [metrics for metrics in rounds if "fooled_within" in metrics])
    _plot_strongest(axes[0, 3], rounds, indices)
    families = [("backwork", "backwork, by loss (round's budget)"), ("library", "ART: PGD and Square"),
                ("transfer", "transfer from other models")]
    for axis, (family, title) in zip(axes[1, :3], families):
        _plot_family(axis, rounds, indices, family, title)
    if roc_scores is not None:
        plot_roc(axes[1, 3], *roc_scores, dataset=dataset)
    real = report_words(dataset)["real"]
    axes[1, 3].set_title(f"round {indices[-1]}: the \"none\" score against test {real} (ROC)", fontsize=10)
    for axis in axes.ravel():
        axis.grid(alpha=0.3)
    figure.suptitle(f"defence '{target}': does retraining on backworked images remove the artifacts? "
                    "(round 0 is the original model; bars are 95% Wilson intervals)", fontsize=11)
    figure.tight_layout()
    common.save_figure(figure, path)


def _plot_accuracy(axis, rounds, indices):
    accuracies = [100 * metrics["test_accuracy"] for metrics in rounds]
    axis.plot(indices, accuracies, marker="o")
    # A fixed scale around the original, so that a wobble of 0.05 points does not look like a fall.
    axis.axhline(accuracies[0] - 0.3, color="gray", linestyle=":", label="original - 0.3 points")
    axis.set(xlabel="round (0: original model)", ylabel="test accuracy (%)", xticks=indices,
             ylim=(min(accuracies + [accuracies[0] - 0.5]) - 0.05, max(accuracies) + 0.2),
             title="test accuracy (original classes)")
    axis.legend(fontsize=7)


def _plot_confidence(axis, rounds, indices, dataset):
    lines = [("heldout_mean_p", "held-out fooling images: p(target)", "-"),
             ("trained_fooling_top_prob", "trained-on fooling images: top p", "-"),
             ("blank_top_prob", "blank image: top p", ":"), ("noise_top_prob", "fresh noise: top p", ":")]
    if "heldout_none_prob" in rounds[-1]:
        lines.append(("heldout_none_prob", "held-out fooling images: p(none class)", "--"))
    for key, name, style in lines:
        axis.plot(indices, [metrics.get(key, np.nan) for metrics in rounds], style, marker="o", label=name)
    axis.set(xlabel="round", ylabel="mean probability", ylim=(0, 1.05), xticks=indices,
             title=f"how sure the model is of images {report_words(dataset)['none_of']}")
    axis.legend(fontsize=7)


def _plot_difficulty(axis, pyplot, rounds):
    colours = pyplot.cm.viridis(np.linspace(0, 0.9, max(len(rounds), 1)))
    for metrics, colour in zip(rounds, colours):
        budgets = [int(budget) for budget in metrics["fooled_within"]]
        axis.plot(budgets, list(metrics["fooled_within"].values()), marker="o", color=colour,
                  label=f"round {metrics['round']}")
    axis.set(xscale="log", xlabel="backwork steps allowed", ylim=(0, 1.05),
             ylabel="fraction fooled (p >= cap)", title="backwork images trained on next: fooled within a budget")
    if rounds:
        budgets = [int(budget) for budget in rounds[0]["fooled_within"]]
        axis.set_xticks(budgets, [str(budget) for budget in budgets])
        axis.legend(fontsize=7)
    axis.minorticks_off()


def plot_evaluation_rounds(axes, rounds):
    """The field's evaluation per round (four axes): the unbounded worst case fooled, the eps-ball's fooled
    fraction, AAUC and GAUC per set."""
    indices = [metrics["round"] for metrics in rounds]
    for key, label in (("worst", "every start (APGD; Square on a subset)"), ("all_attacks", "the starts every attack ran on")):
        unbounded = [metrics["evaluation"]["unbounded"][key] for metrics in rounds]
        _error_bars(axes[0], indices, [row["fooled_fraction"] for row in unbounded],
                    [row["fooled_interval"] for row in unbounded], label)
    axes[0].set(title="unbounded: noise starts fooled, looking like no training image", xlabel="round",
                ylabel="fraction of starts (95% interval)", ylim=(-0.02, 1.02))
    for name in rounds[-1]["evaluation"]["ball"]:
        rows = [metrics["evaluation"]["ball"].get(name) for metrics in rounds]
        shown = [(index, row) for index, row in zip(indices, rows) if row is not None]
        _error_bars(axes[1], [index for index, _ in shown], [row["fooled"]["fraction"] for _, row in shown],
                    [row["fooled"]["interval"] for _, row in shown], name)
        for axis, column in ((axes[2], "aauc"), (axes[3], "gauc")):
            values = [(index, row[column]) for index, row in shown if row[column] is not None]
            if values:
                axis.plot(*zip(*values), marker="o", label=name)
    eps = rounds[-1]["evaluation"]["eps"]
    axes[1].set(title=f"eps-ball ({eps}): points brought to p >= cap", xlabel="round", ylabel="fraction of points",
                ylim=(-0.02, 1.02))
    axes[2].set(title="AAUC: confidence after the worst attack in the ball", xlabel="round", ylabel="AAUC (%)")
    axes[3].set(title="GAUC: certified upper bound over the ball", xlabel="round", ylabel="GAUC (%)")
    for axis in axes:
        axis.legend(fontsize=7)


def plot_evaluation(report, scores, path, title):
    """One model's evaluation: per eps-ball set the ROC curves of its points against the test images as they
    are, after the worst attack and at the certified bound; and the unbounded fraction fooled per family."""
    pyplot = common.pyplot()
    figure, axes = pyplot.subplots(1, len(scores) + 1, figsize=(4.6 * (len(scores) + 1), 4.2), squeeze=False)
    for axis, (name, curves) in zip(axes[0], scores.items()):
        in_scores = curves.pop("in_distribution")
        for label, values in curves.items():
            if values is not None:
                false, true = attacks.roc_curve(values, in_scores)
                axis.plot(false, true, label=f"{label} ({100 * attacks.roc_auc(values, in_scores):.1f})")
        axis.plot([0, 1], [0, 1], ":", color="gray")
        axis.set(title=f"{name}: eps {report['eps']}, {report['ball'][name]['count']} points",
                 xlabel="its points taken as confident", ylabel="test images taken as confident",
                 xlim=(0, 1), ylim=(0, 1.02))
        axis.legend(fontsize=7, title="AUC", title_fontsize=7)
    unbounded = report["unbounded"]
    rows = {**unbounded["by_family"], "every start": unbounded["worst"],
            f"all attacks ({unbounded['square_starts']})": unbounded["all_attacks"]}
    axis = axes[0, -1]
    positions = np.arange(len(rows))
    fractions = np.asarray([row["fooled_fraction"] for row in rows.values()])
    intervals = np.asarray([row["fooled_interval"] for row in rows.values()])
    axis.bar(positions, fractions, yerr=_interval_lengths(fractions, intervals), capsize=3, label="fooled")
    axis.bar(positions, [row["class_image_fraction"] for row in rows.values()], bottom=fractions, alpha=0.5,
             label="drew a class image")
    axis.set_xticks(positions, list(rows), rotation=30, fontsize=8)
    axis.set(title=f"unbounded: starts fooled at p >= {report['cap']}", ylabel="fraction (95% interval)",
             ylim=(0, 1.05))
    axis.legend(fontsize=7)
    for axis in axes.ravel():
        axis.grid(alpha=0.3)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    common.save_figure(figure, path)


def _interval_lengths(fractions, intervals):
    """The lengths below and above each fraction of its interval, for error bars. Never negative: a
    Wilson bound computed at 1 or 0 can land a rounding error inside the fraction."""
    fractions, intervals = np.asarray(fractions, float), np.asarray(intervals, float).reshape(-1, 2)
    return [np.maximum(fractions - intervals[:, 0], 0), np.maximum(intervals[:, 1] - fractions, 0)]


def _error_bars(axis, indices, fractions, intervals, label, marker="o"):
    axis.errorbar(indices, fractions, yerr=_interval_lengths(fractions, intervals), marker=marker, capsize=3,
                  label=label)


def _plot_strongest(axis, rounds, indices):
    shown = [(metrics["round"], metrics["strongest_attack"]) for metrics in rounds if metrics.get("strongest_attack")]
    if shown:
        _error_bars(axis, [index for index, _ in shown], [best["fooled_fraction"] for _, best in shown],
                    [best["interval"] for _, best in shown], "strongest attack (longer runs and restarts counted)")
        for index, best in shown:
            axis.annotate(best["attack"], (index, best["fooled_fraction"]), fontsize=7, textcoords="offset points",
                          xytext=(0, 6), ha="center")
        axis.legend(fontsize=7)
    axis.set(xlabel="round", ylabel="fraction fooled", ylim=(-0.02, 1.05), xticks=indices,
             title="the strongest attack of each round")


def _plot_family(axis, rounds, indices, family, title):
    names = sorted({name for metrics in rounds for name, row in metrics.get("attacks", {}).items()
                    if row["family"].startswith(family)})
    for name in names:
        shown = [(metrics["round"], metrics["attacks"][name]) for metrics in rounds
                 if name in metrics.get("attacks", {}) and not metrics["attacks"][name].get("misconfigured")]
        if shown:
            _error_bars(axis, [index for index, _ in shown], [row["fooled_fraction"] for _, row in shown],
                        [row["interval"] for _, row in shown], name)
    axis.set(xlabel="round", ylabel="fraction fooled (p >= cap)", ylim=(-0.02, 1.05), xticks=indices, title=title)
    if names:
        axis.legend(fontsize=7)


def plot_roc(axis, digit_scores, others, dataset="mnist"):
    """The ROC curve of each non-digit set against the test digits, the AUC in the legend."""
    words = report_words(dataset)
    for name, scores in others.items():
        false, true = attacks.roc_curve(digit_scores, scores)
        axis.plot(false, true, label=f"{name} (AUC {attacks.roc_auc(digit_scores, scores):.3f})")
    axis.plot([0, 1], [0, 1], ":", color="gray")
    axis.set(xlabel=f"test {words['real']} called \"none\"", ylabel=f"{words['other']} called \"none\"",
             xlim=(0, 1), ylim=(0, 1.02))
    axis.legend(fontsize=7)
