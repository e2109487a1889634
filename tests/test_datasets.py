"""Beyond MNIST: colour, non-square images, any class count, and where each output came from."""
import hashlib
import json

import numpy as np
import pytest

import common
import configurator
import datasets
import figures
import proc_mnist
import results_format
import trainer
from common import UserError
from conftest import COLOUR_CLASSES, COLOUR_SHAPE, colour_options


def test_a_model_that_does_not_fit_the_data_names_the_key_to_set(colour_npz, tmp_path):
    data = datasets.load_dataset(colour_npz)
    with pytest.raises(UserError, match=r"images of shape \[10, 14, 3\].*set model.image_dim_size = \[10, 14, 3\]"):
        trainer.train(data, {"train": {"num_steps": 1}})
    options = colour_options()
    options["model"]["num_classes"] = 10
    with pytest.raises(UserError, match="the data has 3 classes but model.num_classes is 10; "
                                        "set model.num_classes = 3"):
        trainer.train(data, options)


def test_non_mnist_runs_get_their_own_default_folder(tiny_npz, tmp_path, monkeypatch):
    for name in ("MNIST_PATH", "DATA_PATH"):
        monkeypatch.delenv(name, raising=False)
    config = configurator.load_config(None, ["data.dataset=cifar10"])
    assert str(proc_mnist.default_out_dir(None, config)) == "runs/cifar10-default"
    assert str(proc_mnist.default_out_dir("configs/cifar10.toml", config)) == "runs/cifar10"
    assert str(proc_mnist.default_out_dir("configs/small.toml", configurator.load_config())) == "runs/small"
    # A local file names the folder too: the dataset it is recognised as, else its own name.
    fashion = tmp_path / "fashion_mnist.npz"
    fashion.write_bytes(tiny_npz.read_bytes())
    small = configurator.load_config()
    assert str(proc_mnist.default_out_dir("configs/small.toml", small, str(fashion))) == "runs/fashion_mnist-small"
    assert str(proc_mnist.default_out_dir("configs/small.toml", small, str(tiny_npz))) == "runs/tiny_mnist-small"
    monkeypatch.setenv("MNIST_PATH", str(tiny_npz))  # The README's MNIST set-up keeps runs/small.
    assert str(proc_mnist.default_out_dir("configs/small.toml", small)) == "runs/small"


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
    results = results_format.load_results(run / "backwork" / "results_1.pkl")
    assert results["images"].shape == (2, *COLOUR_SHAPE) and results["probs"].shape == (2, COLOUR_CLASSES)
    report = json.loads((augmented / "report.json").read_text())
    assert report["complete"] and len(report["rounds"]) == 2
    saliency = results_format.load_results(run / "saliency" / "saliency_test.pkl")
    assert saliency["guided"].shape == (2, *COLOUR_SHAPE)
    for figure in (run / "backwork" / "backwork.png", run / "saliency" / "saliency_test.png",
                   run / "saliency" / "saliency_results_1.png"):
        assert _colourful(figure), f"{figure.name} shows colour images in grey"


def test_every_output_records_the_data_it_was_made_from(colour_pipeline):
    run, augmented, npz = colour_pipeline
    expected = {"dataset": None, "file": str(npz), "sha256": hashlib.sha256(npz.read_bytes()).hexdigest(),
                "download": False}
    assert json.loads((run / "metrics.json").read_text())["data"] == expected
    assert json.loads((augmented / "report.json").read_text())["data"] == expected
    for folder in (run, augmented):
        text = (folder / "config.toml").read_text()
        assert text.startswith(f"# data: {npz}, sha256 {expected['sha256']}\n")
        # The [data] section names the data used (a file not recognised: dataset ""), and still loads.
        assert configurator.load_config(folder / "config.toml")["data"] == {
            "dataset": "", "file": str(npz), "sha256": expected["sha256"], "validation_size": 40}
    for path in (run / "backwork" / "results_0.pkl", run / "saliency" / "saliency_test.pkl",
                 augmented / "heldout" / "results_2.pkl", augmented / "round1" / "backwork" / "results_1.pkl"):
        assert results_format.load_results(path)["data"] == expected, path
    from_results = results_format.load_results(run / "saliency" / "saliency_results_1.pkl")["data"]
    assert from_results["file"] == str(run / "backwork" / "results_1.pkl") and len(from_results["sha256"]) == 64


