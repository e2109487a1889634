"""Certified bounds: the judging entries (float64) against the same bounds in float32, time and precision.

    python bench/bench_bounds.py [--points 1000] [--eps 0.3] [--repeats 2] [--config PATH | --model PATH]

On one model (the config's topology with random weights, configs/default.toml's by default,
or a trained --model, a combined ProoD model included), from --points uniform-noise points:
the log of the certified top-class bound over each point's eps-ball as the evaluation computes
it (interval_bounds.log_confidence_upper_bounds, float64) and as a training loss computes it
(interval_bounds.confidence_bound_tensor on float32 boxes), each timed --repeats times, the best
run counting (after an untimed warm-up). Printed: the CPU, both times and their ratio, and how
far float32 strays from float64: the largest difference of the log bounds and the number of
points whose float32 bound is lower, the direction that can make a "certified" bound unsound.
The defaults end within a minute on 2 cores.
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
import common  # noqa: E402
import interval_bounds  # noqa: E402
from bench.machine import add_model_arguments, cpu_line, load_model  # noqa: E402


def float32_log_bounds(model, images, eps, batch_size=interval_bounds.DEFAULT_BATCH_SIZE):
    """The training loss's arithmetic: confidence_bound_tensor on float32 boxes, a batch at a time."""
    parts = []
    for start in range(0, len(images), batch_size):
        # The judge's box, converted back to float32 exactly (it was clipped in float32).
        box = interval_bounds._judging_box(images[start:start + batch_size], eps)
        lower, upper = (end.astype(np.float32) for end in box)
        parts.append(np.asarray(interval_bounds.confidence_bound_tensor(model, lower, upper)))
    return np.concatenate(parts)


def best_time(function, repeats):
    """(best seconds over repeats, the last result), after one untimed call."""
    result, best = function(), float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--points", type=int, default=1000, help="uniform-noise points (default 1000)")
    parser.add_argument("--eps", type=float, default=0.3, help="l-infinity radius (default 0.3)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best counts")
    arguments = parser.parse_args(argv)
    if arguments.points < 1 or arguments.repeats < 1:
        raise common.UserError("--points and --repeats must be at least 1")
    eps = interval_bounds.check_radius(arguments.eps)
    print(cpu_line())
    model, description = load_model(arguments)
    model = cnn.float32_model(model)
    interval_bounds.check_model_supported(model)
    images = np.random.default_rng(0).uniform(0, 1, (arguments.points, *model.input_shape[1:])).astype(np.float32)
    print(f"model: {description}; {arguments.points} uniform-noise points, eps {eps}, best of {arguments.repeats}")
    judged_seconds, judged = best_time(lambda: interval_bounds.log_confidence_upper_bounds(model, images, eps),
                                       arguments.repeats)
    float32_seconds, float32 = best_time(lambda: float32_log_bounds(model, images, eps), arguments.repeats)
    difference = float32.astype(np.float64) - judged
    print(f"  judging bounds (float64): {judged_seconds:7.2f} s  {arguments.points / judged_seconds:8.0f} points/s")
    print(f"  training bounds (float32): {float32_seconds:6.2f} s  {arguments.points / float32_seconds:8.0f} points/s")
    print(f"  ratio float64 time / float32 time: {judged_seconds / float32_seconds:.2f}")
    print(f"  log bound, float32 - float64: largest |difference| {np.abs(difference).max():.3g}, "
          f"{int((difference < 0).sum())} of {arguments.points} points lower in float32 "
          f"(lowest {difference.min():.3g}); mean log bound {judged.mean():.4g}")


if __name__ == "__main__":
    common.run_cli(main)
