"""Time and memory of one backwork step: our matmul distances against the direct formula.

    python bench/bench_backwork.py [--model runs/default/model.keras] [--references 1000 2000 4000]
    python bench/bench_backwork.py --model runs/default/model.keras [--data MNIST.npz] --batched
                                   [--labels 0-9] [--nearest-every 1 5 10]
    python bench/bench_backwork.py --gradient [--model runs/default/model.keras] [--examples 80]

Both variants compute the same cost on the same images and references; only the
distance to the nearest training example differs: ours expands |a-b|^2 into one matrix
product and gathers the nearest reference, the direct one builds the whole
(batch, references, layer size) difference tensor, as the original did. Each variant runs
in a fresh process, so its peak memory is its own; peak is reported above the memory the
process held once the references were computed.

--batched instead backworks real labels of a trained model, all labels in one batch
against one label at a time, in the same process and with the same references (the
training activations are computed once and reused, so the rows time the optimisation
only; the first row says what computing them costs). One row per nearest_every value
shows what searching the nearest reference less often saves and whether the images
stay as good: lowest label probability and pixel distance to the nearest training image.

--gradient times the network's part of a backwork step, the gradient of every cost
layer's activations with respect to a batch of images (--examples; 80 is 10 labels x 8),
through Keras' own layers and through cnn.input_gradient_model (the first
convolution's input gradient as a depthwise convolution), alternated in one process,
and prints the ratio and the largest difference between the two gradients.
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

from bench.machine import cpu_line  # noqa: E402


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

    import backwork_cost
    import cnn
    import configurator

    import keras

    keras.utils.set_random_seed(0)
    model = cnn.load_trained_model(model_path) if model_path else cnn.build_model({})
    features = backwork_cost.feature_model(model)
    rng = np.random.default_rng(0)
    shape = (num_references,) + tuple(model.input_shape[1:])
    references, _, _ = backwork_cost.reference_features(features, rng.uniform(0, 1, shape).astype(np.float32), 0, 0)
    options = configurator.default_config()["backwork"]
    coefficients = backwork_cost.default_layer_cost_coeffs(len(references))
    distance = direct_reference_distance if variant == "direct" else None
    cost = backwork_cost.make_cost_function(features, references, 3, coefficients, options, distance=distance)
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


def batched_rows(arguments):
    """Backwork the labels batched and one at a time; print seconds, ratio and quality."""
    import numpy as np

    import backwork_cost
    import backwork_loop
    import cnn
    import cnn_backwork
    import datasets
    import configurator

    section = configurator.model_data_config(arguments.model)["data"]  # The model's own data unless --data.
    data = datasets.load_dataset(arguments.data, section["dataset"], section["file"])
    model = cnn.load_trained_model(arguments.model, data["x_train"])
    labels = cnn_backwork.parse_labels(arguments.labels, model.output_shape[-1])
    images = {label: data["x_train"][data["y_train"] == label] for label in labels}
    cache, original = {}, backwork_cost.reference_features

    def cached_references(features_model, label_images, max_examples, seed, **keywords):
        key = (tuple(seed), max_examples)
        if key not in cache:
            start = time.perf_counter()
            cache[key] = original(features_model, label_images, max_examples, seed, **keywords)
            cache["seconds"] = cache.get("seconds", 0.0) + time.perf_counter() - start
        return cache[key]

    backwork_cost.reference_features = cached_references

    def run(nearest_every, batched):
        options = {**configurator.default_config()["backwork"], "nearest_every": nearest_every}
        groups = [labels] if batched else [[label] for label in labels]
        start, results = time.perf_counter(), {}
        worker = backwork_loop.Backworker(model, options, len(groups[0]))  # Traced once, as the script does.
        for group in groups:
            results.update(worker.run({label: images[label] for label in group}, progress=lambda line: None))
        seconds = time.perf_counter() - start
        lowest = min(result["probs"][:, label].min() for label, result in results.items())
        distances = np.concatenate([result["nearest_training_distance"] for result in results.values()])
        steps = [result["steps"] for result in results.values()]
        return seconds, lowest, distances, steps

    for label in labels:  # Training activations once, outside the timed rows.
        cached_references(backwork_cost.feature_model(model), images[label], 0, [0, label])
    print(f"labels {arguments.labels}, {configurator.default_config()['backwork']['num_examples']} images each; "
          f"training activations of the labels: {cache['seconds']:.1f} s (in neither row below)")
    print("mode                    nearest_every  seconds  one at a time / this  lowest p  nearest train dist  steps")
    for nearest_every in arguments.nearest_every:
        for batched in (False, True):
            seconds, lowest, distances, steps = run(nearest_every, batched)
            one_at_a_time = seconds if not batched else one_at_a_time
            mode = "all labels batched" if batched else "one label at a time"
            print(f"{mode:<22}  {nearest_every:>13}  {seconds:>7.1f}  {one_at_a_time / seconds:>19.2f}x  "
                  f"{lowest:.5f}  {distances.min():.3f} to {distances.max():.3f}      {min(steps)}-{max(steps)}")


def gradient_rows(arguments):
    """Seconds per network gradient of a backwork batch: Keras' layers against input_gradient_model."""
    import numpy as np
    import tensorflow as tf

    import backwork_cost
    import cnn

    model = cnn.load_trained_model(arguments.model) if arguments.model else cnn.build_model({})
    plain = backwork_cost.feature_model(model)
    networks = {"Keras layers": plain, "input_gradient_model": cnn.input_gradient_model(plain)}
    images = tf.constant(np.random.default_rng(0).uniform(size=(arguments.examples, *model.input_shape[1:]))
                         .astype(np.float32))

    def compiled(network):
        @tf.function
        def gradient(images):
            with tf.GradientTape() as tape:
                tape.watch(images)
                # Every output weighted, as the cost weighs every layer: all of the network is differentiated.
                total = tf.add_n([tf.reduce_sum(tf.sin(output)) for output in network(images, training=False)])
            return tape.gradient(total, images)
        return gradient

    functions = {name: compiled(network) for name, network in networks.items()}
    gradients = {name: function(images).numpy() for name, function in functions.items()}  # Traced here.
    seconds = {name: [] for name in functions}
    for _ in range(arguments.repeats):
        for name, function in functions.items():  # Alternated: background load hits both alike.
            start = time.perf_counter()
            for _ in range(10):
                function(images)
            seconds[name].append((time.perf_counter() - start) / 10)
    keras_ms, ours_ms = (1e3 * min(seconds[name]) for name in networks)
    difference = np.abs(gradients["input_gradient_model"] - gradients["Keras layers"]).max()
    print(f"network gradient of {arguments.examples} images, best of {arguments.repeats} x 10 calls")
    print("Keras layers ms  input_gradient_model ms  speed-up  largest difference (largest gradient)")
    print(f"{keras_ms:>15.1f}  {ours_ms:>23.1f}  {keras_ms / ours_ms:>7.2f}x  "
          f"{difference:.2e} ({np.abs(gradients['Keras layers']).max():.2e})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained model (default: the default topology, random weights)")
    parser.add_argument("--references", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--examples", type=int, default=8, help="images in the batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "REFERENCES"), help=argparse.SUPPRESS)
    parser.add_argument("--batched", action="store_true", help="all labels batched vs one at a time (needs --model)")
    parser.add_argument("--data", help="Keras-layout .npz (the model's data) for --batched; default: $DATA_PATH, "
                        "$MNIST_PATH or the Keras download")
    parser.add_argument("--labels", default="0-9", help="labels for --batched")
    parser.add_argument("--gradient", action="store_true",
                        help="time the network gradient of --examples images: Keras layers vs input_gradient_model")
    parser.add_argument("--nearest-every", type=int, nargs="+", default=[1, 5, 10],
                        help="backwork.nearest_every values for --batched, each batched and one at a time")
    arguments = parser.parse_args()
    if not arguments.child:  # A child's output is one JSON line for its parent.
        print(cpu_line())
    if arguments.gradient:
        gradient_rows(arguments)
        return
    if arguments.batched:
        if not arguments.model:
            parser.error("--batched needs --model (a trained model)")
        batched_rows(arguments)
        return
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
