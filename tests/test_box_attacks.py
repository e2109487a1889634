"""box_attacks: APGD's step-size rule by hand, boxes kept, objectives raised, PGD against ART's, early stop, checks."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

import attacks
import box_attacks
import cnn
import configurator
import datasets
from common import UserError
from conftest import IMAGE_SIZE, tiny_options, tiny_topology

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_attacks.py"


@pytest.fixture(scope="module")
def random_model():
    import keras

    keras.utils.set_random_seed(0)
    return cnn.build_model(tiny_topology())


@pytest.fixture(scope="module")
def trained_model(trained_tiny):
    return cnn.load_trained_model(trained_tiny[0])


def noise(count, seed=0):
    return np.random.default_rng(seed).random((count, IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.float32)


def class_confidence(model, images, targets=None):
    """p(target) of each image, or its largest class probability without targets."""
    probabilities = cnn.predict(model, images)
    return probabilities.max(axis=1) if targets is None else probabilities[np.arange(len(images)), targets]


# ------------------------------------------------------------------- APGD's step-size rule


def test_apgd_checkpoints_are_the_papers_by_hand():
    # p_j in hundredths: 0, 22, then + max(gap - 3, 6): 22+19=41, 41+16=57, 57+13=70, 70+10=80, 80+7=87,
    # 87+max(4, 6)=93, 93+6=99 (105 is past 100).
    assert box_attacks.apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    assert box_attacks.apgd_checkpoints(1000) == [0, 220, 410, 570, 700, 800, 870, 930, 990]
    # 10 steps: ceil(2.2, 4.1, 5.7, 7.0, 8.0, 8.7, 9.3, 9.9) = 3, 5, 6, 7, 8, 9, 10, 10 (once).
    assert box_attacks.apgd_checkpoints(10) == [0, 3, 5, 6, 7, 8, 9, 10]
    assert box_attacks.apgd_checkpoints(1) == [0, 1]
    intervals = box_attacks.checkpoint_intervals(100)
    assert len(intervals) == 101 and intervals[22] == 22 and intervals[41] == 19 and intervals[99] == 6
    assert np.count_nonzero(intervals) == 8 and intervals[0] == 0


def test_should_halve_follows_the_two_conditions_by_hand():
    # Interval of 22 steps, rho 0.75: condition 1 needs at least 16.5 rises, so 16 halves and 17 does not.
    increases = np.array([16.0, 17.0, 17.0, 17.0, 22.0])
    halved_last = np.array([False, False, True, False, False])
    best_unchanged = np.array([False, False, True, True, False])
    # 16 < 16.5: condition 1; 17 with a rise: neither; 17, unchanged but halved last time: neither;
    # 17, unchanged, not halved: condition 2; every step rose: neither.
    halve = box_attacks.should_halve(increases, 22.0, halved_last, best_unchanged)
    np.testing.assert_array_equal(halve, [True, False, False, True, False])
    # rho = 0.5 of a 6-step interval: 3 rises keep the step size, 2 halve.
    np.testing.assert_array_equal(box_attacks.should_halve(np.array([2.0, 3.0]), 6.0, np.zeros(2, bool),
                                                           np.zeros(2, bool), rho=0.5), [True, False])


def test_apgd_halves_at_every_checkpoint_where_nothing_rises(random_model):
    """A network with all weights zero has constant logits: no image moves, so each of the 8
    checkpoints of 100 steps halves (condition 1), from the box's width 1 to 1 / 2^8."""
    import keras

    model = keras.models.clone_model(random_model)
    model.set_weights([np.zeros_like(weight) for weight in random_model.get_weights()])
    images, targets = noise(4), np.arange(4)
    result = box_attacks.apgd(model, images, *box_attacks.whole_box(images), "cross_entropy", targets, steps=100)
    compiled = box_attacks.compiled_steps(model, "cross_entropy", 4)
    np.testing.assert_allclose(compiled.state["step_size"].numpy(), 1 / 2 ** 8)
    np.testing.assert_array_equal(result["images"], images)
    np.testing.assert_allclose(result["confidence"], 0.1, rtol=1e-6)


# ---------------------------------------------------------------------------- objectives


