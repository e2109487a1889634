import os

import numpy as np
import pytest

import backwork_cost
import backwork_loop
import cnn
import cnn_backwork
import common
import configurator
import results_format
from common import UserError
from conftest import fake_backwork_results


def direct_distances(rows, references):
    """The formula as written: the full (N, R, D) difference tensor."""
    return np.mean((rows[:, None, :] - references[None, :, :]) ** 2, axis=2)


def random_rows(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float64)


def test_expanded_distances_equal_the_direct_formula():
    import tensorflow as tf

    rows, references = random_rows((5, 30), 0), random_rows((40, 30), 1)
    expanded = backwork_cost.squared_distances(tf.constant(rows), tf.constant(references),
                                              tf.constant((references ** 2).sum(axis=1)))
    np.testing.assert_allclose(expanded.numpy(), direct_distances(rows, references), rtol=1e-10)


def test_reference_distance_value_and_gradient_match_the_direct_formula():
    import tensorflow as tf

    rows, references = tf.constant(random_rows((4, 12), 2)), random_rows((25, 12), 3)
    norms = tf.constant((references ** 2).sum(axis=1))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(rows)
        ours = backwork_cost.reference_distance(rows, tf.constant(references), norms)
        direct = tf.reduce_mean(tf.reduce_min(
            tf.reduce_mean(tf.square(rows[:, None, :] - references[None]), axis=2), axis=1))
    np.testing.assert_allclose(ours.numpy(), direct.numpy(), rtol=1e-12)
    np.testing.assert_allclose(tape.gradient(ours, rows).numpy(), tape.gradient(direct, rows).numpy(), rtol=1e-10)


def test_reference_distance_gradient_matches_finite_differences():
    import tensorflow as tf

    rows, references = random_rows((3, 6), 4), tf.constant(random_rows((10, 6), 5))
    norms = tf.reduce_sum(tf.square(references), axis=1)

    def value(x):
        return float(backwork_cost.reference_distance(tf.constant(x), references, norms))

    with tf.GradientTape() as tape:
        variable = tf.constant(rows)
        tape.watch(variable)
        distance = backwork_cost.reference_distance(variable, references, norms)
    gradient = tape.gradient(distance, variable).numpy()
    step = 1e-6
    for index in [(0, 0), (1, 3), (2, 5)]:
        shifted_up, shifted_down = rows.copy(), rows.copy()
        shifted_up[index] += step
        shifted_down[index] -= step
        numeric = (value(shifted_up) - value(shifted_down)) / (2 * step)
        assert gradient[index] == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_batch_distance_leaves_out_each_image_itself():
    import tensorflow as tf

    rows = random_rows((4, 7), 6)
    pairs = direct_distances(rows, rows)
    expected = pairs[~np.eye(4, dtype=bool)].mean()
    assert float(backwork_cost.batch_distance(tf.constant(rows))) == pytest.approx(expected, rel=1e-10)


def test_cost_stays_finite_when_distances_vanish(trained_tiny, tiny_data):
    import tensorflow as tf

    model = cnn.load_trained_model(trained_tiny[0])
    features = backwork_cost.feature_model(model)
    label_images = tiny_data["x_train"][tiny_data["y_train"] == 3][:20]
    references, _, _ = backwork_cost.reference_features(features, label_images, 0, 0)
    options = configurator.default_config()["backwork"]
    cost = backwork_cost.make_cost_function(features, references, 3, backwork_cost.default_layer_cost_coeffs(4),
                                           options)
    images = tf.constant(np.repeat(label_images[:1], 2, axis=0))  # On a training example, and equal.
    with tf.GradientTape() as tape:
        tape.watch(images)
        value, probabilities = cost(images)
    assert np.isfinite(value.numpy()) and np.all(np.isfinite(tape.gradient(value, images).numpy()))
    assert probabilities.shape == (2,)


