"""tf.distribute training (mirrored, multi-worker), XLA and mixed precision, on CPU only.

TensorFlow splits a CPU into logical devices only before it starts, so the mirrored
checks run in a fresh process; the cluster test runs two real worker processes.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cnn
import common
import configurator
import distributed
import proc_mnist
import trainer
from conftest import tiny_options

PROJECT = Path(__file__).resolve().parents[1]
SILENT = {"progress": lambda line: None}

# Trains the same tiny run on one device and mirrored over two logical CPUs, then resumes a
# mirrored run from a save; prints the largest weight differences as JSON.
MIRRORED_SCRIPT = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, "tests")
import numpy as np
import cnn, common, datasets, distributed, proc_mnist, trainer
from conftest import tiny_options

data = datasets.split_validation(datasets.load_dataset(sys.argv[1]), 100)
silent = {"progress": lambda line: None}

def options(steps, distribute):
    config = tiny_options(steps)
    # Shifts are drawn for the global batch, so they are the same on one device and on two.
    config["train"].update(distribute=distribute, shift_pixels=1, log_every=10)
    return config

def largest_difference(first, second):
    return max(float(np.max(np.abs(a - b))) for a, b in zip(first.get_weights(), second.get_weights()))

single, _ = trainer.train(data, options(20, "none"), **silent)
strategy = distributed.make_strategy("mirrored")
mirrored, metrics = trainer.train(data, options(20, "mirrored"), strategy=strategy, **silent)
half, _ = trainer.train(data, options(10, "mirrored"), strategy=strategy, **silent)
cnn.save_model(half, sys.argv[2])
with strategy.scope():
    reloaded = cnn.load_trained_model(sys.argv[2], compile=True)
resumed, resumed_metrics = trainer.train(data, options(20, "mirrored"), model=reloaded, strategy=strategy, **silent)
untrained = proc_mnist.build_model(options(1, "none")["model"])

# Dropout: each replica its own masks, and the seed states still equal afterwards.
import keras
with strategy.scope():
    dropped = proc_mnist.build_model(tiny_options(1, dropout=0.5)["model"])
dropout_output = keras.Model(dropped.input, dropped.get_layer("fc1_dropout").output)
images = tf.ones((4, 12, 12, 1))

def replica_masks():
    replica = tf.distribute.get_replica_context().replica_id_in_sync_group
    with distributed.replica_random_stream(dropped, replica):
        return dropout_output(images, training=True)

masks = [value.numpy() == 0 for value in strategy.experimental_local_results(tf.function(
    lambda: strategy.run(replica_masks))())]
state = dropped.get_layer("fc1_dropout").seed_generator.state.value
states = [value.numpy().tolist() for value in strategy.experimental_local_results(state)]
print(json.dumps({"replicas": metrics["replicas"], "steps": resumed_metrics["steps"],
                  "mirrored_vs_single": largest_difference(mirrored, single),
                  "resumed_vs_straight": largest_difference(resumed, mirrored),
                  "trained_vs_untrained": largest_difference(single, untrained),
                  "mirrored_variable": type(mirrored.trainable_variables[0].value).__name__,
                  "masks_differ": bool(np.any(masks[0] != masks[1])), "some_dropped": bool(masks[0].any()),
                  "states": states}))
"""


