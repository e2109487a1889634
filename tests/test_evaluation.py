"""The field's evaluation: both threat models on one model, as a command and in every study round."""
import json
import subprocess
import sys

import numpy as np
import pytest

import configurator
import evaluation
import ood_sets
from common import UserError
from conftest import IMAGE_SIZE, QUICK_EVALUATION
from helpers import QUICK_ATTACKS, quick_study_arguments

PROJECT = configurator.PROJECT_DIR
QUICK = [part for key, value in QUICK_EVALUATION.items() for part in ("--set", f"evaluation.{key}={value}")]


def judge_arguments(trained_tiny, tiny_npz, tmp_path, *extra):
    return ["--judge", "--model", str(trained_tiny[0]), "--data", str(tiny_npz), "--out", str(tmp_path / "judged"),
            "--set", "data.validation_size=100", *QUICK, *extra]


def test_judge_reports_both_threat_models_with_sound_bounds(trained_tiny, tiny_npz, tmp_path, capsys):
    import preprocess_data

    assert preprocess_data.main(judge_arguments(trained_tiny, tiny_npz, tmp_path, "--ood", str(tiny_npz))) == 0
    out = tmp_path / "judged"
    assert sorted(path.name for path in out.iterdir()) == ["config.toml", "evaluation.png", "report.json"]
    report = json.loads((out / "report.json").read_text())["evaluation"]
    assert set(report["ball"]) == {"uniform", "letters", "ood"} and report["eps"] == 0.3
    for name, row in report["ball"].items():
        assert row["count"] == QUICK_EVALUATION["points"] and 0 <= row["auc"] <= 100
        # The worst case is never below the clean confidence, and the certified bound never below the worst case.
        assert row["mean_clean"] <= row["mean_attacked"] <= row["mean_bound"] + 1e-5
        assert row["fooled"]["count"] == row["certified"]["count"] == row["count"]
        assert sum(row["worst_attack"].values()) == row["count"]
    # The --ood set here is the tiny data itself: its points are class images, as confident as the test images.
    assert abs(report["ball"]["ood"]["auc"] - 50) < 15 and report["ball"]["uniform"]["auc"] > 90
    unbounded = report["unbounded"]
    assert unbounded["starts"] == 10 * len(configurator.NOISE_FAMILIES)  # One start per class and family.
    assert set(unbounded["by_family"]) == set(configurator.NOISE_FAMILIES)
    assert unbounded["strongest"]["fooled_fraction"] >= max(row["fooled_fraction"]
                                                            for row in unbounded["by_attack"].values())
    square_starts = 10 * QUICK_EVALUATION["square_starts_per_class"]
    assert unbounded["square_starts"] == square_starts
    assert unbounded["all_attacks"]["count"] == unbounded["by_attack"]["square_0.8"]["count"] == square_starts
    assert unbounded["by_attack"]["apgd"]["count"] == unbounded["starts"]
    assert report["art_check"]["ours"]["count"] == QUICK_EVALUATION["art_check_points"]
    printed = capsys.readouterr().out
    assert "AAUC" in printed and "unbounded (50 noise starts)" in printed


def test_every_study_round_is_judged(trained_tiny, tiny_npz, tmp_path):
    import preprocess_data

    assert preprocess_data.main(quick_study_arguments(trained_tiny, tiny_npz, tmp_path)) == 0
    report = json.loads((tmp_path / "aug" / "report.json").read_text())
    assert [set(metrics["evaluation"]) >= {"ball", "unbounded", "art_check"} for metrics in report["rounds"]] == [True] * 2
    assert (tmp_path / "aug" / "round0" / "evaluation.png").is_file()
    assert (tmp_path / "aug" / "round1" / "evaluation.png").is_file()


def test_a_study_can_leave_the_evaluation_out(trained_tiny, tiny_npz, tmp_path):
    import preprocess_data

    arguments = quick_study_arguments(trained_tiny, tiny_npz, tmp_path) + ["--set", "augment.evaluate=false"]
    assert preprocess_data.main(arguments) == 0
    report = json.loads((tmp_path / "aug" / "report.json").read_text())
    assert not any("evaluation" in metrics for metrics in report["rounds"])