def test_default_coefficients_follow_the_original():
    np.testing.assert_allclose(backwork_cost.default_layer_cost_coeffs(3), [1e-4, 1e-3, 1e-2, 10.0], rtol=1e-6)
    with pytest.raises(UserError, match="give 5 values"):
        backwork_cost.layer_coefficients({"layer_cost_coeffs": [1.0, 2.0]}, 4)


def test_count_falls_resets_when_the_probability_rises():
    falls = np.zeros(3, int)
    for previous, current in [([-np.inf] * 3, [0.5, 0.5, 0.5]), ([0.5, 0.5, 0.5], [0.4, 0.6, 0.4]),
                              ([0.4, 0.6, 0.4], [0.3, 0.5, 0.45])]:
        falls = backwork_loop.count_falls(falls, np.array(previous), np.array(current))
    np.testing.assert_array_equal(falls, [2, 1, 0])


def test_pixel_adam_matches_keras_adam_and_resets_one_image():
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(0)
    start = rng.uniform(0.2, 0.8, (2, 3, 3, 1)).astype(np.float32)
    gradients = [rng.normal(size=start.shape).astype(np.float32) * 0.01 for _ in range(3)]
    ours = backwork_loop.PixelAdam(start, learning_rate=0.01)
    reference = tf.Variable(start)
    keras_adam = keras.optimizers.Adam(0.01, epsilon=1e-7)
    for gradient in gradients:
        ours.apply(tf.constant(gradient))
        keras_adam.apply_gradients([(tf.constant(gradient), reference)])
    np.testing.assert_allclose(ours.images.numpy(), reference.numpy(), rtol=1e-5, atol=1e-6)
    ours.reset([1], np.full((1, 3, 3, 1), 0.5, np.float32))
    assert np.all(ours.images.numpy()[1] == 0.5) and np.all(ours.first_moment.numpy()[1] == 0)
    assert np.all(ours.steps.numpy()[0] == 3) and np.all(ours.steps.numpy()[1] == 0)
    ours.apply(tf.constant(np.full(start.shape, -100.0, np.float32)))
    assert ours.images.numpy().max() <= 1.0  # Pixels are clipped to [0, 1].


def backwork_options(**changes):
    options = {**configurator.default_config()["backwork"], "num_examples": 4, "max_num_steps": 150,
               "min_num_steps": 25, "prob_cap_mean": 0.99, "prob_cap_min": 0.99, "learning_rate": 0.05}
    options.update(changes)
    return options


def test_backwork_reaches_the_label_and_records_history(trained_tiny, tiny_data):
    model = cnn.load_trained_model(trained_tiny[0])
    label_images = tiny_data["x_train"][tiny_data["y_train"] == 7]
    options = backwork_options()
    results = backwork_loop.backwork_label(model, label_images, 7, options, progress=lambda line: None)
    assert results["images"].shape == (4, 12, 12) and results["images"].dtype == np.float32
    assert 0.0 <= results["images"].min() and results["images"].max() <= 1.0
    assert results["probs"].shape == (4, 10) and results["probs"][:, 7].min() >= 0.99
    np.testing.assert_allclose(results["probs"], np.asarray(model(results["images"][..., None])), rtol=1e-5)
    every = options["save_freq"]
    assert [record["step"] for record in results["history"]] == list(range(every, results["steps"] + 1, every))
    assert np.all((results["steps_to_reach"] > 0) & (results["steps_to_reach"] <= results["steps"]))
    # The images stay away from the label's training examples (those sit at distance 0).
    assert results["nearest_training_distance"].min() > 0.01
    # The worst-classified training examples come with the lowest label probabilities, in order.
    worst = results["worst_training_probs"][:, 7]
    all_probabilities = np.asarray(model(label_images))[:, 7]
    np.testing.assert_allclose(worst, np.sort(all_probabilities)[:8], rtol=1e-4, atol=1e-6)
    assert results["worst_training_images"].shape == (8, 12, 12)


