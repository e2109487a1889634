"""bench/bench_train.py names the CPU, and times mixed_bfloat16 only where it is fast (or when asked)."""
import importlib.util
from pathlib import Path

import pytest

import cnn
import configurator
from conftest import tiny_options

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_train.py"
SPEC = importlib.util.spec_from_file_location("bench_train", BENCH)
bench_train = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench_train)

CPUINFO = ("processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse4_2 avx avx2 fma bmi2\n\n"
           "processor\t: 1\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse4_2 avx avx2 fma bmi2\n")


def test_the_cpu_line_names_the_model_and_its_vector_extensions():
    line = bench_train.cpu_line(CPUINFO)
    assert line.startswith("CPU: AMD EPYC 7B12, ") and line.endswith("vector extensions: sse4_2 avx avx2 fma")
    sapphire = CPUINFO.replace("fma bmi2", "fma avx512f avx512_bf16 amx_tile amx_bf16")
    assert bench_train.cpu_line(sapphire).endswith("avx2 fma avx512f avx512_bf16 amx_tile amx_bf16")
    assert "vector extensions: unknown (no CPU flags in /proc/cpuinfo)" in bench_train.cpu_line("")


def test_bfloat16_rows_get_the_full_budget_only_where_they_are_fast():
    assert bench_train.bfloat16_budget(200, 50, 2, force=False, slowness=None) == (200, 50, 2)
    assert bench_train.bfloat16_budget(200, 50, 2, force=False, slowness="no GPU ...") is None
    assert bench_train.bfloat16_budget(200, 50, 2, force=True, slowness="no GPU ...") == (20, 20, 1)


@pytest.mark.parametrize("cpu_bfloat16, force, timed", [(False, False, False), (False, True, True),
                                                        (True, False, True)])
def test_the_benchmark_skips_slow_bfloat16_with_a_note(tmp_path, monkeypatch, capsys, cpu_bfloat16, force, timed):
    monkeypatch.setattr(cnn, "cpu_has_bfloat16", lambda cpuinfo_text=None: cpu_bfloat16)
    monkeypatch.setattr(cnn, "gpu_visible", lambda: False)
    monkeypatch.setattr(bench_train, "numpy_matmul_rate", lambda: 1e9)
    config = tmp_path / "tiny.toml"
    config.write_text(configurator.dump_toml({"model": tiny_options()["model"]}))
    bench_train.main(["--config", str(config), "--steps", "2", "--block", "1", "--repeats", "1", "--batch-sizes", "4",
                      *(["--bfloat16"] if force else [])])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("CPU: ") and "vector extensions: " in lines[0]
    notes = [line for line in lines if line.startswith("note: mixed_bfloat16")]
    rows = [line for line in lines if "ours, mixed_bfloat16:" in line]
    assert len(rows) == timed and len(notes) == (not cpu_bfloat16)
    if not cpu_bfloat16:
        assert "the CPU has no bfloat16 arithmetic" in notes[0]
        assert ("rows skipped" in notes[0] and "--bfloat16 times it anyway" in notes[0]) != force