def test_a_study_can_judge_its_final_model_alone(trained_tiny, tiny_npz, tmp_path):
    import preprocess_data

    arguments = quick_study_arguments(trained_tiny, tiny_npz, tmp_path) + ["--set", 'augment.evaluate_rounds="final"']
    assert preprocess_data.main(arguments) == 0
    report = json.loads((tmp_path / "aug" / "report.json").read_text())
    assert ["evaluation" in metrics for metrics in report["rounds"]] == [False, True]
    assert not (tmp_path / "aug" / "round0" / "evaluation.png").exists()
    assert (tmp_path / "aug" / "round1" / "evaluation.png").is_file()
    assert preprocess_data.judged_rounds({"evaluate": True, "evaluate_rounds": "final", "rounds": 5}) == {5}
    assert preprocess_data.judged_rounds({"evaluate": False, "evaluate_rounds": "every", "rounds": 5}) == set()


def test_an_extra_class_model_is_judged_on_its_real_classes(trained_tiny, tiny_npz, tmp_path):
    import preprocess_data

    study = quick_study_arguments(trained_tiny, tiny_npz, tmp_path) + ["--target", "extra_class",
                                                                       "--set", 'augment.evaluate_rounds="final"']
    assert preprocess_data.main(study) == 0
    in_study = json.loads((tmp_path / "aug" / "report.json").read_text())["rounds"][1]["evaluation"]
    # --judge reads the study's saved config (augment.target) and takes the model's 11th output as "none".
    arguments = ["--judge", "--model", str(tmp_path / "aug" / "model.keras"), "--data", str(tiny_npz),
                 "--out", str(tmp_path / "judged")]
    assert preprocess_data.main(arguments) == 0
    judged = json.loads((tmp_path / "judged" / "report.json").read_text())["evaluation"]
    assert judged["in_distribution"] == in_study["in_distribution"]
    assert {name: row["auc"] for name, row in judged["ball"].items()} == \
        {name: row["auc"] for name, row in in_study["ball"].items()}
    # A config whose target does not fit the model's outputs is refused in one line naming the key.
    with pytest.raises(UserError, match=r"has 11 outputs but augment.target = 'uniform' needs 10 \(10 classes\)"):
        preprocess_data.main(arguments + ["--set", 'augment.target="uniform"'])
    plain = judge_arguments(trained_tiny, tiny_npz, tmp_path, "--set", 'augment.target="extra_class"')
    with pytest.raises(UserError, match=r"has 10 outputs but augment.target = 'extra_class' needs 11 \(10 classes "
                                        r"and \"none\"\); judge it with the config it was trained with"):
        preprocess_data.main(plain)


def test_worst_verdict_takes_the_worst_of_the_attacks_per_start():
    verdicts = {"apgd": np.array(["not_fooled", "class_image", "fooled", "not_fooled"]),
                "square": np.array(["class_image", "fooled", "not_fooled", "not_fooled"])}
    assert list(evaluation.worst_verdict(verdicts)) == ["class_image", "fooled", "fooled", "not_fooled"]


def test_the_strongest_unbounded_number_is_the_subset_where_square_fools_more():
    def row(fooled, count):
        return {"fooled": fooled, "count": count, "fooled_fraction": fooled / count, "class_image": 0}

    masked = {"worst": row(83, 1000), "all_attacks": row(36, 40), "square_starts": 40}  # A flat gradient near noise.
    assert evaluation.strongest(masked)["fooled"] == 36 and "40 starts every attack ran on" in \
        evaluation.strongest(masked)["over"]
    plain = {"worst": row(1000, 1000), "all_attacks": row(40, 40), "square_starts": 40}
    assert evaluation.strongest(plain)["count"] == 1000 and evaluation.strongest(plain)["over"] == "every start"
    no_square = {"worst": row(5, 1000), "all_attacks": {**row(0, 1), "count": 0, "fooled_fraction": 0.0},
                 "square_starts": 0}
    assert evaluation.strongest(no_square)["over"] == "every start"