def test_figures_draw_colour_inputs_in_colour_and_grey_ones_in_grey(tmp_path):
    import guided_backprop

    rng = np.random.default_rng(0)
    colour, grey = rng.uniform(0, 1, (3, *COLOUR_SHAPE)), rng.uniform(0, 1, (3, 10, 14))
    for images, name in [(colour, "colour.png"), (grey, "grey.png")]:
        figures.plot_image_grid([("label 0", images, ["a", "b", "c"])], "test", tmp_path / name)
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
        history = results_format.load_results(run / "backwork" / f"results_{label}.pkl")["history"]
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
    (tmp_path / "config.toml").write_text(datasets.provenance_comment(
        {"dataset": "cifar10", "file": None, "sha256": None}) + configurator.dump_toml(
        configurator.load_config(None, ["data.dataset=cifar10", "data.validation_size=7"])))
    config = configurator.model_data_config(tmp_path / "model.keras")
    assert config["data"] == {"dataset": "cifar10", "file": "", "sha256": "", "validation_size": 7}
    assert config["backwork"] == configurator.default_config()["backwork"]  # Only [data] comes from the model's run.
    assert configurator.model_data_config(tmp_path / "elsewhere" / "model.keras") == configurator.default_config()


def _other_colour_npz(folder):
    """Colour data of the same shape and classes as colour_npz, but other images: another dataset."""
    from conftest import make_colour_images

    path = folder / "other_colour.npz"
    x_train, y_train = make_colour_images(200, seed=5)
    x_test, y_test = make_colour_images(40, seed=6)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def test_every_script_given_a_model_refuses_other_data_unless_allowed(colour_pipeline, tmp_path, capsys):
    import cnn_backwork
    import guided_backprop
    import preprocess_data

    run, _, npz = colour_pipeline
    other, model = _other_colour_npz(tmp_path), str(run / "model.keras")
    commands = {
        "cnn_backwork": (cnn_backwork.main, ["--model", model, "--labels", "0", "--out", str(tmp_path / "bw")]),
        "guided_backprop": (guided_backprop.main, ["--model", model, "--num", "1", "--out", str(tmp_path / "sal")]),
        "preprocess_data": (preprocess_data.main, ["--model", model, "--results", str(run / "backwork"),
                                                   "--out", str(tmp_path / "aug")]),
        "proc_mnist --resume": (proc_mnist.main, ["--out", str(run), "--resume", "--steps", "60"]),
    }
    for name, (main, arguments) in commands.items():
        with pytest.raises(UserError, match=rf"model {run / 'model.keras'} was trained on {npz} \(sha256 .*\.\.\.\), "
                                            rf"but the data is {other} \(sha256 .*--allow-other-data"):
            main([*arguments, "--data", str(other)])
    assert not (tmp_path / "bw").exists() and not (tmp_path / "sal").exists()
    # A fresh run into a folder holding a model of other data is refused too; the default folder names the data.
    with pytest.raises(UserError, match="choose another --out"):
        proc_mnist.main([str(run / "config.toml"), "--out", str(run), "--data", str(other)])
    # Allowed: said in the output and recorded in what is written.
    capsys.readouterr()
    assert guided_backprop.main(["--model", model, "--num", "1", "--method", "vanilla", "--out", str(tmp_path / "sal"),
                                 "--data", str(other), "--allow-other-data"]) == 0
    assert f"note: --allow-other-data: model {model} was trained on {npz}" in capsys.readouterr().out
    recorded = results_format.load_results(tmp_path / "sal" / "saliency_test.pkl")["data"]
    assert recorded["file"] == str(other) and recorded["model_data"]["file"] == str(npz)
    # With no --data, the model's own file (its config's data.file) is read: nothing to refuse.
    assert guided_backprop.main(["--model", model, "--num", "1", "--method", "vanilla",
                                 "--out", str(tmp_path / "own")]) == 0
    assert "model_data" not in results_format.load_results(tmp_path / "own" / "saliency_test.pkl")["data"]


