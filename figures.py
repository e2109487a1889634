"""The figures the scripts share: image grids of backworked images and of training examples.

Drawing only (common.pyplot imports matplotlib where a figure is drawn); the numbers come
from a results folder ({label: results}, results_format.py).
"""
import numpy as np

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