def test_objectives_match_their_closed_forms():
    import tensorflow as tf

    logits = np.array([[2.0, 0.5, -1.0, 3.0], [0.0, 30.0, 1.0, 0.0]], np.float32)
    targets = np.array([1, 1])
    log_probabilities = logits - np.log(np.exp(logits.astype(np.float64)).sum(axis=1, keepdims=True))

    def values(objective, **options):
        found = box_attacks.objective_values(tf.constant(logits), tf.constant(targets), objective, **options)
        return [np.asarray(value) for value in found]

    value, confidence = values("cross_entropy")
    np.testing.assert_allclose(value, log_probabilities[:, 1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(confidence, np.exp(log_probabilities[:, 1]), rtol=1e-5)
    # max_confidence over the first 3 outputs: the 4th (a "none" output) is in the softmax but not a class.
    value, confidence = values("max_confidence", num_classes=3)
    np.testing.assert_allclose(value, [log_probabilities[0, 0], log_probabilities[1, 1]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(values("max_confidence")[0], log_probabilities.max(axis=1), rtol=1e-5, atol=1e-6)
    # Margin: 0.5 - 3 (the "none" output counts among the others); 30 - 1 = 29, clamped at kappa 20.
    value, confidence = values("margin")
    np.testing.assert_allclose(value, [-2.5, 20.0])
    np.testing.assert_allclose(confidence, np.exp(log_probabilities[:, 1]), rtol=1e-5)


# --------------------------------------------------------------------------- the results


@pytest.mark.parametrize("attack", [box_attacks.pgd, box_attacks.apgd])
def test_every_returned_image_lies_in_its_box(random_model, attack):
    images, targets = noise(12), np.arange(12) % 10
    for lower, upper in [box_attacks.ball(images, 0.1), box_attacks.whole_box(images)]:
        for objective in box_attacks.OBJECTIVES:
            result = attack(random_model, images, lower, upper, objective, targets, steps=15, restarts=2,
                            random_start=True)
            assert np.all(result["images"] >= lower) and np.all(result["images"] <= upper)
            moved = np.abs(result["images"] - images).max()
            assert moved > 0.05  # Not trivially inside: the images moved.
            # The confidence returned is the model's at the image returned.
            wanted = None if objective == "max_confidence" else targets
            expected = class_confidence(random_model, result["images"], wanted)
            np.testing.assert_allclose(result["confidence"], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attack", [box_attacks.pgd, box_attacks.apgd])
def test_the_attacks_raise_the_objective(trained_model, attack):
    images, targets = noise(20, seed=3), np.arange(20) % 10
    lower, upper = box_attacks.ball(images, 0.1)
    before = class_confidence(trained_model, images, targets)
    result = attack(trained_model, images, lower, upper, "cross_entropy", targets, steps=20)
    assert np.all(result["confidence"] >= before)
    assert np.mean(result["confidence"] > before * 1.01) >= 0.8
    before = class_confidence(trained_model, images)
    result = attack(trained_model, images, lower, upper, "max_confidence", steps=20)
    assert np.all(result["confidence"] >= before) and np.mean(result["confidence"] > before * 1.01) >= 0.8


def test_pgd_agrees_with_arts_targeted_pgd_step_for_step(random_model):
    """The same sign step and projection: ART's iterates are ours to float rounding (3e-8 when written).

    ART returns its last iterate and ours the best one, so ART is run for 1, 2, ... 8
    iterations (each from the start) and the best of its iterates is compared with ours.
    """
    from art.attacks.evasion import ProjectedGradientDescent

    images, targets, eps, step_size, iterations = noise(6, seed=5), np.array([0, 3, 5, 7, 8, 9]), 0.3, 0.05, 8
    classifier = attacks.art_classifier(random_model)
    iterates = [images]
    for count in range(1, iterations + 1):
        art_pgd = ProjectedGradientDescent(classifier, norm=np.inf, eps=eps, eps_step=step_size, max_iter=count,
                                           targeted=True, num_random_init=0, batch_size=len(images), verbose=False)
        iterates.append(art_pgd.generate(images, y=datasets.one_hot(targets, 10)))
    iterates = np.stack(iterates)  # (iterations + 1, N, H, W, 1)
    objectives = np.stack([np.log(class_confidence(random_model, iterate, targets)) for iterate in iterates])
    art_best = iterates[objectives.argmax(axis=0), np.arange(len(images))]
    assert np.abs(iterates[-1] - images).max() > 0.2  # ART's images moved.
    ours = box_attacks.pgd(random_model, images, *box_attacks.ball(images, eps), "cross_entropy", targets,
                           steps=iterations, step_size=step_size)
    np.testing.assert_allclose(ours["images"], art_best, atol=1e-6)


def test_apgd_is_at_least_as_strong_as_pgd(trained_model):
    images, targets = noise(30, seed=7), np.arange(30) % 10
    whole, small_ball = box_attacks.whole_box(images), box_attacks.ball(images, 0.1)
    pgd = box_attacks.pgd(trained_model, images, *whole, "cross_entropy", targets, steps=20)
    apgd = box_attacks.apgd(trained_model, images, *whole, "cross_entropy", targets, steps=20)
    assert np.sum(apgd["confidence"] >= 0.99) >= np.sum(pgd["confidence"] >= 0.99)
    pgd = box_attacks.pgd(trained_model, images, *small_ball, "cross_entropy", targets, steps=20)
    apgd = box_attacks.apgd(trained_model, images, *small_ball, "cross_entropy", targets, steps=20)
    assert apgd["objective"].mean() >= pgd["objective"].mean()


def best_confidence_within(model, images, targets, steps):
    """The highest p(target) of PGD's points within steps steps (0: the start), without a cap."""
    if steps == 0:
        return class_confidence(model, images, targets)[0]
    return box_attacks.pgd(model, images, *box_attacks.whole_box(images), "cross_entropy", targets,
                           steps=steps)["confidence"][0]


def test_an_image_that_reaches_the_cap_is_frozen_with_its_first_step(trained_model):
    images, targets, cap = noise(20, seed=11), np.arange(20) % 10, 0.9
    whole = box_attacks.whole_box(images)
    capped = box_attacks.pgd(trained_model, images, *whole, "cross_entropy", targets, steps=15, cap=cap)
    reached = capped["steps_to_cap"] >= 0
    assert 0 < reached.sum() < 20, "some images, not all, should reach the cap"
    assert np.all(capped["confidence"][reached] >= cap) and np.all(capped["confidence"][~reached] < cap)
    # Frozen: more steps change neither their images nor their steps.
    longer = box_attacks.pgd(trained_model, images, *whole, "cross_entropy", targets, steps=30, cap=cap)
    np.testing.assert_array_equal(longer["images"][reached], capped["images"][reached])
    np.testing.assert_array_equal(longer["steps_to_cap"][reached], capped["steps_to_cap"][reached])
    # Without the cap they go on, and their confidence first reached it at steps_to_cap.
    uncapped = box_attacks.pgd(trained_model, images, *whole, "cross_entropy", targets, steps=30)
    assert np.any(uncapped["confidence"][reached] > capped["confidence"][reached])
    for image in np.flatnonzero(reached)[:3]:
        steps, one = int(capped["steps_to_cap"][image]), slice(image, image + 1)
        assert best_confidence_within(trained_model, images[one], targets[one], steps) >= cap
        if steps > 0:
            assert best_confidence_within(trained_model, images[one], targets[one], steps - 1) < cap
    # Restarts count on: an image capped in the second run counts the first run's steps too.
    restarted = box_attacks.apgd(trained_model, images, *whole, "cross_entropy", targets, steps=3, restarts=3, cap=0.99)
    assert np.all(restarted["steps_to_cap"][restarted["steps_to_cap"] >= 0] <= 9)


def test_a_model_that_is_not_finite_raises_naming_it(random_model):
    import keras

    model = keras.models.clone_model(random_model)
    weights = random_model.get_weights()
    weights[-1] = np.full_like(weights[-1], np.nan)  # The logits' bias.
    model.set_weights(weights)
    images = noise(3)
    for attack in (box_attacks.pgd, box_attacks.apgd):
        with pytest.raises(box_attacks.ModelNotFinite, match=f"model '{model.name}' gave logits"):
            attack(model, images, *box_attacks.whole_box(images), "cross_entropy", np.arange(3), steps=3)


# ------------------------------------------------------------------------------ the checks


GOOD = {"objective": "cross_entropy", "steps": 3}


@pytest.mark.parametrize("attack, change, words", [
    ("pgd", {"steps": 0}, "pgd: steps must be an integer >= 1"),
    ("apgd", {"steps": 2.5}, "apgd: steps must be an integer >= 1"),
    ("pgd", {"step_size": 0.0}, "pgd: step_size must be a finite number > 0"),
    ("pgd", {"step_size": float("nan")}, "pgd: step_size must be a finite number > 0"),
    ("apgd", {"restarts": 0}, "apgd: restarts must be an integer >= 1"),
    ("apgd", {"rho": 1.5}, r"apgd: rho must be a number in \(0, 1\]"),
    ("apgd", {"initial_step_size": float("inf")}, "apgd: initial_step_size must be a finite number > 0"),
    ("pgd", {"objective": "hinge"}, "pgd: objective must be one of cross_entropy, max_confidence, margin"),
    ("pgd", {"targets": None}, "pgd: objective 'cross_entropy' needs targets"),
    ("apgd", {"targets": np.array([0, 10])}, r"apgd: targets must be integer classes in \[0, 9\]"),
    ("pgd", {"cap": 1.5}, r"pgd: cap must be a probability in \(0, 1\]"),
    ("apgd", {"num_classes": 11}, r"apgd: num_classes must be an integer in \[1, 10\]"),
    ("pgd", {"lower": np.zeros((2, IMAGE_SIZE, IMAGE_SIZE))}, "pgd: lower .* must have the images' shape"),
    ("apgd", {"lower": np.full((2, IMAGE_SIZE, IMAGE_SIZE, 1), 0.7, np.float32),
              "upper": np.full((2, IMAGE_SIZE, IMAGE_SIZE, 1), 0.6, np.float32)}, "apgd: lower exceeds upper"),
    ("pgd", {"upper": np.full((2, IMAGE_SIZE, IMAGE_SIZE, 1), 2.0, np.float32)}, r"box must lie inside \[0, 1\]"),
    ("pgd", {"images": np.zeros((2, 5, 5, 1), np.float32)}, "pgd: images must be a non-empty batch"),
])
def test_a_bad_parameter_is_a_one_line_user_error(random_model, attack, change, words):
    images = noise(2)
    lower, upper = box_attacks.whole_box(images)
    arguments = {"images": images, "lower": lower, "upper": upper, "targets": np.array([0, 1]), **GOOD, **change}
    with pytest.raises(UserError, match=words) as error:
        getattr(box_attacks, attack)(random_model, **arguments)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("eps", [0, -0.1, 1.5, float("nan"), "0.3"])
def test_a_ball_needs_an_eps_in_the_unit_interval(eps):
    with pytest.raises(UserError, match=r"eps .* is not an l-infinity radius in \(0, 1\]; set eps to a number"):
        box_attacks.ball(noise(1), eps)


def test_the_ball_is_clipped_to_the_unit_box():
    images = np.array([0.0, 0.2, 0.5, 0.95], np.float32).reshape(1, 2, 2, 1)
    lower, upper = box_attacks.ball(images, 0.3)
    np.testing.assert_allclose(lower.ravel(), [0.0, 0.0, 0.2, 0.65], atol=1e-7)
    np.testing.assert_allclose(upper.ravel(), [0.3, 0.5, 0.8, 1.0], atol=1e-7)
    np.testing.assert_allclose(box_attacks.box_widths(lower, upper), [0.6], atol=1e-7)


# ------------------------------------------------------------------------------ the bench


def test_the_bench_runs_at_a_tiny_size(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_attacks", BENCH)
    bench_attacks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_attacks)
    config = tmp_path / "tiny.toml"
    config.write_text(configurator.dump_toml({"model": tiny_options()["model"]}))
    bench_attacks.main(["--config", str(config), "--steps", "2", "--repeats", "1", "--batch-sizes", "4"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("CPU: ")
    text = "\n".join(lines)
    for words in ("ours, PGD", "ours, APGD", "ART targeted PGD", "numpy float32 matmul", "ratio ours / ART",
                  "ratio ours FLOP rate / numpy matmul"):
        assert words in text


# ---------------------------------------------------------------------------- Square


def test_square_schedule_is_the_papers_by_hand():
    # 10,000 queries: p_init until query 10, halved after 10, 50, 200, ... 8000 (Andriushchenko et al. 2020).
    assert [box_attacks.square_fraction(0.8, query, 10_000) for query in (1, 10, 11, 50, 51, 201, 8001)] == [
        0.8, 0.8, 0.4, 0.4, 0.2, 0.1, 0.8 / 512]
    # 1,000 queries scale the same schedule: query 2 is 20 of 10,000 (halved once), query 100 is 1000.
    assert box_attacks.square_fraction(0.8, 2, 1000) == 0.4 and box_attacks.square_fraction(0.8, 100, 1000) == 0.05
    runs = box_attacks.square_sides(0.8, 10_000, 28, 28)
    assert runs[:2] == [(1, 10, 25), (11, 40, 18)]  # round(sqrt(0.8 * 784)) = 25, round(sqrt(0.4 * 784)) = 18
    assert sum(count for _, count, _ in runs) == 10_000 and runs[-1][2] == 1  # 0.8 / 512 of 784 pixels: one
    runs = box_attacks.square_sides(0.8, 100, 28, 28)  # Query 1 of 100 is 100 of 10,000: halved twice already.
    assert runs[0] == (1, 2, 13) and sum(count for _, count, _ in runs) == 100
    assert [side for _, _, side in runs] == sorted({side for _, _, side in runs}, reverse=True)


@pytest.mark.parametrize("box", ["ball", "whole"])
def test_square_stays_in_its_box_and_never_lowers_the_objective(random_model, box):
    images = noise(12)
    lower, upper = box_attacks.ball(images, 0.1) if box == "ball" else box_attacks.whole_box(images)
    found = box_attacks.square(random_model, images, lower, upper, "max_confidence", queries=200, seed=3)
    assert np.all(found["images"] >= lower) and np.all(found["images"] <= upper)
    start = class_confidence(random_model, images)
    np.testing.assert_allclose(found["confidence"], class_confidence(random_model, found["images"]), rtol=1e-5)
    assert np.all(found["confidence"] >= start - 1e-6) and np.mean(found["confidence"] > start + 1e-4) >= 0.8


def test_square_fools_a_trained_model_from_noise_and_stops_at_the_cap(trained_model):
    images, targets = noise(20, seed=4), np.arange(20) % 10
    lower, upper = box_attacks.whole_box(images)
    found = box_attacks.square(trained_model, images, lower, upper, "margin", targets, queries=400, cap=0.99)
    fooled = found["steps_to_cap"] >= 0
    assert fooled.mean() >= 0.5  # Gradient-free, and still most of the noise starts reach p >= 0.99.
    assert np.all(found["confidence"][fooled] >= 0.99)
    # The same run without a cap: the images that never reached it went exactly the same way (freezing
    # the others changed nothing for them), and the frozen ones stopped where the uncapped run went on.
    uncapped = box_attacks.square(trained_model, images, lower, upper, "margin", targets, queries=400)
    np.testing.assert_array_equal(uncapped["images"][~fooled], found["images"][~fooled])
    assert np.all(uncapped["objective"][fooled] >= found["objective"][fooled])
    assert np.any(uncapped["objective"][fooled] > found["objective"][fooled] + 1e-3)


@pytest.mark.parametrize("queries, p_init, message", [(0, 0.8, "queries must be an integer >= 1"),
                                                      (10, 0.0, "p_init must be a number in \\(0, 1\\]"),
                                                      (10, 1.5, "p_init must be a number in \\(0, 1\\]")])
def test_square_refuses_bad_parameters(random_model, queries, p_init, message):
    images = noise(2)
    with pytest.raises(UserError, match=message):
        box_attacks.square(random_model, images, *box_attacks.whole_box(images), "max_confidence", queries=queries,
                           p_init=p_init)