def test_ood_reports_how_confident_models_are_on_another_dataset(colour_pipeline, tmp_path, capsys):
    import cnn_backwork

    run, _, _ = colour_pipeline
    other = _other_colour_npz(tmp_path)
    assert cnn_backwork.main(["--ood", str(other), "--model", str(run / "model.keras"), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "ood_other_colour.json").read_text())
    numbers = report["models"][str(run / "model.keras")]
    model = __import__("cnn").load_trained_model(run / "model.keras")
    top = np.asarray(model(datasets.load_dataset(other)["x_test"])).max(axis=1)
    assert numbers["images"] == 40 and numbers["mean_top_p"] == pytest.approx(top.mean(), rel=1e-5)
    assert numbers["top_p_at_0.99"] == np.mean(top >= 0.99) and numbers["top_p_at_0.999"] == np.mean(top >= 0.999)
    shares = [row["predicted"] for row in numbers["most_predicted"]]
    assert shares == sorted(shares, reverse=True) and sum(shares) == pytest.approx(1.0)  # 3 classes: all listed.
    assert report["ood_data"]["file"] == str(other) and "mean top p" in capsys.readouterr().out
    by_class = numbers["by_ood_class"]
    other_labels = datasets.load_dataset(other)["y_test"]
    assert [row["images"] for row in by_class] == np.bincount(other_labels)[np.unique(other_labels)].tolist()
    assert sum(row["confident"] * row["images"] for row in by_class) == pytest.approx(
        numbers["top_p_at_0.99"] * numbers["images"])
    with pytest.raises(UserError, match=r"--ood .*small.npz holds images of shape \(5, 5, 1\), the model's"):
        cnn_backwork.main(["--ood", str(_small_npz(tmp_path)), "--model", str(run / "model.keras")])
    with pytest.raises(UserError, match=r"missing.npz does not exist; give --ood a Keras-layout .npz") as error:
        cnn_backwork.main(["--ood", str(tmp_path / "missing.npz"), "--model", str(run / "model.keras")])
    assert "--data" not in str(error.value)


def _small_npz(folder):
    x = np.zeros((4, 5, 5), np.uint8)
    np.savez(folder / "small.npz", x_train=x, y_train=np.arange(4), x_test=x, y_test=np.arange(4))
    return folder / "small.npz"


