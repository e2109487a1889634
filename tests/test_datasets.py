"""Beyond MNIST: colour, non-square images, any class count, and where each output came from."""
import hashlib
import json

import numpy as np
import pytest

import common
import configurator
import proc_mnist
from common import UserError
from conftest import COLOUR_CLASSES, COLOUR_SHAPE, colour_options


def test_a_model_that_does_not_fit_the_data_names_the_key_to_set(colour_npz, tmp_path):
    data = common.load_dataset(colour_npz)
    with pytest.raises(UserError, match=r"images of shape \[10, 14, 3\].*set model.image_dim_size = \[10, 14, 3\]"):
        proc_mnist.train(data, {"train": {"num_steps": 1}})
    options = colour_options()
    options["model"]["num_classes"] = 10
    with pytest.raises(UserError, match="the data has 3 classes but model.num_classes is 10; "
                                        "set model.num_classes = 3"):
        proc_mnist.train(data, options)


def test_non_mnist_runs_get_their_own_default_folder():
    config = configurator.load_config(None, ["data.dataset=cifar10"])
    assert str(proc_mnist.default_out_dir(None, config)) == "runs/cifar10-default"
    assert str(proc_mnist.default_out_dir("configs/cifar10.toml", config)) == "runs/cifar10"
    assert str(proc_mnist.default_out_dir("configs/small.toml", configurator.load_config())) == "runs/small"


def test_cifar10_config_is_the_default_network_for_32x32_colour():
    config = configurator.load_config(common.PROJECT_DIR / "configs" / "cifar10.toml")
    model = proc_mnist.build_model(config["model"])
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 10)
    assert config["data"]["dataset"] == "cifar10"
    default = proc_mnist.build_model(configurator.default_config()["model"])
    assert [layer.name for layer in model.layers] == [layer.name for layer in default.layers]


def _colourful(path):
    """Whether a PNG holds pixels whose colour channels differ (a grey figure has none)."""
    from matplotlib import image

    pixels = image.imread(path)[..., :3]
    return bool(np.abs(pixels - pixels.mean(axis=-1, keepdims=True)).max() > 0.1)


@pytest.fixture(scope="module")
def colour_pipeline(colour_npz, tmp_path_factory):
    """The whole pipeline, through each script's main(), on 10x14 colour images of 3 classes."""
    import cnn_backwork
    import guided_backprop
    import preprocess_data

    folder = tmp_path_factory.mktemp("colour")
    config = folder / "colour.toml"
    config.write_text(configurator.dump_toml(configurator.merge_config(configurator.default_config(), colour_options(), "test")))
    run, data = folder / "run", ["--data", str(colour_npz)]
    model = str(run / "model.keras")
    assert proc_mnist.main([str(config), *data, "--out", str(run)]) == 0
    assert cnn_backwork.main([str(config), *data, "--model", model, "--labels", "0-2"]) == 0
    assert preprocess_data.main([str(config), *data, "--model", model, "--results", str(run / "backwork"),
                                 "--out", str(folder / "aug")]) == 0
    assert guided_backprop.main([str(config), *data, "--model", model, "--images", "test", "--num", "2"]) == 0
    assert guided_backprop.main([str(config), "--model", model, "--images", str(run / "backwork" / "results_1.pkl"),
                                 "--num", "2"]) == 0
    return run, folder / "aug", colour_npz


def test_the_whole_pipeline_runs_on_non_square_colour_images(colour_pipeline):
    run, augmented, _ = colour_pipeline
    results = common.load_results(run / "backwork" / "results_1.pkl")
    assert results["images"].shape == (2, *COLOUR_SHAPE) and results["probs"].shape == (2, COLOUR_CLASSES)
    report = json.loads((augmented / "report.json").read_text())
    assert report["complete"] and len(report["rounds"]) == 2
    saliency = common.load_results(run / "saliency" / "saliency_test.pkl")
    assert saliency["guided"].shape == (2, *COLOUR_SHAPE)
    for figure in (run / "backwork" / "backwork.png", run / "saliency" / "saliency_test.png",
                   run / "saliency" / "saliency_results_1.png"):
        assert _colourful(figure), f"{figure.name} shows colour images in grey"


