"""Beyond one CPU process: tf.distribute strategies, the chief, XLA, backwork workers.

proc_mnist.py's [train] keys choose them:

    distribute = "none"          one device (the CPU, or the first GPU TensorFlow sees)
               | "mirrored"      tf.distribute.MirroredStrategy over every local GPU (without
                                 a GPU, every logical CPU device: one, unless a test splits it)
               | "multi_worker"  tf.distribute.MultiWorkerMirroredStrategy, its cluster and
                                 this process's place in it from the TF_CONFIG environment variable
    xla = "auto" | "on" | "off"  XLA for the forward and backward pass ("auto": on where a GPU is,
                                 off on a CPU, where oneDNN's convolutions are ~10x faster)

(train.mixed_precision, the policy the network computes in, is cnn.py's; the choices of
every key are configurator.VALUE_RULES'.)

The global batch (train.batch_size) is split evenly across the replicas, and each
replica's loss is its share of the sum over the global batch divided by the global batch
size, so the summed gradients are those of the global batch's mean loss: the same
arithmetic as one device, up to float rounding. Only the chief (the one process of a
mirrored run; in a cluster, the "chief" task, or worker 0 where there is none) writes
files; every worker computes the same weights.
"""
import contextlib
import json
import os
import re

import cnn
import configurator
from common import UserError


def read_tf_config(text, fix="fix TF_CONFIG, or unset it"):
    """(cluster dict, task type, task index) from TF_CONFIG's JSON; one line naming fix if it is not one."""
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        task_type, index = task["type"], task["index"]
        tasks = cluster.get(task_type) if isinstance(task_type, str) else None
    except (ValueError, KeyError, TypeError, AttributeError):  # Not JSON, or not dicts where dicts belong.
        raise UserError('TF_CONFIG is not JSON of the form {"cluster": {"chief": [...], "worker": [...]}, '
                        f'"task": {{"type": ..., "index": ...}}}}; {fix}') from None
    if not isinstance(tasks, list) or type(index) is not int or not 0 <= index < len(tasks):
        raise UserError(f"TF_CONFIG's task {json.dumps(task)} is not one of the tasks of its cluster; {fix}")
    return cluster, task_type, index


def cluster_from_environment():
    """TF_CONFIG's (cluster, task type, task index), or None where it is unset."""
    text = os.environ.get("TF_CONFIG", "").strip()
    return read_tf_config(text) if text else None


def worker_position(cluster, task_type, index):
    """(I, N) of a chief or worker task among the chief and worker tasks, the chief first."""
    chiefs, workers = cluster.get("chief", []), cluster.get("worker", [])
    return (index if task_type == "chief" else len(chiefs) + index), len(chiefs) + len(workers)


