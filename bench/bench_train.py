"""Training speed: our training loop against keras.Model.fit, and against a NumPy matmul.

    python bench/bench_train.py [--steps 200] [--config configs/default.toml] [--data PATH]
                                [--batch-sizes 50,128] [--bfloat16]

Both train the same topology (the config's) with the same batch size and Adam for the
same number of steps, in this one process, at each batch size (by default 50, the
original recipe's, and the config's train.batch_size); a third line times our loop with
the config's label smoothing and shifts as well, a fourth with train.mixed_precision =
"mixed_bfloat16" (bf16 arithmetic, float32 weights) where that is fast (a GPU, or a CPU with
avx512_bf16 or amx_bf16: cnn.bfloat16_slowness); elsewhere it is skipped with a note,
as it would run several times slower, unless --bfloat16 asks for it (then with a short
budget). Each is run --repeats times, alternating, and its best run counts (other jobs on a
shared machine slow whichever runs beside them). The output starts with the CPU's model and
vector extensions. The defaults (200 steps, calls of 50 steps, two runs, two batch sizes)
are sized to end within 8 minutes on 2 cores.
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

import cnn  # noqa: E402
import datasets  # noqa: E402
from bench.machine import cpu_line, forward_flops_per_example, numpy_matmul_rate  # noqa: E402  (re-exported: the tests call bench_train.cpu_line)
import configurator  # noqa: E402
import trainer  # noqa: E402


FORCED_BFLOAT16_STEPS = 20  # --bfloat16 where it is slow: this many timed steps, one run (0.13x float32's speed).


def bfloat16_budget(steps, block, repeats, force, slowness):
    """(steps, block, repeats) for the mixed_bfloat16 rows, or None to skip them.

    slowness is cnn.bfloat16_slowness(): None where bf16 arithmetic is fast, and the
    rows get the full budget; else they run only when forced, with a short fixed budget.
    """
    if slowness is None:
        return steps, block, repeats
    if not force:
        return None
    short = min(steps, FORCED_BFLOAT16_STEPS)
    return short, min(block, short), 1


def training_flops_per_example(model):
    forward = forward_flops_per_example(model)
    first = next(iter(forward))
    return 3 * sum(forward.values()) - forward[first]


def time_ours(config, images, targets, steps, block, batch_size, recipe=False, precision="none"):
    """Our loop, block steps per call: the same work as fit, or with recipe=True as train() runs
    the config (its label smoothing, shifts and flips too); precision is a train.mixed_precision value."""
    section = config["train"]
    with cnn.precision_policy(precision):
        model = cnn.build_model(config["model"])
    trainer.compile_for_training(model, section["learning_rate"])
    smoothing, shifts, flip = ((section["label_smoothing"], section["shift_pixels"], section["flip"]) if recipe
                               else (0.0, 0, False))
    run_steps = trainer.make_train_function(model, images, targets, smoothing, shifts, section["seed"], flip=flip)
    run_steps(trainer.batch_indices(len(images), batch_size, 0, 0, block))  # Traces once.
    start = time.perf_counter()
    for first in range(block, block + steps, block):
        float(run_steps(trainer.batch_indices(len(images), batch_size, 0, first, block))[0])
    return steps * batch_size / (time.perf_counter() - start), model


def time_fit(config, images, targets, steps, batch_size):
    import keras

    model = cnn.build_model(config["model"])
    model.compile(optimizer=keras.optimizers.Adam(config["train"]["learning_rate"]),
                  loss="categorical_crossentropy", jit_compile=False)
    model.fit(images[:batch_size * 10], targets[:batch_size * 10], batch_size=batch_size, epochs=1, verbose=0)
    count = steps * batch_size
    start = time.perf_counter()
    model.fit(images[:count], targets[:count], batch_size=batch_size, epochs=1, verbose=0, shuffle=True)
    return count / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config whose [model] and [train] to use (default: the defaults)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps of each")
    parser.add_argument("--block", type=int, default=50, help="steps per call of our compiled loop")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best counts")
    parser.add_argument("--batch-sizes", help="comma-separated batch sizes (default: 50 and train.batch_size)")
    parser.add_argument("--data", help="Keras-layout .npz; default: random images (speed does not depend on them)")
    parser.add_argument("--bfloat16", action="store_true",
                        help=f"time mixed_bfloat16 even where it is slow (no GPU, no avx512_bf16 or amx_bf16), "
                             f"with {FORCED_BFLOAT16_STEPS} steps and one run")
    arguments = parser.parse_args(argv)
    print(cpu_line())
    slowness = cnn.bfloat16_slowness()
    bfloat16 = bfloat16_budget(arguments.steps, arguments.block, arguments.repeats, arguments.bfloat16, slowness)
    if slowness is not None:
        print(f"note: mixed_bfloat16 {'is timed with a short budget' if bfloat16 else 'rows skipped'}: {slowness}, "
              "so it runs several times slower than float32 (0.13x on an AVX2-only AMD EPYC)"
              + ("" if bfloat16 else "; --bfloat16 times it anyway, briefly"))
    config = configurator.load_config(arguments.config)
    batch_sizes = ([int(size) for size in arguments.batch_sizes.split(",")] if arguments.batch_sizes
                   else sorted({50, config["train"]["batch_size"]}))
    count = (arguments.steps + arguments.block) * max(batch_sizes)
    if arguments.data:
        data = datasets.load_dataset(arguments.data, config["data"]["dataset"])
        images, labels = data["x_train"][:count], data["y_train"][:count]
    else:
        rng = np.random.default_rng(0)
        shape = cnn._image_shape(config["model"]["image_dim_size"])
        images = rng.random((count, *shape), dtype=np.float32)
        labels = rng.integers(0, config["model"]["num_classes"], count)
    targets = trainer.to_targets(labels, config["model"]["num_classes"])

    section = config["train"]
    print(f"topology: {arguments.config or 'configs/default.toml'}, {arguments.steps} steps each, best of "
          f"{arguments.repeats}; recipe: label_smoothing {section['label_smoothing']}, "
          f"shift_pixels {section['shift_pixels']}, flip {section['flip']}")
    for batch_size in batch_sizes:
        ours, recipe, reference, bfloat16_rate, matmul_rate = 0.0, 0.0, 0.0, 0.0, numpy_matmul_rate()
        for repeat in range(arguments.repeats):
            rate, model = time_ours(config, images, targets, arguments.steps, arguments.block, batch_size)
            ours = max(ours, rate)
            reference = max(reference, time_fit(config, images, targets, arguments.steps, batch_size))
            recipe = max(recipe, time_ours(config, images, targets, arguments.steps, arguments.block, batch_size,
                                           recipe=True)[0])
            if bfloat16 is not None and repeat < bfloat16[2]:
                bfloat16_rate = max(bfloat16_rate, time_ours(config, images, targets, *bfloat16[:2], batch_size,
                                                             precision="mixed_bfloat16")[0])
            matmul_rate = max(matmul_rate, numpy_matmul_rate())
        flops = training_flops_per_example(model)
        print(f"batch {batch_size}: {flops / 1e6:.1f} MFLOP per training example")
        print(f"  ours (compiled multi-step loop): {ours:8.0f} examples/s  {ours * flops / 1e9:6.1f} GFLOP/s")
        print(f"  keras fit (jit_compile=False):   {reference:8.0f} examples/s  {reference * flops / 1e9:6.1f} GFLOP/s")
        print(f"  ours with the [train] recipe:    {recipe:8.0f} examples/s  (label smoothing, shifts, flips)")
        if bfloat16 is not None:
            print(f"  ours, mixed_bfloat16:            {bfloat16_rate:8.0f} examples/s  "
                  f"({bfloat16_rate / ours:.2f} x float32; {bfloat16[0]} steps, best of {bfloat16[2]})")
        print(f"  numpy float32 matmul:            {matmul_rate / 1e9:23.1f} GFLOP/s")
        print(f"  ratio ours / fit: {ours / reference:.2f} (goal >= 1.1)")
        print(f"  ratio ours FLOP rate / numpy matmul: {ours * flops / matmul_rate:.2f} (goal >= 0.6)")


if __name__ == "__main__":
    main()
