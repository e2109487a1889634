"""The out-of-distribution numbers: AUC columns, the worst case over attacks, fractions, the novelty rule."""
import doctest

import numpy as np
import pytest

import attacks
import ood_metrics

# Three test images and four out-of-distribution points, one tied with a test image (0.8).
IN_SCORES = [0.9, 0.8, 0.7]
CLEAN = [0.1, 0.8, 0.95, 0.5]


def test_the_docstring_examples_hold():
    assert doctest.testmod(ood_metrics).failed == 0


def test_auc_columns_count_pairs_by_hand_with_ties_as_half():
    attacked = [0.6, 0.85, 0.95, 0.75]
    certified = [0.65, 0.9, 1.0, 0.99]
    columns = ood_metrics.auc_columns(IN_SCORES, CLEAN, attacked, certified)
    # AUC: 0.9 beats 0.1, 0.8, 0.5 (3); 0.8 beats 0.1, 0.5 and ties 0.8 (2.5); 0.7 beats 0.1, 0.5 (2): 7.5 of 12.
    assert columns["auc"] == pytest.approx(100 * 7.5 / 12)
    # AAUC against 0.6, 0.85, 0.95, 0.75: 0.9 beats three (3); 0.8 beats 0.6, 0.75 (2); 0.7 beats 0.6 (1): 6 of 12.
    assert columns["aauc"] == pytest.approx(100 * 6 / 12)
    # GAUC against 0.65, 0.9, 1.0, 0.99: 0.9 beats 0.65, ties 0.9 (1.5); 0.8 and 0.7 beat 0.65 (1 each): 3.5 of 12.
    assert columns["gauc"] == pytest.approx(100 * 3.5 / 12)
    assert columns["auc"] >= columns["aauc"] >= columns["gauc"]  # Each column assumes a stronger adversary.


def test_a_perfect_detector_scores_100_and_a_blind_one_50():
    assert ood_metrics.auc_columns([0.99, 0.98], [0.1, 0.5, 0.97]) == {"auc": 100.0, "aauc": None, "gauc": None}
    assert ood_metrics.auc_columns([0.5, 0.5], [0.5, 0.5, 0.5])["auc"] == 50.0
    assert ood_metrics.auc_columns([0.1], [0.5, 0.9])["auc"] == 0.0


def test_an_attack_that_lowers_a_confidence_is_no_worse_than_the_clean_point():
    # The point itself is in its ball, so an attack that ends lower leaves the clean confidence as the worst case.
    columns = ood_metrics.auc_columns(IN_SCORES, CLEAN, attacked_scores=[0.0, 0.0, 0.0, 0.0])
    assert columns["aauc"] == columns["auc"]


def test_an_unsound_bound_or_mismatched_points_are_refused():
    with pytest.raises(ValueError, match="certified bound 0.7 of point 1 is below the confidence 0.85.*unsound"):
        ood_metrics.auc_columns(IN_SCORES, CLEAN, [0.1, 0.85, 0.95, 0.5], [0.2, 0.7, 1.0, 1.0])
    with pytest.raises(ValueError, match="attacked_scores has 3 points, clean_scores 4"):
        ood_metrics.auc_columns(IN_SCORES, CLEAN, attacked_scores=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="in_scores is empty"):
        ood_metrics.auc_columns([], CLEAN)


def test_log_confidence_ignores_the_none_output():
    logits = np.log([[0.2, 0.7, 0.1], [0.05, 0.05, 0.9]])  # Two classes and "none": softmax gives these back.
    np.testing.assert_allclose(ood_metrics.log_confidence(logits, 2), np.log([0.7, 0.05]), rtol=1e-12)
    np.testing.assert_allclose(ood_metrics.log_confidence(logits, 3), np.log([0.7, 0.9]), rtol=1e-12)
    with pytest.raises(ValueError, match="num_classes 4 must be between 1 and the 3 outputs"):
        ood_metrics.log_confidence(logits, 4)


def test_worst_case_takes_each_points_highest_confidence_and_names_the_attack():
    confidences = {"square": [0.3, 0.9, 0.2, 0.6],
                   "apgd": [0.5, 0.95, 0.1, 0.6],
                   "clean": [0.4, 0.2, 0.3, 0.6]}
    worst = ood_metrics.worst_case(confidences)
    np.testing.assert_allclose(worst["confidence"], [0.5, 0.95, 0.3, 0.6])
    # Point 2: no attack beat the clean point; point 3: a three-way tie goes to clean, then by name.
    assert worst["attack"].tolist() == ["apgd", "apgd", "clean", "clean"]
    assert worst["counts"] == {"clean": 2, "apgd": 2, "square": 0}
    assert np.all(worst["confidence"] >= confidences["clean"])


def test_worst_case_ties_between_attacks_go_to_the_first_by_name_whatever_the_order_given():
    one = ood_metrics.worst_case({"square": [0.7], "apgd": [0.7]})
    other = ood_metrics.worst_case({"apgd": [0.7], "square": [0.7]})
    assert one["attack"].tolist() == other["attack"].tolist() == ["apgd"]


