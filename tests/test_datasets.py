"""Beyond MNIST: colour, non-square images, any class count, and where each output came from."""
import hashlib
import json

import numpy as np
import pytest

import common
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
    config = common.load_config(None, ["data.dataset=cifar10"])
    assert str(proc_mnist.default_out_dir(None, config)) == "runs/cifar10-default"
    assert str(proc_mnist.default_out_dir("configs/cifar10.toml", config)) == "runs/cifar10"
    assert str(proc_mnist.default_out_dir("configs/small.toml", common.load_config())) == "runs/small"


def test_cifar10_config_is_the_default_network_for_32x32_colour():
    config = common.load_config(common.PROJECT_DIR / "configs" / "cifar10.toml")
    model = proc_mnist.build_model(config["model"])
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 10)
    assert config["data"]["dataset"] == "cifar10"
    default = proc_mnist.build_model(common.default_config()["model"])
    assert [layer.name for layer in model.layers] == [layer.name for layer in default.layers]
