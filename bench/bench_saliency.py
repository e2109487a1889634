"""Speed of guided backpropagation against the plain input gradient, on the same batch.

    python bench/bench_saliency.py [--model PATH] [--batch 256] [--warmup 2] [--repeats 5]

The default network of configs/default.toml with random weights (or a trained --model) and
random 28x28 images: the cost of a gradient does not depend on what the weights learnt.
Prints images per second of each method and the ratio of their costs; the goal is that
guided backpropagation costs at most 1.5 times the plain gradient.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Run from anywhere: find the project.

import numpy as np  # noqa: E402

import cnn  # noqa: E402
import common  # noqa: E402
import configurator  # noqa: E402
import guided_backprop  # noqa: E402
from bench.machine import cpu_line  # noqa: E402

GOAL = 1.5  # guided backpropagation may cost at most this many plain gradients


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description="Images per second of guided backprop and the plain gradient.")
    parser.add_argument("--model", help="a trained model.keras (default: the default topology, random weights)")
    parser.add_argument("--batch", type=int, default=256, help="images per call")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each method first")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each method (the median counts)")
    return parser.parse_args(argv)


def median_seconds(methods, model, images, labels, warmup, repeats):
    """Median seconds per call of each method; calls alternate so background load hits both alike."""
    for _ in range(warmup):
        for method in methods.values():
            method(model, images, labels)
    seconds = {name: [] for name in methods}
    for _ in range(repeats):
        for name, method in methods.items():
            start = time.perf_counter()
            method(model, images, labels)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def main(argv=None):
    args = parse_arguments(argv)
    if args.batch < 1 or args.warmup < 0 or args.repeats < 1:
        raise common.UserError("--batch and --repeats must be at least 1 and --warmup at least 0")
    if args.model:
        model = cnn.load_trained_model(args.model)
    else:
        import keras

        keras.utils.set_random_seed(0)
        model = cnn.build_model(configurator.default_config()["model"])
    rng = np.random.default_rng(0)
    images = rng.random((args.batch, *model.input_shape[1:]), dtype=np.float32)  # (batch, 28, 28, 1)
    labels = np.arange(args.batch) % model.output_shape[-1]  # Fixed classes: no argmax differences.
    methods = {"guided": guided_backprop.guided_backprop, "vanilla": guided_backprop.vanilla_gradient}
    seconds = median_seconds(methods, model, images, labels, args.warmup, args.repeats)
    print(cpu_line())
    print(f"batch of {args.batch} images {tuple(model.input_shape[1:])}, median of {args.repeats} calls "
          f"after {args.warmup} warm-up calls")
    for name, value in seconds.items():
        print(f"{name:8s} {args.batch / value:8.1f} images/s  ({1000 * value:.1f} ms per call)")
    ratio = seconds["guided"] / seconds["vanilla"]
    print(f"guided / vanilla cost: {ratio:.2f} (goal <= {GOAL}: {'met' if ratio <= GOAL else 'MISSED'})")
    return 0


if __name__ == "__main__":
    common.run_cli(main)