def test_falling_images_are_reinitialised(trained_tiny, tiny_data):
    model = cnn.load_trained_model(trained_tiny[0])
    label_images = tiny_data["x_train"][tiny_data["y_train"] == 2]
    # A negative probability weight drives every probability down, so each image keeps falling.
    options = backwork_options(layer_cost_coeffs=[0.0, 0.0, 0.0, 0.0, -10.0], save_freq=5, min_num_steps=200,
                               max_num_steps=40, num_mono_dec_saves=2, reinit_below=1.0)
    results = backwork_loop.backwork_label(model, label_images, 2, options, progress=lambda line: None)
    assert results["reinitialised"] >= 4


def test_same_seed_same_images(trained_tiny, tiny_data):
    model = cnn.load_trained_model(trained_tiny[0])
    label_images = tiny_data["x_train"][tiny_data["y_train"] == 1]
    options = backwork_options(max_num_steps=25)
    first = backwork_loop.backwork_label(model, label_images, 1, options, progress=lambda line: None)
    second = backwork_loop.backwork_label(model, label_images, 1, options, progress=lambda line: None)
    np.testing.assert_array_equal(first["images"], second["images"])


@pytest.mark.parametrize("text,expected", [("3", [3]), ("0-3", [0, 1, 2, 3]), ("1,4,7", [1, 4, 7]),
                                           ("8,0-1", [0, 1, 8])])
def test_parse_labels(text, expected):
    assert cnn_backwork.parse_labels(text, 10) == expected


@pytest.mark.parametrize("text", ["12", "a", "3-", "-1"])
def test_bad_labels_are_refused(text):
    with pytest.raises(UserError, match="--labels"):
        cnn_backwork.parse_labels(text, 10)


def test_command_line_writes_results_and_figures(trained_tiny, tiny_npz, tmp_path, capsys):
    config = tmp_path / "quick.toml"
    config.write_text("[backwork]\nnum_examples = 3\nmax_num_steps = 50\nmin_num_steps = 25\n"
                      "learning_rate = 0.05\nprob_cap_min = 0.99\nprob_cap_mean = 0.99\n")
    out = tmp_path / "backwork"
    arguments = [str(config), "--model", str(trained_tiny[0]), "--data", str(tiny_npz), "--labels", "4,5",
                 "--out", str(out)]
    assert cnn_backwork.main(arguments) == 0
    results = results_format.load_results(out / "results_5.pkl")
    assert results["label"] == 5 and results["images"].shape == (3, 12, 12)
    assert results["options"]["max_num_steps"] == 50 and results["model"] == str(trained_tiny[0])
    assert results["format_version"] == results_format.RESULTS_FORMAT_VERSION
    for figure in ("backwork.png", "worst_training.png"):
        assert (out / figure).read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "label  min p" in table and "\n    5  " in table


def test_model_that_does_not_fit_the_data_is_one_line(trained_tiny, tmp_path, capsys):
    other = tmp_path / "other.npz"
    images = np.zeros((20, 8, 8), np.uint8)
    np.savez(other, x_train=images, y_train=np.arange(20) % 10, x_test=images, y_test=np.arange(20) % 10)
    with pytest.raises(SystemExit) as exit_info:
        common.run_cli(lambda: cnn_backwork.main(["--model", str(trained_tiny[0]), "--data", str(other),
                                                  "--out", str(tmp_path / "out")]))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: model") and "takes images of shape (12, 12, 1)" in error
    assert len(error.splitlines()) == 1


# ------------------------------------------------------------- all labels in one batch


def quiet(line):
    pass


def label_images_of(tiny_data, labels):
    return {label: tiny_data["x_train"][tiny_data["y_train"] == label] for label in labels}