def run_python(arguments, timeout=300, env=None):
    return subprocess.run([sys.executable, *arguments], cwd=PROJECT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_mirrored_over_two_cpus_equals_one_device_and_resumes(tiny_npz, tmp_path):
    result = run_python(["-c", MIRRORED_SCRIPT, str(tiny_npz), str(tmp_path / "model.keras")])
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["replicas"] == 2 and numbers["mirrored_variable"] == "MirroredVariable"
    assert numbers["steps"] == 20
    assert numbers["trained_vs_untrained"] > 0.05  # Training moved the weights: the comparisons mean something.
    assert numbers["mirrored_vs_single"] < 1e-4
    assert numbers["resumed_vs_straight"] < 1e-4
    # Dropout: the replicas drop different units, and their seed states stay equal (advanced once).
    assert numbers["some_dropped"] and numbers["masks_differ"]
    assert numbers["states"][0] == numbers["states"][1] and numbers["states"][0][1] == 1


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for each in sockets:
        each.bind(("localhost", 0))
    ports = [each.getsockname()[1] for each in sockets]
    for each in sockets:
        each.close()
    return ports


def cluster_arguments(tmp_path, tiny_npz, num_steps, log_every):
    """proc_mnist.py's arguments for the tiny model trained by a cluster (train.distribute = multi_worker)."""
    config = tmp_path / "cluster.toml"
    options = tiny_options(num_steps)
    options["train"].update(distribute="multi_worker", log_every=log_every)
    config.write_text(configurator.dump_toml({**options, "data": {"validation_size": 100}}))
    return [str(config), "--data", str(tiny_npz), "--out", str(tmp_path / "run")]


def stop_one_of_two_workers(arguments, stop):
    """Start two workers; once the chief logs step 40, stop(worker 1); return both (returncode, stdout, stderr)."""
    processes = start_two_workers(arguments)
    try:
        if not chief_reached(processes[0], "step 40/", seconds=180):  # Both workers are training (they go in step).
            raise AssertionError("the chief never logged step 40 within 180 s")
        stop(processes[1])
        outputs = [process.communicate(timeout=60) for process in processes]
    finally:
        for process in processes:
            process.kill()
    return [(process.returncode, *output) for process, output in zip(processes, outputs)]


def chief_reached(process, prefix, seconds):
    """Whether process printed a line starting with prefix within seconds (its stdout read on a thread,
    so that a worker that hangs or prints nothing cannot hang the test)."""
    import threading

    found = threading.Event()

    def read():
        for line in process.stdout:
            if line.startswith(prefix):
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    return found.wait(seconds)


def test_two_local_workers_train_to_the_end_and_only_the_chief_writes(tiny_npz, tmp_path):
    outputs = run_two_workers(cluster_arguments(tmp_path, tiny_npz, num_steps=12, log_every=6))
    assert "saved" in outputs[0] and "the chief saves the run" in outputs[1]
    written = sorted(path.name for path in (tmp_path / "run").iterdir())
    assert written == ["config.toml", "logs", "metrics.json", "model.keras", "training_curve.png"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["replicas"] == 2 and not metrics["interrupted"]
    assert metrics["test_accuracy"] is not None
    # Both workers resume from the chief's files (a shared folder) and go on together.
    outputs = run_two_workers(["--data", str(tiny_npz), "--out", str(tmp_path / "run"), "--resume", "--steps", "18"])
    assert all("resuming" in output and "at step 12" in output for output in outputs)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 18 and metrics["sessions"] == 2 and metrics["history"][-1]["step"] == 18


def test_a_sigterm_to_one_worker_stops_both_at_the_same_step_and_the_chief_saves(tiny_npz, tmp_path):
    # Not the chief, and while the chief logs: the signal lands as worker 1 waits to agree.
    results = stop_one_of_two_workers(cluster_arguments(tmp_path, tiny_npz, num_steps=1_000_000, log_every=20),
                                      lambda worker: worker.send_signal(signal.SIGTERM))
    assert [code for code, _, _ in results] == [130, 130], results
    steps = [int(re.search(r"interrupted at step (\d+)", stdout)[1]) for _, stdout, _ in results]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert steps[0] == steps[1] == metrics["steps"] >= 40 and metrics["interrupted"]


def test_a_worker_that_dies_stops_the_chief_which_saves_and_says_how_to_resume(tiny_npz, tmp_path):
    # Killed as a machine that goes down would be: no signal handler runs.
    (code, _, stderr), _ = stop_one_of_two_workers(
        cluster_arguments(tmp_path, tiny_npz, num_steps=1_000_000, log_every=20), lambda worker: worker.kill())
    assert code == 2
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: training stopped: a worker of the cluster failed") and "--resume" in last_line
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["worker_failed"] and metrics["steps"] >= 40
    model = cnn.load_trained_model(tmp_path / "run" / "model.keras", compile=True)
    assert int(model.optimizer.iterations.numpy()) == metrics["steps"]  # The weights of a whole step.


def start_two_workers(arguments):
    """proc_mnist.py with arguments as the two workers of a localhost cluster, started (stdout piped)."""
    workers = [f"localhost:{port}" for port in free_ports(2)]
    return [subprocess.Popen([sys.executable, "proc_mnist.py", *arguments], cwd=PROJECT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "TF_CONFIG": json.dumps({"cluster": {"worker": workers},
                                                                          "task": {"type": "worker", "index": index}})})
            for index in range(2)]


def run_two_workers(arguments):
    """proc_mnist.py with arguments as two workers of a localhost cluster; their outputs, once both exit 0."""
    processes = start_two_workers(arguments)
    try:
        outputs = [process.communicate(timeout=300) for process in processes]
    finally:  # A worker left waiting for its dead peer would otherwise outlive the test.
        for process in processes:
            process.kill()
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stdout[-1500:] + stderr[-1500:]
    return [stdout for stdout, _ in outputs]


@pytest.mark.parametrize("setting, message", [
    ("train.distribute=ring", "train.distribute 'ring' is unknown; use one of none, mirrored, multi_worker"),
    ("train.xla=yes", "train.xla 'yes' is unknown; use one of auto, on, off"),
    ("train.mixed_precision=mixed_float16", "train.mixed_precision 'mixed_float16' is unknown"),
    ("train.distribute=multi_worker", "needs the TF_CONFIG environment variable"),
])
def test_scaling_mistakes_end_in_one_line(tiny_npz, tmp_path, setting, message):
    environment = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
    result = run_python(["proc_mnist.py", "--data", str(tiny_npz), "--out", str(tmp_path / "run"), "--set", setting],
                        env=environment, timeout=120)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, message", [
    ("{not json", "TF_CONFIG is not JSON of the form"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}',
     'task {"type": "worker", "index": 3} is not one of the tasks of its cluster; fix TF_CONFIG, or unset it'),
    ('{"cluster": {"worker": ["a:1"]}}', "TF_CONFIG is not JSON of the form"),
])
def test_a_bad_tf_config_is_refused_in_one_line(monkeypatch, text, message):
    monkeypatch.setenv("TF_CONFIG", text)
    with pytest.raises(common.UserError, match=message):
        distributed.cluster_from_environment()