def test_every_output_records_the_data_it_was_made_from(colour_pipeline):
    run, augmented, npz = colour_pipeline
    expected = {"dataset": None, "file": str(npz), "sha256": hashlib.sha256(npz.read_bytes()).hexdigest()}
    assert json.loads((run / "metrics.json").read_text())["data"] == expected
    assert json.loads((augmented / "report.json").read_text())["data"] == expected
    for folder in (run, augmented):
        text = (folder / "config.toml").read_text()
        assert text.startswith(f"# data: {npz}, sha256 {expected['sha256']}\n")
        configurator.load_config(folder / "config.toml")  # The comment leaves it loadable.
    for path in (run / "backwork" / "results_0.pkl", run / "saliency" / "saliency_test.pkl",
                 augmented / "heldout" / "results_2.pkl", augmented / "round1" / "backwork" / "results_1.pkl"):
        assert common.load_results(path)["data"] == expected, path
    from_results = common.load_results(run / "saliency" / "saliency_results_1.pkl")["data"]
    assert from_results["file"] == str(run / "backwork" / "results_1.pkl") and len(from_results["sha256"]) == 64


def test_figures_draw_colour_inputs_in_colour_and_grey_ones_in_grey(tmp_path):
    import cnn_backwork
    import guided_backprop

    rng = np.random.default_rng(0)
    colour, grey = rng.uniform(0, 1, (3, *COLOUR_SHAPE)), rng.uniform(0, 1, (3, 10, 14))
    for images, name in [(colour, "colour.png"), (grey, "grey.png")]:
        cnn_backwork.plot_image_grid([("label 0", images, ["a", "b", "c"])], "test", tmp_path / name)
    assert _colourful(tmp_path / "colour.png") and not _colourful(tmp_path / "grey.png")
    assert guided_backprop._channels_to_display(colour[0], is_map=False).shape == COLOUR_SHAPE
    assert guided_backprop._channels_to_display(colour[0], is_map=True).shape == COLOUR_SHAPE[:2]


def test_every_script_writes_tensorboard_logs(colour_pipeline):
    from conftest import read_image_tags, read_scalars

    run, augmented, _ = colour_pipeline
    training = read_scalars(run / "logs")
    for tag in ("train/loss", "train/val_accuracy", "train/learning_rate", "train/examples_per_second"):
        assert [step for step, _ in training[tag]] == [20, 40], tag
    metrics = json.loads((run / "metrics.json").read_text())
    assert [value for _, value in training["train/loss"]] == pytest.approx(
        [record["loss"] for record in metrics["history"]])
    assert training["train/learning_rate"][0][1] == pytest.approx(1e-2)  # The tiny config's constant rate.
    backwork = read_scalars(run / "backwork" / "logs")
    for label in range(COLOUR_CLASSES):
        history = common.load_results(run / "backwork" / f"results_{label}.pkl")["history"]
        for name in ("cost", "p_min", "p_mean"):
            assert [step for step, _ in backwork[f"label_{label}/{name}"]] == [record["step"] for record in history]
        assert [value for _, value in backwork[f"label_{label}/cost"]] == pytest.approx(
            [record["cost"] for record in history])
        assert all(low <= mean for (_, low), (_, mean) in zip(backwork[f"label_{label}/p_min"],
                                                               backwork[f"label_{label}/p_mean"]))
    assert read_image_tags(run / "backwork" / "logs") == {f"label_{label}/images" for label in range(3)}
    rounds = read_scalars(augmented / "logs")
    report = json.loads((augmented / "report.json").read_text())
    assert [value for _, value in rounds["round/test_accuracy"]] == pytest.approx(
        [metrics["test_accuracy"] for metrics in report["rounds"]])
    assert [step for step, _ in rounds["round/fooled_within_10"]] == [0, 1]


def test_scripts_given_a_model_take_its_dataset_from_its_config(tmp_path):
    (tmp_path / "config.toml").write_text(common.provenance_comment(
        {"dataset": "cifar10", "file": None, "sha256": None}) + configurator.dump_toml(
        configurator.load_config(None, ["data.dataset=cifar10", "data.validation_size=7"])))
    config = configurator.model_data_config(tmp_path / "model.keras")
    assert config["data"] == {"dataset": "cifar10", "validation_size": 7}
    assert config["backwork"] == configurator.default_config()["backwork"]  # Only [data] comes from the model's run.
    assert configurator.model_data_config(tmp_path / "elsewhere" / "model.keras") == configurator.default_config()