def test_starts_cover_every_family_and_class_and_never_change(tiny_data):
    section = {**configurator.default_config()["evaluation"], "starts_per_class": 3}
    images, targets, families = evaluation.unbounded_starts(tiny_data, section, list(range(10)))
    assert images.shape == (3 * 10 * 5, IMAGE_SIZE, IMAGE_SIZE, 1) and 0 <= images.min() and images.max() <= 1
    for family in configurator.NOISE_FAMILIES:
        assert sorted(np.bincount(targets[families == family])) == [3] * 10
    again, _, _ = evaluation.unbounded_starts(tiny_data, section, list(range(10)))
    np.testing.assert_array_equal(images, again)  # Every model of a study faces the same starts.
    assert np.max(images[families == "dim"]) <= 0.2


def test_square_attacks_as_many_whole_box_starts_of_every_class_and_always_the_same():
    targets = np.tile(np.arange(10), 5 * 3)  # Three starts per class from each of five families.
    chosen = evaluation.square_starts(targets, 4, seed=0)
    assert list(np.bincount(targets[chosen], minlength=10)) == [4] * 10
    assert list(chosen) == sorted(set(chosen))  # Distinct starts, in order.
    np.testing.assert_array_equal(chosen, evaluation.square_starts(targets, 4, seed=0))
    assert not np.array_equal(chosen, evaluation.square_starts(targets, 4, seed=1))
    assert len(evaluation.square_starts(targets, 100, seed=0)) == len(targets)  # More than there are: all of them.
    assert len(evaluation.square_starts(targets, 0, seed=0)) == 0


def test_ball_points_are_the_named_sets(tiny_data):
    section = {**configurator.default_config()["evaluation"], "points": 7}
    ood = np.zeros((20, IMAGE_SIZE, IMAGE_SIZE, 1), np.float32)
    sets = evaluation.ball_points(tiny_data, section, ood)
    assert {name: points.shape for name, points in sets.items()} == {
        name: (7, IMAGE_SIZE, IMAGE_SIZE, 1) for name in ("uniform", "letters", "ood")}
    assert "ood" not in evaluation.ball_points(tiny_data, section)  # No --ood: no such set, no error.


def test_the_noise_families_are_the_configs_choices():
    assert tuple(ood_sets.NOISE_FAMILIES) == configurator.NOISE_FAMILIES


@pytest.mark.parametrize("setting, message", [
    ("evaluation.eps=0", "evaluation.eps = 0.0 must be in (0, 1]"),
    ("evaluation.eps=1.5", "evaluation.eps = 1.5 must be in (0, 1]"),
    ("evaluation.points=0", "evaluation.points = 0 must be between 1"),
    ("evaluation.sets=[\"cifar\"]", "evaluation.sets = ['cifar'] must be a list of distinct ones of uniform"),
])
def test_a_bad_evaluation_setting_is_one_line_and_exit_2(trained_tiny, tiny_npz, tmp_path, setting, message):
    result = subprocess.run([sys.executable, "preprocess_data.py", "--judge", "--model", str(trained_tiny[0]),
                             "--data", str(tiny_npz), "--set", setting], cwd=PROJECT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_ood_set_of_another_image_size_is_one_line(trained_tiny, tiny_npz, colour_npz, tmp_path):
    result = subprocess.run([sys.executable, "preprocess_data.py",
                             *judge_arguments(trained_tiny, tiny_npz, tmp_path, "--ood", str(colour_npz))],
                            cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "give a data set of the same image size" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "judged").exists()


def test_a_study_without_results_says_what_to_give(trained_tiny, tiny_npz):
    result = subprocess.run([sys.executable, "preprocess_data.py", "--model", str(trained_tiny[0]),
                             "--data", str(tiny_npz), *QUICK_ATTACKS], cwd=PROJECT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "a study needs --results" in result.stderr and "--judge" in result.stderr
