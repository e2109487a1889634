"""The machine a benchmark ran on, printed first by every benchmark: CPU model, cores, vector extensions."""
import os
import platform
from pathlib import Path

import cnn

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
