"""Tiny synthetic data and models: no test needs MNIST or a network connection."""
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# A cluster's TF_CONFIG in the shell would give every backwork command only a share of its labels.
os.environ.pop("TF_CONFIG", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# The Adversarial Robustness Toolbox reconfigures logging when first imported (logging.config.dictConfig
# closes every handler there is and binds a new one to the sys.stderr of that moment). Imported inside a
# test, that closes pytest's capture of the test and writes to it after it is gone; imported here, once,
# before any capture of a test exists, it does neither.
import art  # noqa: E402, F401

IMAGE_SIZE = 12


def make_images(num_examples, seed):
    """uint8 images whose label is the row of a bright bar: learnable by a tiny CNN in seconds."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, num_examples)
    images = rng.integers(0, 60, (num_examples, IMAGE_SIZE, IMAGE_SIZE)).astype(np.uint8)
    images[np.arange(num_examples), labels + 1, :] = 255
    return images, labels.astype(np.uint8)


def tiny_topology(**changes):
    topology = {
        "image_dim_size": [IMAGE_SIZE, IMAGE_SIZE, 1],
        "num_classes": 10,
        "conv_layers": [
            {"filter": [3, 3, 1, 4], "strides": [1, 1, 1, 1], "padding": "SAME", "act_fn": "relu"},
            {"filter": [3, 3, 4, 6], "strides": [1, 1, 1, 1], "padding": "SAME", "act_fn": "relu"},
        ],
        "pool_layers": [
            {"filter": [1, 2, 2, 1], "strides": [1, 2, 2, 1], "padding": "SAME"},
            {"filter": [1, 2, 2, 1], "strides": [1, 2, 2, 1], "padding": "SAME"},
        ],
        "num_fc_units": [16],
        "batch_norm": False,
        "dropout": 0.0,
    }
    topology.update(changes)
    return topology


def tiny_options(num_steps=150, **model_changes):
    return {"model": tiny_topology(**model_changes),
            "train": {"num_steps": num_steps, "log_every": 50, "learning_rate": 1e-2,
                      "batch_size": 20, "seed": 0,
                      # The original recipe: shifts would move the bar that is the tiny task's label.
                      "schedule": "constant", "warmup_steps": 0, "label_smoothing": 0.0, "shift_pixels": 0}}


def write_npz(tmp_path_factory, name, make, num_train, num_test):
    """A dataset file in the Keras layout, made by make(count, seed) -> (images, labels)."""
    x_train, y_train = make(num_train, seed=1)
    x_test, y_test = make(num_test, seed=2)
    path = tmp_path_factory.mktemp("data") / name
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory):
    return write_npz(tmp_path_factory, "tiny_mnist.npz", make_images, 500, 100)


@pytest.fixture(scope="session")
def tiny_data(tiny_npz):
    import datasets

    return datasets.split_validation(datasets.load_dataset(tiny_npz), 100)


@pytest.fixture(scope="session")
def trained_tiny(tiny_data, tmp_path_factory):
    """A tiny model trained once per session and saved where the scripts can load it."""
    import cnn
    import trainer

    model, metrics = trainer.train(tiny_data, tiny_options(num_steps=150), progress=lambda line: None)
    path = tmp_path_factory.mktemp("model") / "model.keras"
    cnn.save_model(model, path)
    return path, metrics


def fake_backwork_results(label, shape=(3, IMAGE_SIZE, IMAGE_SIZE), num_classes=10, seed=0):
    """A complete results dict as cnn_backwork.py writes it, with made-up numbers."""
    rng = np.random.default_rng([seed, label])
    probs = np.full((shape[0], num_classes), 0.0001, np.float32)
    probs[:, label % num_classes] = 0.9991
    images = rng.uniform(0, 1, shape).astype(np.float32)
    return {"label": label, "images": images, "probs": probs, "steps": 50, "seconds": 1.0,
            "steps_to_reach": np.array([25, 50, -1] * shape[0])[:shape[0]],
            "history": [{"step": 25, "images": images.copy(), "probs": probs[:, label % num_classes].copy(),
                         "cost": 1.5}],
            "options": {"prob_cap_min": 0.999, "loss": "margin"}, "model": "model.keras"}


COLOUR_SHAPE = (10, 14, 3)  # Not square, three channels: what the code must not assume away.
COLOUR_CLASSES = 3


def make_colour_images(num_examples, seed):
    """uint8 colour images whose label is the channel of a bright bar, labels (N, 1) as CIFAR's."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, COLOUR_CLASSES, num_examples)
    images = rng.integers(0, 60, (num_examples, *COLOUR_SHAPE)).astype(np.uint8)
    images[np.arange(num_examples), 4, :, labels] = 255
    return images, labels.astype(np.uint8)[:, None]


# The field's evaluation (evaluation.py) at a size that runs in seconds on a tiny model.
QUICK_EVALUATION = {"points": 12, "starts_per_class": 1, "apgd_steps": 10, "apgd_restarts": 1, "square_points": 2,
                    "square_starts_per_class": 1, "square_queries": 20, "novelty_test_points": 30,
                    "art_check_points": 4, "batch_size": 64}


def colour_options(num_steps=40):
    """A tiny config for COLOUR_SHAPE images of COLOUR_CLASSES classes, every script's budget tiny."""
    options = tiny_options(num_steps, image_dim_size=list(COLOUR_SHAPE), num_classes=COLOUR_CLASSES)
    options["model"]["conv_layers"][0]["filter"] = [3, 3, 3, 4]
    options["train"]["log_every"] = 20
    options["data"] = {"validation_size": 40}
    options["backwork"] = {"num_examples": 2, "max_num_steps": 10, "min_num_steps": 0, "save_freq": 5,
                           "nearest_every": 5}
    options["augment"] = {"num_blank": 5, "num_noise": 5, "retrain_steps": 10, "rounds": 1, "num_eval_noise": 5,
                          "difficulty_budgets": [5, 10]}
    options["evaluation"] = dict(QUICK_EVALUATION)
    return options


@pytest.fixture(scope="session")
def colour_npz(tmp_path_factory):
    return write_npz(tmp_path_factory, "tiny_colour.npz", make_colour_images, 200, 40)


def read_scalars(log_dir):
    """{tag: [(step, value), ...]} of every scalar in the TensorBoard event files under log_dir (its
    session subfolders included, in the order of their names: the order of the sessions)."""
    import tensorflow as tf

    scalars = {}
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    scalars.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    return scalars


def read_image_tags(log_dir):
    """The tags of every image summary under log_dir."""
    import tensorflow as tf

    return {value.tag for path in sorted(Path(log_dir).rglob("events.out.tfevents.*"))
            for event in tf.compat.v1.train.summary_iterator(str(path)) for value in event.summary.value
            if value.metadata.plugin_data.plugin_name == "images"}
