"""The machine a benchmark ran on, printed first by every benchmark (CPU model, cores, vector extensions),
the two yardsticks the benchmarks share (a model's FLOPs and NumPy's matmul rate on this CPU), and the
model a --config/--model benchmark measures."""
import os
import platform
import time
from pathlib import Path

import numpy as np

import cnn
import configurator

# The vector extensions worth naming in a speed measurement, as /proc/cpuinfo spells them.
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                "amx_tile", "amx_bf16", "amx_int8")


def cpu_line(cpuinfo_text=None):
    """'CPU: <model>, <n> cores; vector extensions: avx2 fma ...' from /proc/cpuinfo (read by default)."""
    if cpuinfo_text is None:
        try:
            cpuinfo_text = Path("/proc/cpuinfo").read_text()
        except OSError:  # Not Linux.
            cpuinfo_text = ""
    fields = {}
    for line in cpuinfo_text.splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())  # The first core's.
    model = fields.get("model name") or platform.processor() or "unknown model"
    flags = fields.get("flags", "").split()
    extensions = " ".join(flag for flag in VECTOR_FLAGS if flag in flags) or "unknown (no CPU flags in /proc/cpuinfo)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # oneDNN's kernels (the convolutions) use only what $ONEDNN_MAX_CPU_ISA allows, whatever the flags say.
    cap = cnn.onednn_isa_cap()
    capped = f"; oneDNN capped at ONEDNN_MAX_CPU_ISA={cap}" if cap else ""
    return f"CPU: {model}, {cores} cores for this process; vector extensions: {extensions}{capped}"


def forward_flops_per_example(model):
    """Floating-point operations of each Conv2D and Dense layer for one example: {name: flops}."""
    flops = {}
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "Conv2D":
            kernel_height, kernel_width, channels_in, channels_out = layer.kernel.shape
            _, height, width, _ = layer.output.shape
            flops[layer.name] = 2 * height * width * kernel_height * kernel_width * channels_in * channels_out
        elif kind == "Dense":
            flops[layer.name] = 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    return flops


def numpy_matmul_rate(size=1024, repeats=10):
    """FLOP/s of a float32 NumPy matrix multiply of size x size matrices: the rate a CPU reaches on dense work."""
    rng = np.random.default_rng(0)
    left, right = (rng.random((size, size), dtype=np.float32) for _ in range(2))
    left @ right
    start = time.perf_counter()
    for _ in range(repeats):
        left @ right
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def add_model_arguments(parser):
    """--config and --model, the choice load_model reads."""
    parser.add_argument("--config", help="config whose [model] to build with random weights (default: the defaults)")
    parser.add_argument("--model", help="a trained .keras model to measure instead")


def load_model(arguments):
    """The model to time: --model's, or the config's topology with random weights; and its description."""
    if arguments.model:
        return cnn.load_trained_model(arguments.model), f"{arguments.model} (trained)"
    import keras

    keras.utils.set_random_seed(0)
    model = cnn.build_model(configurator.load_config(arguments.config)["model"])
    return model, f"{arguments.config or 'configs/default.toml'} (random weights)"