def test_batched_labels_give_the_images_of_a_run_of_one_label(trained_tiny, tiny_data):
    model = cnn.load_trained_model(trained_tiny[0])
    config = {"backwork": {**backwork_options(max_num_steps=40, save_freq=10, min_num_steps=40), "seed": 3}}
    alone = backwork_loop.get_faulty_input_layer(tiny_data, config, model, [3], progress=quiet)[3]
    batched = backwork_loop.get_faulty_input_layer(tiny_data, config, model, list(range(10)), progress=quiet)
    np.testing.assert_allclose(batched[3]["images"], alone["images"], atol=1e-4)
    assert batched[3]["steps"] == alone["steps"] == 40
    np.testing.assert_array_equal(batched[3]["steps_to_reach"], alone["steps_to_reach"])
    # Not trivially equal: the images moved, and another label's images are different ones.
    assert np.abs(alone["images"] - alone["history"][0]["images"]).max() > 0.01
    assert np.abs(batched[4]["images"] - alone["images"]).max() > 0.1


def nearest_rows(features, images, references):
    """Each image's nearest reference at every cost layer, found by the direct formula."""
    flat, _ = backwork_cost.flat_features(features, images)
    found = []
    for rows, (layer_references, _) in zip(flat, references):
        distances = direct_distances(rows.numpy(), layer_references.numpy())
        found.append(layer_references.numpy()[distances.argmin(axis=1)])
    return found