def test_confidence_numbers_count_levels_and_name_the_classes():
    import cnn_backwork

    probabilities = np.array([[0.9995, 0.0005, 0], [0.995, 0.005, 0], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    numbers = cnn_backwork.confidence_numbers(probabilities, ["T-shirt/top", "Trouser", "Pullover"], top=2)
    assert numbers["top_p_at_0.99"] == 0.5 and numbers["top_p_at_0.999"] == 0.25
    assert numbers["mean_top_p"] == pytest.approx((0.9995 + 0.995 + 0.7 + 0.8) / 4)
    assert numbers["most_predicted"] == [
        {"class": 0, "name": "T-shirt/top", "predicted": 0.5, "at_0.99": 0.5, "at_0.999": 0.25},
        {"class": 1, "name": "Trouser", "predicted": 0.25, "at_0.99": 0.0, "at_0.999": 0.0}]
    assert "'T-shirt/top' 50% (50%)" in cnn_backwork.ood_table({"m.keras": numbers})


def test_confidence_by_class_says_how_often_each_other_class_is_taken_confidently_and_as_what():
    import cnn_backwork

    probabilities = np.array([[0.995, 0.005], [0.001, 0.999], [0.999, 0.001], [0.6, 0.4], [0.3, 0.7]])
    ood_labels = np.array([0, 0, 0, 2, 2])  # Class 1 of the other data has no image here.
    rows = cnn_backwork.confidence_by_class(probabilities, ["0", "1"], ood_labels, ["Shirt", "Bag", "Sneaker"])
    assert rows == [
        {"class": 0, "name": "Shirt", "images": 3, "confident": 1.0, "as_class": 0, "as_name": "0",
         "as_share": pytest.approx(2 / 3)},
        {"class": 2, "name": "Sneaker", "images": 2, "confident": 0.0, "as_class": None, "as_name": None,
         "as_share": None}]
    table = cnn_backwork.by_class_table(rows)
    assert "Shirt     100.0%  '0' 66.7%" in table and table.splitlines()[-1].endswith("0.0%  -")


def _named_results(dataset, labels=(1, 7)):
    from conftest import fake_backwork_results

    results = {}
    for label in labels:
        result = fake_backwork_results(label)
        result.update(reinitialised=0, nearest_training_distance=np.ones(3, np.float32),
                      worst_training_images=result["images"][:2], worst_training_probs=result["probs"][:2],
                      data={"dataset": dataset, "file": None, "sha256": None, "download": True})
        results[label] = result
    return results


@pytest.mark.parametrize("dataset,label_1,label_7", [("fashion_mnist", "Trouser", "Sneaker"), ("mnist", "1", "7"),
                                                     ("cifar10", "automobile", "horse"), (None, "1", "7")])
def test_backwork_figures_and_table_name_the_classes(dataset, label_1, label_7, monkeypatch, tmp_path):
    import cnn_backwork

    drawn = []
    monkeypatch.setattr(figures, "plot_image_grid", lambda rows, title, path: drawn.append(rows))
    results = _named_results(dataset)
    figures.plot_results(results, tmp_path / "a.png")
    figures.plot_worst_training(results, tmp_path / "b.png")
    assert [row[0] for row in drawn[0]] == [f"label {label_1}", f"label {label_7}"]
    assert drawn[1][1][2][0].endswith(f"says {label_7}")  # The worst training example's predicted class.
    table = cnn_backwork.summary_table(results).splitlines()
    assert table[1].split()[0] == label_1.split()[0] and label_7 in table[2]


@pytest.mark.parametrize("name,expected", [("fashion_mnist.npz", "class Ankle boot"), ("mnist.npz", "class 9")])
def test_saliency_figure_names_the_classes(name, expected, trained_tiny, tiny_npz, tmp_path, monkeypatch):
    import guided_backprop

    data_file = tmp_path / name  # The tiny data under a dataset's name: recognised as that dataset.
    data_file.write_bytes(tiny_npz.read_bytes())
    titles = []
    monkeypatch.setattr(guided_backprop, "plot_saliency", lambda path, images, maps, row_titles, *rest:
                        titles.extend(row_titles))
    assert guided_backprop.main(["--model", str(trained_tiny[0]), "--data", str(data_file), "--num", "1",
                                 "--label", "9", "--method", "vanilla", "--out", str(tmp_path / "out")]) == 0
    assert titles[0].startswith(f"{expected}\nexplained: {expected.split(' ', 1)[1]}\n")


# ------------------------------------------------------------ hostile data files: one line, bounded memory


def small_arrays():
    x = np.zeros((4, 5, 5), np.uint8)
    return {"x_train": x, "y_train": np.arange(4), "x_test": x, "y_test": np.arange(4)}


def npy_bytes(array):
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_claiming(path, claimed_size):
    """A zip whose directory says x_train.npy inflates to claimed_size bytes (zip64 above 4 GiB) while the
    member holds a small array: what a crafted header says, not what is there."""
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name, array in small_arrays().items():
            archive.writestr(f"{name}.npy", npy_bytes(array))
        archive.getinfo("x_train.npy").file_size = claimed_size  # Written into the directory as the archive closes.
    return path


def test_a_header_claiming_a_terabyte_is_refused_unread(tmp_path):
    import zipfile

    path = write_claiming(tmp_path / "terabyte.npz", 10**12)
    assert zipfile.ZipFile(path).getinfo("x_train.npy").file_size == 10**12  # The zip64 record says so.
    with pytest.raises(UserError, match=r"terabyte.npz: its arrays would take 1000000000\d+ bytes decompressed, "
                                        r"more than a data file may \(1073741824\)") as refusal:
        datasets.load_dataset(path)
    assert str(refusal.value).count(datasets.DATA_HINT) == 1
    # Within the bound but more than its compressed bytes can hold: the directory lies.
    with pytest.raises(UserError, match=r"x_train.npy claims 500000000 bytes from \d+ compressed ones"):
        datasets.load_dataset(write_claiming(tmp_path / "lies.npz", 500_000_000))


def test_a_zip_bomb_is_refused_before_it_is_inflated(tmp_path, monkeypatch):
    """A small file that inflates to more than MAX_DATA_BYTES (here lowered to 1 MB: the real bound, 1 GiB,
    is refused the same way from the same directory) is refused from its directory, before reading."""
    bomb = {**small_arrays(), "x_train": np.zeros((2000, 28, 28), np.uint8)}  # 1.6 MB of zeros
    np.savez_compressed(tmp_path / "bomb.npz", **bomb)
    assert (tmp_path / "bomb.npz").stat().st_size < 10_000
    monkeypatch.setattr(datasets, "MAX_DATA_BYTES", 1_000_000)
    inflated = []
    monkeypatch.setattr(np, "load", lambda *arguments, **keywords: inflated.append(arguments))
    with pytest.raises(UserError, match=r"bomb.npz: its arrays would take 1568\d+ bytes decompressed"):
        datasets.load_dataset(tmp_path / "bomb.npz")
    assert inflated == []


def test_an_object_array_is_named_and_the_hint_given_once(tmp_path):
    np.savez(tmp_path / "objects.npz", **{**small_arrays(), "y_train": np.array([1, "a", None, 2], object)})
    with pytest.raises(UserError, match=r"y_train.npy is an array of Python objects \(dtype object\), which a "
                                        r"data file never holds") as refusal:
        datasets.load_dataset(tmp_path / "objects.npz")
    assert "damaged" not in str(refusal.value) and str(refusal.value).count(datasets.DATA_HINT) == 1
    with pytest.raises(UserError) as refusal:
        datasets.read_ood_images(write_claiming(tmp_path / "ood.npz", 10**12), (5, 5, 1))
    assert str(refusal.value).count(datasets.OOD_HINT) == 1 and datasets.DATA_HINT not in str(refusal.value)


def test_only_the_arrays_are_read_from_an_archive(tmp_path):
    import zipfile

    path = tmp_path / "extra.npz"
    np.savez(path, **small_arrays())
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("notes.txt", b"x" * 1000)
    data = datasets.load_dataset(path)
    assert data["x_train"].shape == (4, 5, 5, 1) and "notes.txt" not in data


def test_what_is_read_is_checked_against_the_directory(tmp_path):
    """A member whose bytes are not the ones its directory entry describes (CRC, or a shorter stream) is
    one line: zipfile stops at the size claimed and checks the CRC, numpy that it got every byte."""
    np.savez(tmp_path / "good.npz", **small_arrays())
    data = bytearray((tmp_path / "good.npz").read_bytes())
    data[data.index(b"\x93NUMPY") + 200] ^= 0xFF  # One pixel of x_train changed after the CRC was written.
    (tmp_path / "changed.npz").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"changed.npz is not a readable .npz file \(Bad CRC-32 for file "
                                        r"'x_train.npy'\)") as refusal:
        datasets.load_dataset(tmp_path / "changed.npz")
    assert "\n" not in str(refusal.value)
