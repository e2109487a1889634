"""Backwork spread over workers: --worker I/N or TF_CONFIG, each worker's share into one folder."""
import contextlib
import io
import json

import numpy as np
import pytest

import cnn_backwork
import common
import distributed
import figures
import results_format
from common import UserError
from conftest import fake_backwork_results, read_image_tags, read_scalars


def tf_config(task_type, index, chiefs=1, workers=2, **extra_jobs):
    cluster = {"worker": [f"worker{number}:2222" for number in range(workers)]}
    if chiefs:
        cluster["chief"] = [f"chief{number}:2222" for number in range(chiefs)]
    cluster.update({job: [f"{job}0:2222"] for job in extra_jobs})
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


# -------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text,expected", [("0/1", (0, 1)), ("0/2", (0, 2)), ("1/2", (1, 2)), (" 3 / 4 ", (3, 4))])
def test_parse_worker(text, expected):
    assert distributed.parse_worker(text) == expected


@pytest.mark.parametrize("text,problem", [("1", "must look like 0/2"), ("a/2", "must look like 0/2"),
                                          ("-1/2", "must look like 0/2"), ("1/2/3", "must look like 0/2"),
                                          ("2/2", "numbered 0 to N - 1"), ("0/0", "numbered 0 to N - 1")])
def test_bad_worker_text_is_refused(text, problem):
    with pytest.raises(UserError, match=problem):
        distributed.parse_worker(text)


@pytest.mark.parametrize("task_type,index,chiefs,expected", [
    ("chief", 0, 1, (0, 3)), ("worker", 0, 1, (1, 3)), ("worker", 1, 1, (2, 3)),
    ("worker", 0, 0, (0, 2)), ("worker", 1, 0, (1, 2))])
def test_tf_config_puts_the_chief_first_then_the_workers(task_type, index, chiefs, expected):
    # The ps and evaluator jobs in the cluster take no labels and are not counted.
    text = tf_config(task_type, index, chiefs=chiefs, ps=1, evaluator=1)
    assert distributed.worker_from_tf_config(text) == expected


@pytest.mark.parametrize("task_type", ["evaluator", "ps"])
def test_tf_config_evaluator_and_ps_tasks_are_refused(task_type):
    with pytest.raises(UserError, match=f"the task type '{task_type}', which backworks no labels; start "
                                        "cnn_backwork.py only on the chief and worker tasks"):
        distributed.worker_from_tf_config(tf_config(task_type, 0, ps=1, evaluator=1))


@pytest.mark.parametrize("text", ["{not json", "[]", "3", '{"cluster": {"worker": ["a:1"]}}',
                                  '{"cluster": "a:1", "task": {"type": "worker", "index": 0}}',
                                  '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker"}}'])
def test_malformed_tf_config_is_refused(text):
    with pytest.raises(UserError, match=r"^TF_CONFIG is not JSON of the form .*; fix TF_CONFIG, or unset it"):
        distributed.worker_from_tf_config(text)


@pytest.mark.parametrize("task", [{"type": "worker", "index": 2}, {"type": "chief", "index": 1},
                                  {"type": "worker", "index": -1}, {"type": "worker", "index": "0"},
                                  {"type": "master", "index": 0}, {"type": ["worker"], "index": 0}])
def test_a_task_outside_the_cluster_is_refused(task):
    text = json.dumps({"cluster": {"chief": ["c:1"], "worker": ["a:1", "b:1"]}, "task": task})
    with pytest.raises(UserError, match="is not one of the tasks of its cluster; fix TF_CONFIG"):
        distributed.worker_from_tf_config(text)


def test_worker_option_wins_over_tf_config_and_says_so():
    notes = []
    environ = {"TF_CONFIG": "{malformed, but --worker wins"}
    assert distributed.resolve_worker("1/3", environ, note=notes.append) == (1, 3)
    assert notes == ["note: --worker 1/3 wins over TF_CONFIG, which is ignored"]
    assert distributed.resolve_worker(None, {"TF_CONFIG": tf_config("worker", 1)}) == (2, 3)
    assert distributed.resolve_worker(None, {"TF_CONFIG": "  "}) == (0, 1)
    assert distributed.resolve_worker(None, {}, note=notes.append) == (0, 1) and len(notes) == 1


def test_bad_worker_is_one_line_before_anything_is_loaded(tmp_path, capsys):
    # The model and data do not exist: an error about them would mean they were looked at first.
    arguments = ["--model", str(tmp_path / "missing.keras"), "--data", str(tmp_path / "missing.npz"),
                 "--out", str(tmp_path / "out"), "--worker", "2/2"]
    with pytest.raises(SystemExit) as exit_info:
        common.run_cli(lambda: cnn_backwork.main(arguments))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --worker '2/2'") and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_evaluator_task_is_refused_before_anything_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", tf_config("evaluator", 0, evaluator=1))
    with pytest.raises(UserError, match="task type 'evaluator', which backworks no labels"):
        cnn_backwork.main(["--model", str(tmp_path / "missing.keras"), "--out", str(tmp_path / "out")])


# --------------------------------------------------------------------------- shares


def test_shares_are_round_robin_over_the_sorted_labels():
    labels = [9, 0, 3, 1, 4, 7, 2]
    shares = [distributed.worker_share(labels, index, 3) for index in range(3)]
    assert shares == [[0, 3, 9], [1, 4], [2, 7]]
    assert sorted(sum(shares, [])) == sorted(labels)  # Every label once, by exactly one worker.
    assert distributed.worker_share(labels, 0, 1) == sorted(labels)
    assert distributed.worker_share([5], 1, 2) == []