def test_a_batch_that_does_not_split_over_the_replicas_is_refused():
    class TwoReplicas:
        num_replicas_in_sync = 2

    distributed.check_batch_split(128, TwoReplicas())
    with pytest.raises(common.UserError, match="train.batch_size 125 does not split evenly over 2 replicas; "
                                               "use a multiple of 2"):
        distributed.check_batch_split(125, TwoReplicas())


def test_xla_trains_as_the_plain_loop_does(tiny_data):
    options = tiny_options(30)
    plain, plain_metrics = trainer.train(tiny_data, options, **SILENT)
    options["train"]["xla"] = "on"
    compiled, compiled_metrics = trainer.train(tiny_data, options, **SILENT)
    assert compiled_metrics["xla"] and not plain_metrics["xla"]  # "auto" is off on a CPU.
    for expected, actual in zip(plain.get_weights(), compiled.get_weights()):
        np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-4)


def test_mixed_bfloat16_trains_and_is_analysed_in_float32(tiny_data, tmp_path):
    options = tiny_options(150)
    options["train"].update(mixed_precision="mixed_bfloat16", mixed_precision_force=True)  # On any CPU.
    model, metrics = trainer.train(tiny_data, options, **SILENT)
    assert metrics["mixed_precision"] == "mixed_bfloat16" and metrics["test_accuracy"] > 0.8
    assert model.get_layer("conv1_conv").compute_dtype == "bfloat16"
    assert model.get_layer("logits").compute_dtype == "float32" and model.output.dtype == "float32"
    cnn.save_model(model, tmp_path / "model.keras")
    resumable = cnn.load_trained_model(tmp_path / "model.keras", compile=True)
    assert cnn.precision_of(resumable) == "mixed_bfloat16"  # Training goes on as it began.
    analysed = cnn.load_trained_model(tmp_path / "model.keras")
    assert cnn.precision_of(analysed) == "none"
    for expected, actual in zip(model.get_weights(), analysed.get_weights()):
        np.testing.assert_array_equal(actual, expected)
    images = tiny_data["x_test"][:50]
    float32_probabilities, bf16_probabilities = cnn.predict(analysed, images), cnn.predict(model, images)
    assert np.array_equal(float32_probabilities.argmax(1), bf16_probabilities.argmax(1)) or \
        np.mean(float32_probabilities.argmax(1) == bf16_probabilities.argmax(1)) > 0.95
    assert not np.allclose(float32_probabilities, bf16_probabilities, atol=1e-6)  # bf16 rounds: a real change.


