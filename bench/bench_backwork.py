"""Time and memory of one backwork step: our matmul distances against the direct formula.

    python bench/bench_backwork.py [--model runs/default/model.keras] [--references 1000 2000 4000]

Both variants compute the same cost on the same images and references; only the
distance to the nearest training example differs: ours expands |a-b|^2 into one matrix
product and gathers the nearest reference, the direct one builds the whole
(batch, references, layer size) difference tensor, as the original did. Each variant runs
in a fresh process, so its peak memory is its own; peak is reported above the memory the
process held once the references were computed.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def direct_reference_distance(rows, references, reference_norms):
    """The formula as written: mean over the batch of the minimum over all references."""
    import tensorflow as tf

    differences = rows[:, tf.newaxis, :] - references[tf.newaxis, :, :]  # (N, R, D)
    return tf.reduce_mean(tf.reduce_min(tf.reduce_mean(tf.square(differences), axis=2), axis=1))


def peak_memory_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB.


def measure(variant, num_references, model_path, num_examples, repeats):
    """Run in a child process: seconds per step and extra peak memory of one variant."""
    import numpy as np
    import tensorflow as tf

    import cnn_backwork
    import common
    import proc_mnist

    import keras

    keras.utils.set_random_seed(0)
    model = common.load_trained_model(model_path) if model_path else proc_mnist.build_model({})
    features = cnn_backwork.feature_model(model)
    rng = np.random.default_rng(0)
    shape = (num_references,) + tuple(model.input_shape[1:])
    references, _, _ = cnn_backwork.reference_features(features, rng.uniform(0, 1, shape).astype(np.float32), 0, 0)
    options = common.default_config()["backwork"]
    coefficients = cnn_backwork.default_layer_cost_coeffs(len(references))
    distance = direct_reference_distance if variant == "direct" else None
    cost = cnn_backwork.make_cost_function(features, references, 3, coefficients, options, distance=distance)
    images = tf.constant(rng.uniform(0, 1, (num_examples,) + shape[1:]).astype(np.float32))

    @tf.function
    def step(images):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(images)
            value, _ = cost(images)
        return value, tape.gradient(value, images)

    baseline = peak_memory_mib()
    value, gradient = step(images)  # Traces once; the first call is not timed.
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value, gradient = step(images)
        float(value)
        times.append(time.perf_counter() - start)
    return {"seconds_per_step": float(np.median(times)), "extra_peak_mib": peak_memory_mib() - baseline,
            "cost": float(value), "gradient_norm": float(tf.norm(gradient))}


def run_child(variant, num_references, arguments):
    command = [sys.executable, __file__, "--child", variant, str(num_references),
               "--examples", str(arguments.examples), "--repeats", str(arguments.repeats)]
    if arguments.model:
        command += ["--model", arguments.model]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained model (default: the default topology, random weights)")
    parser.add_argument("--references", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--examples", type=int, default=8, help="images in the batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "REFERENCES"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        variant, num_references = arguments.child
        print(json.dumps(measure(variant, int(num_references), arguments.model, arguments.examples,
                                 arguments.repeats)))
        return
    print(f"one backwork step (cost and gradient), batch {arguments.examples}, default topology")
    print("references  ours ms/step  direct ms/step  speed-up  ours extra MiB  direct extra MiB  same cost")
    for num_references in arguments.references:
        ours, direct = (run_child(variant, num_references, arguments) for variant in ("ours", "direct"))
        same = abs(ours["cost"] - direct["cost"]) <= 1e-4 * abs(direct["cost"])
        print(f"{num_references:>10}  {1e3 * ours['seconds_per_step']:>12.1f}  "
              f"{1e3 * direct['seconds_per_step']:>14.1f}  {direct['seconds_per_step'] / ours['seconds_per_step']:>7.1f}x  "
              f"{ours['extra_peak_mib']:>14.0f}  {direct['extra_peak_mib']:>16.0f}  {same}")


if __name__ == "__main__":
    main()