def test_worst_case_refuses_attacks_on_different_points():
    with pytest.raises(ValueError, match="the lengths differ: {'clean': 3, 'pgd': 2}"):
        ood_metrics.worst_case({"clean": [0.1, 0.2, 0.3], "pgd": [0.5, 0.6]})
    with pytest.raises(ValueError, match="at least one attack"):
        ood_metrics.worst_case({})


def test_fooled_and_certified_fractions_carry_wilson_intervals():
    fooled = ood_metrics.fooled_fraction_in_ball([0.999, 0.5, 0.9995, 0.2], cap=0.999)
    assert fooled == {"fooled": 2, "count": 4, "fraction": 0.5, "interval": list(attacks.wilson_interval(2, 4))}
    certified = ood_metrics.certified_fraction([0.999, 0.5, 1.0, 0.2], cap=0.999)  # A bound at the cap is no proof.
    assert certified["certified"] == 2 and certified["fraction"] == 0.5
    low, high = certified["interval"]
    assert 0 < low < 0.5 < high < 1


def test_the_novelty_threshold_is_the_99th_percentile_of_test_distances():
    distances = np.arange(1, 101) / 1000  # 0.001 ... 0.100
    assert ood_metrics.novelty_threshold(distances) == pytest.approx(0.099)  # 99 of 100 at or below it.
    assert ood_metrics.novelty_threshold(distances, quantile=0.5) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="none were given"):
        ood_metrics.novelty_threshold([])


def tiny_dataset():
    """Two classes of 6x6 images: class 0 a bright left half, class 1 a bright top half, with faint noise."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 0.1, (40, 6, 6, 1)).astype(np.float32)
    labels = np.arange(40) % 2
    images[labels == 0, :, :3] += 0.8
    images[labels == 1, :3, :] += 0.8
    return {"x_train": images[:30], "y_train": labels[:30], "x_test": images[30:], "y_test": labels[30:]}


def test_own_class_distances_match_a_numpy_reference():
    data = tiny_dataset()
    distances = ood_metrics.own_class_distances(data)
    flat_train = data["x_train"].reshape(30, -1)
    for image, label, distance in zip(data["x_test"].reshape(10, -1), data["y_test"], distances):
        references = flat_train[data["y_train"] == label]
        assert distance == pytest.approx(np.min(np.mean((references - image) ** 2, axis=1)), rel=1e-4, abs=1e-6)
    assert distances.max() < 0.01  # Each test image lies near its class.


def test_a_copy_of_a_training_image_is_a_class_image_and_noise_is_fooled():
    data = tiny_dataset()
    threshold = ood_metrics.novelty_threshold(ood_metrics.own_class_distances(data))
    noise = np.random.default_rng(1).uniform(0, 1, (1, 6, 6, 1)).astype(np.float32)
    images = np.concatenate([data["x_train"][:1], noise, noise])  # A copy of a class-0 image, then noise twice.
    targets = np.array([0, 0, 1])
    distances = attacks.nearest_training_distances(data, images, targets)
    assert distances[0] == 0 and distances[1] > 10 * threshold  # The rule has room on both sides.
    outcomes = ood_metrics.classify_unbounded([0.9999, 0.9995, 0.3], distances, cap=0.999, threshold=threshold)
    assert outcomes.tolist() == ["class_image", "fooled", "not_fooled"]


def test_the_unbounded_rule_puts_a_distance_at_the_threshold_with_class_images():
    outcomes = ood_metrics.classify_unbounded([0.999, 0.999, 0.998], [0.05, 0.0501, 0.9], cap=0.999, threshold=0.05)
    assert outcomes.tolist() == ["class_image", "fooled", "not_fooled"]
    with pytest.raises(ValueError, match="3 probabilities but 2 distances"):
        ood_metrics.classify_unbounded([0.1, 0.2, 0.3], [0.1, 0.2], cap=0.999, threshold=0.05)


def test_the_unbounded_summary_counts_each_verdict_and_bounds_the_fooled_fraction():
    outcomes = ["fooled"] * 6 + ["class_image"] * 4 + ["not_fooled"] * 10
    summary = ood_metrics.unbounded_summary(outcomes, threshold=0.04)
    assert (summary["count"], summary["fooled"], summary["class_image"], summary["not_fooled"]) == (20, 6, 4, 10)
    assert (summary["fooled_fraction"], summary["class_image_fraction"]) == (0.3, 0.2)
    assert summary["fooled_interval"] == list(attacks.wilson_interval(6, 20)) and summary["threshold"] == 0.04
    assert summary["fooled_interval"][0] < 0.3 < summary["fooled_interval"][1]



def test_log_confidence_ranks_what_rounds_to_one_and_is_the_log_of_the_top_probability():
    logits = np.array([[0.0, 1.0, -1.0], [20.0, 0.0, 0.0], [30.0, 0.0, 0.0], [0.0, 0.0, 40.0]], np.float32)
    scores = ood_metrics.log_confidence(logits, num_classes=2)  # The third output is a "none" output.
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(scores[0], np.log(softmax[0, :2].max()), rtol=1e-6)
    assert softmax[1].max() == softmax[2].max() == 1.0  # In float32 the two confident rows tie ...
    assert scores[1] < scores[2] < 0 and abs(scores[1] + 2 * np.exp(-20)) < 1e-15  # ... in log space they do not.
    assert scores[3] < np.log(1e-15)  # "none" at 40: the classes' best is far from confident.