def test_resuming_in_another_precision_says_the_model_keeps_its_own(tiny_npz, tmp_path, capsys):
    out, config = tmp_path / "run", tmp_path / "tiny.toml"
    config.write_text(configurator.dump_toml({**tiny_options(), "data": {"validation_size": 100}}))
    arguments = [str(config), "--data", str(tiny_npz), "--out", str(out)]
    assert proc_mnist.main([*arguments, "--steps", "10"]) == 0
    code = proc_mnist.main([*arguments, "--steps", "20", "--resume", "--set", "train.mixed_precision=mixed_bfloat16",
                            "--set", "train.mixed_precision_force=true"])
    assert code == 0
    assert "the saved model computes in 'none', and goes on in it" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["mixed_precision"] == "none"


def test_cpu_bfloat16_is_read_from_the_flags_of_every_core():
    def cpuinfo(*flag_lines):
        return "".join(f"processor\t: {index}\nflags\t\t: {flags}\n\n" for index, flags in enumerate(flag_lines))

    assert cnn.cpu_has_bfloat16(cpuinfo("fpu avx2 fma avx512f avx512_bf16", "fpu avx2 avx512_bf16")) is True
    assert cnn.cpu_has_bfloat16(cpuinfo("fpu avx2 amx_bf16 amx_tile")) is True
    assert cnn.cpu_has_bfloat16(cpuinfo("fpu avx2 fma avx512f avx512bw")) is False
    assert cnn.cpu_has_bfloat16(cpuinfo("avx512_bf16", "avx2")) is False  # One core without: slow.
    assert cnn.cpu_has_bfloat16("processor\t: 0\nFeatures\t: fp asimd\n") is None  # No x86 flags.
    assert cnn.cpu_has_bfloat16() in (True, False, None)  # This machine's /proc/cpuinfo, if any.


def fake_hardware(monkeypatch, cpu_bfloat16, gpu=False):
    monkeypatch.setattr(cnn, "cpu_has_bfloat16", lambda cpuinfo_text=None: cpu_bfloat16)
    monkeypatch.setattr(cnn, "gpu_visible", lambda: gpu)


@pytest.mark.parametrize("cpu_bfloat16, gpu, fast", [
    (True, False, True), (False, True, True), (None, True, True), (False, False, False), (None, False, False)])
def test_auto_precision_is_bfloat16_only_where_it_is_fast(monkeypatch, cpu_bfloat16, gpu, fast):
    fake_hardware(monkeypatch, cpu_bfloat16, gpu)
    assert cnn.resolve_precision("auto") == ("mixed_bfloat16" if fast else "none")
    assert cnn.resolve_precision("none") == "none"
    assert cnn.resolve_precision("mixed_bfloat16") == "mixed_bfloat16"