@pytest.mark.parametrize("loss", configurator.BACKWORK_LOSSES)
def test_batched_cost_gradient_of_one_label_is_its_own_cost_gradient(trained_tiny, tiny_data, loss):
    import tensorflow as tf

    model = cnn.load_trained_model(trained_tiny[0])
    features = backwork_cost.feature_model(model)
    options = {**configurator.default_config()["backwork"], "loss": loss}
    coefficients = backwork_cost.default_layer_cost_coeffs(4)
    images_by_label = label_images_of(tiny_data, [3, 5])
    references = {label: backwork_cost.reference_features(features, images, 0, 0)[0]
                  for label, images in images_by_label.items()}
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 1, (8, 12, 12, 1)).astype(np.float32))  # 4 of label 3, then 4 of 5
    nearest = [np.concatenate(pair) for pair in zip(nearest_rows(features, images[:4], references[3]),
                                                     nearest_rows(features, images[4:], references[5]))]

    def batched_gradient(options):
        with tf.GradientTape() as tape:
            tape.watch(images)
            flat, logits = backwork_cost.flat_features(features, images)
            costs, _ = backwork_cost.grouped_cost(flat, logits, nearest, tf.constant([3, 3, 3, 3, 5, 5, 5, 5]), 4,
                                                 coefficients, options)
            total = tf.reduce_sum(costs)
        return costs.numpy(), tape.gradient(total, images).numpy()

    costs, gradient = batched_gradient(options)
    for label, rows in [(3, slice(0, 4)), (5, slice(4, 8))]:
        own = backwork_cost.make_cost_function(features, references[label], label, coefficients, options)
        with tf.GradientTape() as tape:
            label_images = images[rows]
            tape.watch(label_images)
            value, _ = own(label_images)
        assert costs[rows.start // 4] == pytest.approx(float(value), rel=1e-5)
        np.testing.assert_allclose(gradient[rows], tape.gradient(value, label_images).numpy(), rtol=1e-4, atol=1e-7)
    # The batch-distance term matters here, so comparing images across labels would have shown. (With the
    # probability loss: the other two pull 20 times harder and leave the batch term below this bound.)
    if loss == "probability":
        _, without_batch_term = batched_gradient({**options, "batch_cost_coeff": 0.0})
        assert np.abs(without_batch_term - gradient).max() > 1e-3 * np.abs(gradient).max()


def test_a_label_that_stopped_is_frozen_while_the_others_continue(trained_tiny, tiny_data, monkeypatch):
    model = cnn.load_trained_model(trained_tiny[0])
    monkeypatch.setattr(backwork_loop.LabelState, "should_stop", lambda state, step: state.label == 3)
    options = backwork_options(max_num_steps=75, save_freq=25, min_num_steps=0)
    worker = backwork_loop.Backworker(model, options, num_labels=2)
    stopped = []
    results = worker.run(label_images_of(tiny_data, [3, 5]), quiet, lambda label, result: stopped.append(label))
    assert stopped == [3, 5] and results[3]["steps"] == 25 and results[5]["steps"] == 75
    assert [record["step"] for record in results[3]["history"]] == [25]
    # After label 3 stopped, its images and Adam state stayed put while label 5's moved on.
    np.testing.assert_array_equal(worker.steps.optimizer.images.numpy()[:4, ..., 0], results[3]["images"])
    np.testing.assert_array_equal(worker.steps.optimizer.steps.numpy()[:, 0, 0, 0], [25] * 4 + [75] * 4)
    assert np.abs(results[5]["images"] - results[5]["history"][0]["images"]).max() > 0.01
    np.testing.assert_array_equal(worker.steps.optimizer.images.numpy()[4:, ..., 0], results[5]["images"])


def test_steps_to_reach_is_the_first_step_a_per_step_trace_crosses_the_cap(trained_tiny, tiny_data):
    model = cnn.load_trained_model(trained_tiny[0])
    # No re-initialisation and no early stop, so the two runs differ only in how often they record.
    options = backwork_options(max_num_steps=40, min_num_steps=40, prob_cap_min=0.9, reinit_below=0.0,
                               learning_rate=0.02)
    images = label_images_of(tiny_data, [6])[6]
    per_step = backwork_loop.backwork_label(model, images, 6, {**options, "save_freq": 1}, progress=quiet)
    blocks = backwork_loop.backwork_label(model, images, 6, {**options, "save_freq": 20}, progress=quiet)
    np.testing.assert_allclose(blocks["images"], per_step["images"], atol=1e-5)
    trace = np.stack([record["probs"] for record in per_step["history"]])  # (40 steps, 4 images)
    reached = trace >= 0.9
    expected = np.where(reached.any(axis=0), reached.argmax(axis=0) + 1, -1)  # Record k is after step k + 1.
    np.testing.assert_array_equal(blocks["steps_to_reach"], expected)
    np.testing.assert_array_equal(per_step["steps_to_reach"], expected)
    # Not trivial: some image crossed the cap between two records of the blocked run.
    assert np.any((expected > 0) & (expected % 20 != 0))


# ------------------------------------------------------------------------------ safety


def nan_model(trained_tiny, tmp_path):
    model = cnn.load_trained_model(trained_tiny[0])
    model.set_weights([np.full_like(weights, np.nan) for weights in model.get_weights()])
    path = tmp_path / "nan.keras"
    model.save(path)
    return path


def test_a_diverging_backwork_is_one_clear_error_and_saves_nothing(trained_tiny, tiny_npz, tmp_path):
    out = tmp_path / "backwork"
    arguments = ["--model", str(nan_model(trained_tiny, tmp_path)), "--data", str(tiny_npz), "--labels", "4",
                 "--out", str(out), "--set", "backwork.max_num_steps=30"]
    with pytest.raises(UserError, match=r"backwork of label 4 diverged at step 0 \(cost nan\); lower "
                                        r"backwork.learning_rate"):
        cnn_backwork.main(arguments)
    assert not list(out.glob("results_*.pkl"))


def test_a_diverging_label_stops_at_once_and_the_others_are_saved(trained_tiny, tiny_data, monkeypatch):
    import tensorflow as tf

    original = backwork_cost.grouped_cost

    def cost_of_label_5_explodes_at_step_0(flat, logits, nearest, image_labels, count, *arguments):
        costs, probabilities = original(flat, logits, nearest, image_labels, count, *arguments)
        labels = tf.reshape(image_labels, (-1, count))[:, 0]
        return tf.where(labels == 5, np.inf, costs), probabilities

    monkeypatch.setattr(backwork_cost, "grouped_cost", cost_of_label_5_explodes_at_step_0)
    model = cnn.load_trained_model(trained_tiny[0])
    saved = {}
    with pytest.raises(UserError, match=r"backwork of label 5 diverged at step 0 \(cost inf\)"):
        backwork_loop.get_faulty_input_layer(tiny_data, {"backwork": backwork_options(max_num_steps=50)}, model,
                                            [3, 5], progress=quiet, on_label=saved.__setitem__)
    assert list(saved) == [3] and np.all(np.isfinite(saved[3]["images"]))


def test_results_files_are_matched_by_their_exact_name(tmp_path, capsys):
    def write(name, label):
        results_format.save_results(tmp_path / name, fake_backwork_results(label, shape=(1, 2, 2)))

    write("results_1.pkl", 1)
    write("results_1_old.pkl", 7)
    write("results_2.pkl.bak", 2)
    write("old_results_3.pkl", 3)
    assert list(results_format.load_label_results(tmp_path)) == [1]
    write("results_4.pkl", 5)  # A file renamed by hand.
    with pytest.raises(UserError, match="holds the results of label 5, not 4"):
        results_format.load_label_results(tmp_path)
    (tmp_path / "results_6.pkl").write_bytes(b"\x80\x04truncated")
    warnings = []
    assert list(results_format.load_label_results(tmp_path, skip_unreadable=True, warn=warnings.append)) == [1]
    assert len(warnings) == 2 and warnings[0].startswith("warning: skipping results_4.pkl")
    assert "results_6.pkl" in warnings[1]
    with pytest.raises(UserError, match="refusing to load"):
        (tmp_path / "results_4.pkl").unlink()
        results_format.load_label_results(tmp_path)


def test_huge_label_range_is_refused_before_it_is_expanded():
    with pytest.raises(UserError, match="between 0 and 9"):
        cnn_backwork.parse_labels("0-100000000", 10)
    with pytest.raises(UserError, match="low <= high"):
        cnn_backwork.parse_labels("5-3", 10)


@pytest.mark.parametrize("key,value,allowed", [
    ("num_examples", 0, "between 1 and"), ("save_freq", 0, "between 1 and"), ("max_num_steps", 0, "between 1 and"),
    ("min_num_steps", -1, "between 0 and"), ("learning_rate", 0.0, "greater than 0"),
    ("prob_cap_min", 1.5, r"in \(0, 1\]"), ("prob_cap_mean", 0.0, r"in \(0, 1\]"),
    ("max_reference_examples", -1, "between 0 and"), ("num_mono_dec_saves", 0, "between 1 and"),
    ("seed", -1, "between 0 and"), ("nearest_every", 0, "between 1 and"),
])
def test_backwork_values_out_of_range_are_refused(tiny_data, trained_tiny, key, value, allowed):
    with pytest.raises(UserError, match=rf"backwork.{key} = .* must be {allowed}"):
        backwork_loop.get_faulty_input_layer(tiny_data, {"backwork": {key: value}}, trained_tiny[0], [3])


def test_a_run_says_when_it_replaces_an_earlier_results_file(trained_tiny, tiny_npz, tmp_path, capsys):
    out = tmp_path / "backwork"
    arguments = ["--model", str(trained_tiny[0]), "--data", str(tiny_npz), "--labels", "2", "--out", str(out),
                 "--set", "backwork.max_num_steps=25", "--num-examples", "2"]
    assert cnn_backwork.main(arguments) == 0
    assert "replaces" not in capsys.readouterr().out
    (out / "results_7.pkl").write_bytes(b"damaged neighbour")
    assert cnn_backwork.main(arguments) == 0
    captured = capsys.readouterr()
    assert f"results_2.pkl already exists in {out}; this run replaces it" in captured.out
    assert "warning: skipping results_7.pkl" in captured.out


def test_command_line_checks_backwork_values_before_loading_anything(tmp_path):
    with pytest.raises(UserError, match=r"backwork.save_freq = 0 must be between 1 and"):
        cnn_backwork.main(["--model", str(tmp_path / "missing.keras"), "--data", str(tmp_path / "missing.npz"),
                           "--out", str(tmp_path / "out"), "--set", "backwork.save_freq=0"])


def test_evaluate_reports_how_other_models_classify_a_results_folder(trained_tiny, tmp_path, capsys):
    import json
    import shutil

    for label in (2, 7):  # Made from the first model (as a relative path to it would be recorded, too).
        results_format.save_results(tmp_path / f"results_{label}.pkl",
                            {**fake_backwork_results(label), "model": os.path.relpath(trained_tiny[0])})
    other = tmp_path / "other" / "model.keras"
    other.parent.mkdir()
    shutil.copy(trained_tiny[0], other)
    assert cnn_backwork.main(["--evaluate", str(tmp_path), "--model", str(trained_tiny[0]), str(other)]) == 0
    numbers = json.loads((tmp_path / "transfer.json").read_text())["models"]
    model = cnn.load_trained_model(trained_tiny[0])
    direct = np.concatenate([np.asarray(model(fake_backwork_results(label)["images"][..., None]))[:, label]
                             for label in (2, 7)])
    for path in (str(trained_tiny[0]), str(other)):
        assert numbers[path]["mean_p"] == pytest.approx(direct.mean(), rel=1e-5)
        assert numbers[path]["above_0.99"] == np.mean(direct > 0.99)
    # The images were made from the first model; on the other one they measure transfer, and say so.
    assert numbers[str(trained_tiny[0])]["made_from_it"] and not numbers[str(other)]["made_from_it"]
    table = capsys.readouterr().out
    assert "mean p(target)" in table and f"NO (transfer)        {other}" in table
    with pytest.raises(UserError, match="backwork takes one --model"):
        cnn_backwork.main(["--model", str(trained_tiny[0]), str(other)])


def test_reinitialised_images_leave_the_recorded_history_finite():
    """stuck() marks restarted images in the label's 'previous' probabilities; the history keeps its own copy."""
    options = {**configurator.default_config()["backwork"], "num_examples": 3, "num_mono_dec_saves": 1}
    state = backwork_loop.LabelState.__new__(backwork_loop.LabelState)
    state.label, state.options, state.history, state.reinitialised = 0, options, [], 0
    state.falls, state.previous = np.zeros(3, int), np.full(3, 0.5)
    state.record(25, np.array([1.0]), np.array([0.9, 0.2, 0.1], np.float32), np.zeros((3, 2, 2, 1)),
                 progress=lambda line: None)
    assert list(state.stuck()) == [1, 2]
    assert np.isfinite(state.history[0]["probs"]).all() and state.previous[1] == -np.inf


def test_an_interrupt_is_honoured_after_the_block_under_way(trained_tiny, tiny_data):
    import os
    import signal

    handler_before = signal.getsignal(signal.SIGINT)  # Ignored, not the default, where CI starts in the background.
    records, finished = [], []

    def on_record(label, step, cost, probabilities):
        records.append((label, step))
        if len(records) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # As Ctrl-C would, in the middle of the first block's records.

    # Probability caps of 1 are never reached: without the interrupt this would run 100,000 steps.
    options = {"backwork": backwork_options(max_num_steps=100_000, save_freq=5, prob_cap_min=1.0, prob_cap_mean=1.0)}
    with pytest.raises(KeyboardInterrupt):
        backwork_loop.get_faulty_input_layer(tiny_data, options, trained_tiny[0], [0, 1], progress=lambda line: None,
                                            on_label=lambda label, result: finished.append(label), on_record=on_record)
    # Noted, not raised inside the callback: both labels' records of that block were made, then it stopped.
    assert records == [(0, 5), (1, 5)] and finished == []
    assert signal.getsignal(signal.SIGINT) is handler_before  # The usual Ctrl-C is back.