def make_strategy(name):
    """The tf.distribute strategy [train] distribute names; None for "none" (the plain loop).

    Must run before TensorFlow executes anything else in a cluster (collective ops are set
    up when the strategy is made), so proc_mnist.main makes it first.
    """
    import tensorflow as tf

    configurator.check_section("train", {"distribute": name}, source="distribute")
    if name == "none":
        return None
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [device.name for device in gpus or tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if cluster_from_environment() is None:
        raise UserError("train.distribute = multi_worker needs the TF_CONFIG environment variable (the cluster "
                        "and this worker's index); set it on every worker, or use distribute = mirrored")
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief(strategy):
    """Whether this process writes the run's files: always, except on a cluster's non-chief workers."""
    resolver = getattr(strategy, "cluster_resolver", None) if strategy is not None else None
    cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
    if not cluster:
        return True
    # The first of the chief and worker tasks: the chief task, or worker 0 where there is none.
    return (resolver.task_type in ("chief", "worker")
            and worker_position(cluster, resolver.task_type, resolver.task_id)[0] == 0)


def is_multi_worker(strategy):
    return strategy is not None and strategy.extended._in_multi_worker_mode()


def scope(strategy):
    """strategy's scope (variables made in it are mirrored), or a block that changes nothing."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def replica_count(strategy):
    return 1 if strategy is None else strategy.num_replicas_in_sync


def check_batch_split(batch_size, strategy):
    """Refuse a global batch that the strategy's replicas cannot share evenly, naming a size that works."""
    replicas = replica_count(strategy)
    if batch_size % replicas:
        raise UserError(f"train.batch_size {batch_size} does not split evenly over {replicas} replicas; "
                        f"use a multiple of {replicas}")


def use_xla(setting):
    """The [train] xla setting as a bool: "auto" is on exactly where TensorFlow sees a GPU."""
    return setting == "on" or (setting == "auto" and cnn.gpu_visible())


class replica_random_stream:
    """Within the block (in a replica), the model's random layers draw from this replica's own stream.

    Keras' dropout draws from a seed state that every replica holds a copy of and advances
    alike, so without this each replica would drop the same units at the same rows of its
    share of the batch. Each replica's copy (updated per replica: the state's aggregation
    is "none") gets its replica id added to its seed for the block, and taken off again
    after it, so the copies stay equal; replica 0 draws exactly what one device would.
    """

    def __init__(self, model, replica_id):
        self.states = [layer.seed_generator.state for layer in model.layers if hasattr(layer, "seed_generator")]
        self.replica_id = replica_id

    def _shift(self, sign):
        import tensorflow as tf

        for state in self.states:
            offset = tf.cast(tf.stack([self.replica_id * 7919, 0]), state.dtype)  # A prime: far-apart seeds.
            state.assign(state.value + offset if sign > 0 else state.value - offset)

    def __enter__(self):
        self._shift(+1)

    def __exit__(self, *exception):
        self._shift(-1)
        return False


def make_agreement(strategy):
    """agree(steps, stop) -> (steps, stop), the same on every worker of a cluster.

    Each worker sizes its compiled calls by its own clock and notes its own Ctrl-C, but
    the collective ops of a step must be matched by every worker: so every call's length
    is the chief's and any worker's stop stops them all, at the same step. One tiny
    all-reduce per call (about a second of training). Outside a cluster: unchanged.
    """
    import tensorflow as tf

    if not is_multi_worker(strategy):
        return lambda steps, stop: (steps, stop)
    chief = 1.0 if is_chief(strategy) else 0.0

    @tf.function
    def reduce(values):
        per_replica = strategy.run(lambda: tf.identity(values))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def agree(steps, stop):
        # Each worker has one replica per local device; the local replicas add the same values.
        local = len(strategy.extended.worker_devices)
        total_steps, stops = reduce(tf.constant([chief * steps / local, float(stop) / local])).numpy()
        return max(1, int(round(total_steps))), stops > 0.5

    return agree


# ------------------------------------------------- backwork labels shared by workers

WORKER_TEXT = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")
TF_CONFIG_FIX = "fix TF_CONFIG, or unset it and give --worker I/N"


def parse_worker(text):
    """'I/N' (worker I of N, I counted from 0) -> (I, N)."""
    match = WORKER_TEXT.fullmatch(text)
    if match is None:
        raise UserError(f"--worker {text!r} must look like 0/2: this worker's number from 0, a slash, "
                        "the number of workers")
    index, count = int(match[1]), int(match[2])
    if not 0 <= index < count:
        raise UserError(f"--worker {text!r}: the workers of N are numbered 0 to N - 1, with N at least 1; "
                        "e.g. 0/2 on one machine and 1/2 on another")
    return index, count


def worker_from_tf_config(text):
    """(I, N) from TensorFlow's TF_CONFIG JSON: N counts the chief and worker tasks, the chief first.

    The ps and evaluator tasks of a TensorFlow cluster backwork no labels: they are refused.
    """
    cluster, task_type, index = read_tf_config(text, TF_CONFIG_FIX)
    if task_type not in ("chief", "worker"):
        raise UserError(f"TF_CONFIG gives this process the task type {task_type!r}, which backworks no "
                        "labels; start cnn_backwork.py only on the chief and worker tasks, or give --worker I/N")
    return worker_position(cluster, task_type, index)


def resolve_worker(text, environ=os.environ, note=print):
    """This process's (I, N): from --worker I/N (text), else from TF_CONFIG, else (0, 1), every label."""
    tf_config = environ.get("TF_CONFIG", "").strip()
    if text is not None:
        worker = parse_worker(text)
        if tf_config:
            note(f"note: --worker {text} wins over TF_CONFIG, which is ignored")
        return worker
    return worker_from_tf_config(tf_config) if tf_config else (0, 1)


def worker_share(labels, index, count):
    """Worker index's labels: every count-th of the sorted labels, from the index-th.

    Round robin: the shares differ in size by one at most, and every worker computes the
    same split from its own I/N, with no talk between them.
    """
    return sorted(labels)[index::count]