def test_a_worker_with_an_empty_share_writes_nothing(trained_tiny, tiny_npz, tmp_path, monkeypatch, capsys):
    # The chief is worker 0 of 2, so this task is worker 1 and label 3 is the chief's.
    monkeypatch.setenv("TF_CONFIG", tf_config("worker", 0, chiefs=1, workers=1))
    out = tmp_path / "shared" / "backwork"
    assert cnn_backwork.main(["--model", str(trained_tiny[0]), "--data", str(tiny_npz), "--labels", "3",
                              "--out", str(out)]) == 0
    assert "worker 1 of 2 takes none of labels [3]" in capsys.readouterr().out
    assert not (tmp_path / "shared").exists()


# ------------------------------------------------------------- workers into one folder


def worker_arguments(trained_tiny, tiny_npz, out, *extra):
    return ["--model", str(trained_tiny[0]), "--data", str(tiny_npz), "--labels", "2,3,5", "--out", str(out),
            "--num-examples", "2", "--set", "backwork.max_num_steps=20", "--set", "backwork.min_num_steps=20",
            "--set", "backwork.save_freq=10", *extra]


@pytest.fixture(scope="module")
def worker_runs(trained_tiny, tiny_npz, tmp_path_factory):
    """One folder filled by workers 0/2 and 1/2 one after the other, one by a single run; and what each printed."""
    shared, alone = tmp_path_factory.mktemp("shared"), tmp_path_factory.mktemp("alone")
    printed = []
    for out, extra in [(shared, ["--worker", "0/2"]), (shared, ["--worker", "1/2"]), (alone, [])]:
        with contextlib.redirect_stdout(io.StringIO()) as output:
            assert cnn_backwork.main(worker_arguments(trained_tiny, tiny_npz, out, *extra)) == 0
        printed.append(output.getvalue())
    return shared, alone, printed


def test_two_workers_give_the_results_of_one_run(worker_runs):
    shared, alone, printed = worker_runs
    assert "worker 0 of 2 (numbered from 0) takes labels [2, 5] of [2, 3, 5]" in printed[0]
    assert "worker 1 of 2 (numbered from 0) takes labels [3] of [2, 3, 5]" in printed[1]
    split, single = results_format.load_label_results(shared), results_format.load_label_results(alone)
    assert sorted(split) == sorted(single) == [2, 3, 5]
    for label in (2, 3, 5):
        np.testing.assert_allclose(split[label]["images"], single[label]["images"], rtol=0, atol=1e-5)
        assert split[label]["steps"] == single[label]["steps"] == 20
    # Not trivially equal: the images moved, and labels' images differ.
    assert np.abs(single[3]["images"] - single[3]["history"][0]["images"]).max() > 0.01
    assert np.abs(single[2]["images"] - single[3]["images"]).max() > 0.1


def test_each_worker_logs_to_its_own_subfolder(worker_runs):
    shared, alone, _ = worker_runs
    assert not list((shared / "logs").glob("events.out.tfevents.*"))
    assert sorted(path.name for path in (shared / "logs").iterdir()) == ["worker_0", "worker_1"]
    assert read_image_tags(shared / "logs" / "worker_0") == {"label_2/images", "label_5/images"}
    assert read_image_tags(shared / "logs" / "worker_1") == {"label_3/images"}
    assert "label_3/p_min" in read_scalars(shared / "logs" / "worker_1")
    # A single process logs to logs/ itself, as before there were workers.
    assert read_image_tags(alone / "logs") == {f"label_{label}/images" for label in (2, 3, 5)}


def test_the_last_line_says_which_labels_are_still_missing(worker_runs):
    _, _, printed = worker_runs
    # Worker 1 counts the labels worker 0 left in the folder too.
    assert printed[0].strip().splitlines()[-1].endswith(
        "2 of the model's 10 labels; still missing [0, 1, 3, 4, 6, 7, 8, 9] (other workers may still be running; "
        "preprocess_data.py needs every label)")
    assert printed[1].strip().splitlines()[-1].endswith("3 of the model's 10 labels; still missing "
                                                        "[0, 1, 4, 6, 7, 8, 9] (other workers may still be "
                                                        "running; preprocess_data.py needs every label)")


def test_the_last_line_says_when_every_label_is_there(tmp_path):
    every_label = {label: None for label in range(3)}
    assert cnn_backwork.folder_status(every_label, 3, tmp_path) == (
        f"results and figures in {tmp_path}: all 3 labels of the model; preprocess_data.py can go on")


def test_figures_are_drawn_again_when_another_worker_writes_during_a_draw(tmp_path, monkeypatch):
    results_format.save_results(tmp_path / "results_1.pkl", fake_backwork_results(1))
    drawn = []

    def plot_results(results, path):
        drawn.append(sorted(results))
        if len(drawn) == 1:  # Another worker finishes label 4 while this one draws.
            results_format.save_results(tmp_path / "results_4.pkl", fake_backwork_results(4))

    monkeypatch.setattr(figures, "plot_results", plot_results)
    monkeypatch.setattr(figures, "plot_worst_training", lambda results, path: None)
    assert sorted(cnn_backwork.draw_figures(tmp_path)) == [1, 4]
    assert drawn == [[1], [1, 4]]


def test_a_rewritten_results_file_of_the_same_size_is_a_change(tmp_path):
    results_format.save_results(tmp_path / "results_1.pkl", fake_backwork_results(1))
    before = results_format.results_signature(tmp_path)
    results_format.save_results(tmp_path / "results_1.pkl", fake_backwork_results(1, seed=1))
    assert results_format.results_signature(tmp_path) != before