@pytest.mark.parametrize("variable, cap, fast", [
    ("ONEDNN_MAX_CPU_ISA", "AVX2", False), ("DNNL_MAX_CPU_ISA", "avx512_core", False),
    ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16", True), ("ONEDNN_MAX_CPU_ISA", "", True)])
def test_a_onednn_cap_below_bfloat16_makes_a_bfloat16_cpu_slow(monkeypatch, variable, cap, fast):
    fake_hardware(monkeypatch, True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv(variable, cap)
    assert cnn.resolve_precision("auto") == ("mixed_bfloat16" if fast else "none")
    if not fast:
        assert f"={cap.upper()} keeps oneDNN from the CPU's bfloat16 instructions" in cnn.bfloat16_slowness()


@pytest.mark.parametrize("cpu_bfloat16, reason", [
    (False, "the CPU has no bfloat16 arithmetic (neither avx512_bf16 nor amx_bf16)"),
    (None, "the CPU flags cannot be read (/proc/cpuinfo), so bfloat16 arithmetic is taken to be absent")])
def test_slow_mixed_bfloat16_stops_in_one_line_unless_forced(tiny_data, monkeypatch, cpu_bfloat16, reason):
    fake_hardware(monkeypatch, cpu_bfloat16)
    options = tiny_options(2)
    options["train"]["mixed_precision"] = "mixed_bfloat16"
    with pytest.raises(common.UserError) as error:
        trainer.train(tiny_data, options, **SILENT)
    message = str(error.value)
    assert "would train several times slower than float32 here (0.13x" in message and reason in message
    assert "--set train.mixed_precision_force=true" in message and "\n" not in message
    options["train"]["mixed_precision_force"] = True
    _, metrics = trainer.train(tiny_data, options, **SILENT)
    assert metrics["mixed_precision"] == "mixed_bfloat16" and metrics["steps"] == 2


def test_mixed_bfloat16_goes_on_where_the_cpu_has_it(tiny_data, monkeypatch):
    fake_hardware(monkeypatch, True)
    options = tiny_options(2)
    options["train"]["mixed_precision"] = "mixed_bfloat16"
    _, metrics = trainer.train(tiny_data, options, **SILENT)
    assert metrics["mixed_precision"] == "mixed_bfloat16"


def test_a_slow_saved_bfloat16_model_is_refused_whatever_the_config_says(tiny_data, monkeypatch):
    options = tiny_options(2)
    options["train"].update(mixed_precision="mixed_bfloat16", mixed_precision_force=True)
    model, _ = trainer.train(tiny_data, options, **SILENT)
    fake_hardware(monkeypatch, False)
    options["train"].update(mixed_precision="none", mixed_precision_force=False, num_steps=4)
    with pytest.raises(common.UserError, match="mixed_bfloat16 would train several times slower"):
        trainer.train(tiny_data, options, model=model, **SILENT)


@pytest.mark.parametrize("cpu_bfloat16, expected", [(True, "mixed_bfloat16"), (False, "none")])
def test_auto_precision_is_resolved_once_and_recorded(tiny_npz, tmp_path, monkeypatch, capsys, cpu_bfloat16, expected):
    fake_hardware(monkeypatch, cpu_bfloat16)
    out, config = tmp_path / "run", tmp_path / "tiny.toml"
    config.write_text(configurator.dump_toml({**tiny_options(), "data": {"validation_size": 100}}))
    arguments = [str(config), "--data", str(tiny_npz), "--out", str(out)]
    assert proc_mnist.main([*arguments, "--steps", "4", "--set", "train.mixed_precision=auto"]) == 0
    assert configurator.load_config(out / "config.toml")["train"]["mixed_precision"] == expected  # Not "auto".
    assert json.loads((out / "metrics.json").read_text())["mixed_precision"] == expected
    capsys.readouterr()
    assert proc_mnist.main(["--data", str(tiny_npz), "--out", str(out), "--resume", "--steps", "8"]) == 0
    assert "resuming" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mixed_precision"] == expected and metrics["steps"] == 8
