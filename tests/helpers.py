"""Helpers several test files share (fixtures stay in conftest.py): a results folder, a quick study."""
import preprocess_data
import results_format
from conftest import QUICK_EVALUATION, fake_backwork_results


def write_results(folder, labels=range(10), shape=(3, 12, 12), num_classes=10, seed=0):
    """A folder of made-up results_{label}.pkl, as cnn_backwork.py writes them."""
    for label in labels:
        results_format.save_results(folder / f"results_{label}.pkl",
                                    fake_backwork_results(label, shape, num_classes, seed))
    return folder


QUICK_ATTACKS = ["--set", "augment.attack_examples=2", "--set", "augment.pgd_steps=30",
                 "--set", "augment.square_queries=30",
                 *[part for key, value in QUICK_EVALUATION.items() for part in ("--set", f"evaluation.{key}={value}")]]


def quick_study_arguments(trained_tiny, tiny_npz, tmp_path):
    """preprocess_data.py's arguments for a study of the tiny model that runs in seconds."""
    results = write_results(tmp_path / "results")
    return ["--results", str(results), "--model", str(trained_tiny[0]), "--data", str(tiny_npz),
            "--out", str(tmp_path / "aug"), "--set", "data.validation_size=100", "--set", "augment.num_blank=5",
            "--set", "augment.num_noise=5", "--set", "augment.num_eval_noise=5", "--steps", "5",
            "--set", "backwork.max_num_steps=20", "--set", "backwork.min_num_steps=10",
            "--set", "augment.difficulty_budgets=[10, 20]",
            "--set", "backwork.num_examples=2", "--set", "backwork.learning_rate=0.05", *QUICK_ATTACKS]


def record_retraining(monkeypatch, record):
    """Make preprocess_data.retrain call record(data) with each round's training data, then retrain as usual."""
    real_retrain = preprocess_data.retrain

    def recording_retrain(model, data, config, round_index, progress=print):
        record(data)
        return real_retrain(model, data, config, round_index, progress)

    monkeypatch.setattr(preprocess_data, "retrain", recording_retrain)
