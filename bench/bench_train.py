"""Training speed: our training loop against keras.Model.fit, and against a NumPy matmul.

    python bench/bench_train.py [--steps 300] [--config configs/default.toml] [--data PATH]
                                [--batch-sizes 50,128]

Both train the same topology (the config's) with the same batch size and Adam for the
same number of steps, in this one process, at each batch size (by default 50, the
original recipe's, and the config's train.batch_size); a third line times our loop with
the config's label smoothing and shifts as well, a fourth with train.mixed_precision =
"mixed_bfloat16" (bf16 arithmetic, float32 weights). Each is run --repeats times, alternating,
and its best run counts (other jobs on a shared machine slow whichever runs beside them).
The FLOP rate counts the multiply-adds of the convolutions and dense layers (forward, plus
the two backward products, less the input gradient of the first layer, which nobody
needs) and is compared with a float32 NumPy matrix multiply timed in the same run: the
best rate this machine's BLAS reaches.
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import common  # noqa: E402
import distributed  # noqa: E402
import proc_mnist  # noqa: E402


def forward_flops_per_example(model):
    """Floating-point operations of each Conv2D and Dense layer for one example: {name: flops}."""
    flops = {}
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "Conv2D":
            kernel_height, kernel_width, channels_in, channels_out = layer.kernel.shape
            _, height, width, _ = layer.output.shape
            flops[layer.name] = 2 * height * width * kernel_height * kernel_width * channels_in * channels_out
        elif kind == "Dense":
            flops[layer.name] = 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    return flops


def training_flops_per_example(model):
    forward = forward_flops_per_example(model)
    first = next(iter(forward))
    return 3 * sum(forward.values()) - forward[first]


def numpy_matmul_rate(size=1024, repeats=10):
    rng = np.random.default_rng(0)
    left, right = (rng.random((size, size), dtype=np.float32) for _ in range(2))
    left @ right
    start = time.perf_counter()
    for _ in range(repeats):
        left @ right
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def time_ours(config, images, targets, steps, block, batch_size, recipe=False, precision="none"):
    """Our loop, block steps per call: the same work as fit, or with recipe=True as train() runs
    the config (its label smoothing and shifts too); precision is a train.mixed_precision value."""
    section = config["train"]
    with distributed.precision_policy(precision):
        model = proc_mnist.build_model(config["model"])
    proc_mnist.compile_for_training(model, section["learning_rate"])
    smoothing, shifts = (section["label_smoothing"], section["shift_pixels"]) if recipe else (0.0, 0)
    run_steps = proc_mnist.make_train_function(model, images, targets, smoothing, shifts, section["seed"])
    run_steps(proc_mnist.batch_indices(len(images), batch_size, 0, 0, block))  # Traces once.
    start = time.perf_counter()
    for first in range(block, block + steps, block):
        float(run_steps(proc_mnist.batch_indices(len(images), batch_size, 0, first, block))[0])
    return steps * batch_size / (time.perf_counter() - start), model


def time_fit(config, images, targets, steps, batch_size):
    import keras

    model = proc_mnist.build_model(config["model"])
    model.compile(optimizer=keras.optimizers.Adam(config["train"]["learning_rate"]),
                  loss="categorical_crossentropy", jit_compile=False)
    model.fit(images[:batch_size * 10], targets[:batch_size * 10], batch_size=batch_size, epochs=1, verbose=0)
    count = steps * batch_size
    start = time.perf_counter()
    model.fit(images[:count], targets[:count], batch_size=batch_size, epochs=1, verbose=0, shuffle=True)
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config whose [model] and [train] to use (default: the defaults)")
    parser.add_argument("--steps", type=int, default=300, help="timed steps of each")
    parser.add_argument("--block", type=int, default=100, help="steps per call of our compiled loop")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best counts")
    parser.add_argument("--batch-sizes", help="comma-separated batch sizes (default: 50 and train.batch_size)")
    parser.add_argument("--data", help="Keras-layout .npz; default: random images (speed does not depend on them)")
    arguments = parser.parse_args()
    config = common.load_config(arguments.config)
    batch_sizes = ([int(size) for size in arguments.batch_sizes.split(",")] if arguments.batch_sizes
                   else sorted({50, config["train"]["batch_size"]}))
    count = (arguments.steps + arguments.block) * max(batch_sizes)
    if arguments.data:
        data = common.load_dataset(arguments.data, config["data"]["dataset"])
        images, labels = data["x_train"][:count], data["y_train"][:count]
    else:
        rng = np.random.default_rng(0)
        shape = proc_mnist._image_shape(config["model"]["image_dim_size"])
        images = rng.random((count, *shape), dtype=np.float32)
        labels = rng.integers(0, config["model"]["num_classes"], count)
    targets = proc_mnist.to_targets(labels, config["model"]["num_classes"])

    section = config["train"]
    print(f"topology: {arguments.config or 'configs/default.toml'}, {arguments.steps} steps each, best of "
          f"{arguments.repeats}; recipe: label_smoothing {section['label_smoothing']}, "
          f"shift_pixels {section['shift_pixels']}")
    for batch_size in batch_sizes:
        ours, recipe, reference, bfloat16, matmul_rate = 0.0, 0.0, 0.0, 0.0, numpy_matmul_rate()
        for _ in range(arguments.repeats):
            rate, model = time_ours(config, images, targets, arguments.steps, arguments.block, batch_size)
            ours = max(ours, rate)
            reference = max(reference, time_fit(config, images, targets, arguments.steps, batch_size))
            recipe = max(recipe, time_ours(config, images, targets, arguments.steps, arguments.block, batch_size,
                                           recipe=True)[0])
            bfloat16 = max(bfloat16, time_ours(config, images, targets, arguments.steps, arguments.block, batch_size,
                                               precision="mixed_bfloat16")[0])
            matmul_rate = max(matmul_rate, numpy_matmul_rate())
        flops = training_flops_per_example(model)
        print(f"batch {batch_size}: {flops / 1e6:.1f} MFLOP per training example")
        print(f"  ours (compiled multi-step loop): {ours:8.0f} examples/s  {ours * flops / 1e9:6.1f} GFLOP/s")
        print(f"  keras fit (jit_compile=False):   {reference:8.0f} examples/s  {reference * flops / 1e9:6.1f} GFLOP/s")
        print(f"  ours with the [train] recipe:    {recipe:8.0f} examples/s  (label smoothing, shifts)")
        print(f"  ours, mixed_bfloat16:            {bfloat16:8.0f} examples/s  ({bfloat16 / ours:.2f} x float32; "
              "fast only with bf16 arithmetic in the CPU or GPU)")
        print(f"  numpy float32 matmul:            {matmul_rate / 1e9:23.1f} GFLOP/s")
        print(f"  ratio ours / fit: {ours / reference:.2f} (goal >= 1.1)")
        print(f"  ratio ours FLOP rate / numpy matmul: {ours * flops / matmul_rate:.2f} (goal >= 0.6)")


if __name__ == "__main__":
    main()
