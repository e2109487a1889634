"""Attack speed: our compiled PGD step against ART's targeted PGD, and against a NumPy matmul.

    python bench/bench_attacks.py [--steps 40] [--repeats 2] [--batch-sizes 80,256]
                                  [--config PATH | --model PATH]

On one model (the config's topology with random weights, configs/default.toml's by
default, or a trained --model), at each batch size, from the same uniform-noise starts
and targets: box_attacks.pgd (cross-entropy towards the target, the whole box [0, 1],
step 0.01, no early stop) and ART's targeted ProjectedGradientDescent with the same
settings (eps = 1, so only the box binds, as attacks.run_pgd runs it), both for --steps
steps in one call. Also timed: our PGD with the first convolution's input gradient left
to TensorFlow (the plain Conv2D gradient, not cnn.input_gradient_model's depthwise
convolution) and our APGD. Each is run --repeats times, alternating, and its best run
counts (other jobs on a shared machine slow whichever runs beside them). The output
starts with the CPU's model and vector extensions. The defaults end within about two
minutes on 2 cores.

Rates are image-steps per second (images x steps / seconds, the whole call: tracing is
done by an untimed warm-up call). The FLOP rate counts each Conv2D and Dense layer's
multiply-adds as 2 FLOPs (forward_flops_per_example); a step is one forward pass and one
backward pass to the input, in which each layer's input gradient is one product the size
of its forward one, and no weight gradient is taken: 2 x the forward FLOPs. Pooling,
activations and the softmax are not counted. It is compared with a float32 NumPy matrix
multiply timed in the same run: the best rate this machine's BLAS reaches.
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import attacks  # noqa: E402
import box_attacks  # noqa: E402
import cnn  # noqa: E402
import common  # noqa: E402
import datasets  # noqa: E402
from bench.machine import (add_model_arguments, cpu_line, forward_flops_per_example, load_model,  # noqa: E402
                           numpy_matmul_rate)

STEP_SIZE = 0.01  # attacks.run_pgd's default pgd_step_size; the speed does not depend on it.


def attack_step_flops_per_example(model):
    """A step's FLOPs per image: the forward pass and the backward pass to the input, 2 x the forward."""
    return 2 * sum(forward_flops_per_example(model).values())


def time_ours(model, images, targets, steps, attack="pgd", depthwise_gradient=True):
    """Image-steps/s of box_attacks' pgd or apgd over the whole box, after an untimed warm-up call (tracing)."""
    lower, upper = box_attacks.whole_box(images)
    options = {"steps": steps, "depthwise_gradient": depthwise_gradient}
    if attack == "pgd":
        options["step_size"] = STEP_SIZE
    run = getattr(box_attacks, attack)
    run(model, images, lower, upper, "cross_entropy", targets, **{**options, "steps": 1})
    start = time.perf_counter()
    run(model, images, lower, upper, "cross_entropy", targets, **options)
    return len(images) * steps / (time.perf_counter() - start)


def time_art(model, images, targets, steps):
    """Image-steps/s of ART's targeted PGD (eps = 1: only the [0, 1] box binds), after a one-step warm-up."""
    classifier, classes = attacks.art_classifier(model), model.output_shape[-1]  # First: it imports ART quietly.
    from art.attacks.evasion import ProjectedGradientDescent

    def run(iterations):
        attack = ProjectedGradientDescent(classifier, norm=np.inf, eps=1.0, eps_step=STEP_SIZE, max_iter=iterations,
                                          targeted=True, num_random_init=0, batch_size=len(images), verbose=False)
        attack.generate(images, y=datasets.one_hot(targets, classes))

    run(1)
    start = time.perf_counter()
    run(steps)
    return len(images) * steps / (time.perf_counter() - start)


def time_batch(model, batch_size, steps, repeats):
    """{row name: best image-steps/s} at one batch size, the rows alternating within each repeat."""
    rng = np.random.default_rng(batch_size)
    images = rng.random((batch_size, *model.input_shape[1:]), dtype=np.float32)
    targets = rng.integers(0, model.output_shape[-1], batch_size)
    rows = {"pgd": lambda: time_ours(model, images, targets, steps),
            "pgd_plain": lambda: time_ours(model, images, targets, steps, depthwise_gradient=False),
            "apgd": lambda: time_ours(model, images, targets, steps, attack="apgd"),
            "art": lambda: time_art(model, images, targets, steps),
            "matmul": numpy_matmul_rate}
    best = dict.fromkeys(rows, 0.0)
    for _ in range(repeats):
        for name, timed in rows.items():
            best[name] = max(best[name], timed())
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each attack per run")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best counts")
    parser.add_argument("--batch-sizes", default="80,256", help="comma-separated batch sizes (default: 80,256)")
    arguments = parser.parse_args(argv)
    if arguments.steps < 1 or arguments.repeats < 1:
        raise common.UserError("--steps and --repeats must be at least 1")
    try:
        batch_sizes = [int(size) for size in arguments.batch_sizes.split(",")]
    except ValueError:
        raise common.UserError(f"--batch-sizes {arguments.batch_sizes!r} must be comma-separated integers") from None
    print(cpu_line())
    model, description = load_model(arguments)
    model = cnn.float32_model(model)
    flops = attack_step_flops_per_example(model)
    print(f"model: {description}; {flops / 2e6:.1f} MFLOP forward per image, a step (forward + backward to the "
          f"input) {flops / 1e6:.1f} MFLOP; {arguments.steps} steps per run, best of {arguments.repeats}")
    for batch_size in batch_sizes:
        best = time_batch(model, batch_size, arguments.steps, arguments.repeats)
        print(f"batch {batch_size}:")
        for name, words in [("pgd", "ours, PGD (compiled)"), ("pgd_plain", "ours, PGD, plain conv gradient"),
                            ("apgd", "ours, APGD (compiled)"), ("art", "ART targeted PGD")]:
            print(f"  {words + ':':32} {best[name]:8.0f} image-steps/s  {best[name] * flops / 1e9:6.1f} GFLOP/s")
        print(f"  {'numpy float32 matmul:':32} {best['matmul'] / 1e9:31.1f} GFLOP/s")
        print(f"  ratio ours / ART: {best['pgd'] / best['art']:.2f} (goal >= 3 at the study's batch)")
        print(f"  ratio ours FLOP rate / numpy matmul: {best['pgd'] * flops / best['matmul']:.2f} "
              "(goal >= 0.8 at a batch of 256 or more)")


if __name__ == "__main__":
    common.run_cli(main)
