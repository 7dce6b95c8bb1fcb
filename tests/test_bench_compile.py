"""Smoke test of the torch.compile step benchmark (issue 24, deliverable 1): its quick mode compiles a tiny U-Net
without attention and with cSE, times eager and compiled training steps in paired rounds and writes a results file
with docsync's provenance header; docsync knows it as the ``step_cpu_compile`` timing source."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from _benchload import load_benchmark

from tools import docsync

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_compile.py"


def _load():
    return load_benchmark("bench_compile")


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


@pytest.mark.slow
def test_bench_compile_quick_writes_paired_ratios_and_compile_times(tmp_path, capsys, monkeypatch):
    # the quick network's tensors are below the fast paths' size floor: lower it, so that eager runs the fused
    # kernels and the compiled network shows whether they step aside under torch.compile
    monkeypatch.setattr("medse.attention.kernels.core.MIN_ELEMENTS", 0)
    out = tmp_path / "compile.md"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert _load().main(["--quick", "--blocks", "cse", "--output", str(out)]) == 0
        assert torch.get_num_threads() == 2  # --threads 1 is the benchmark's, not the caller's
    finally:
        torch.set_num_threads(threads)
    text = out.read_text()
    assert text.startswith("<!-- medse:result\ncommand: python benchmarks/bench_compile.py --quick --blocks cse")
    assert "\ncommit: " in text and "\nenvironment: " in text and "\nsource_files: " in text and "\nwall: " in text
    assert "benchmarks/bench_compile.py@" in text and "medse/attention/kernels/core.py@" in text
    assert "(1 threads)" in text
    lines = text.splitlines()
    steps = [_cells(r) for r in lines if re.match(r"\| (none|cse) \| \d+ \| [\d.]+ \| [\d.]+ \.\. ", r)]
    assert [c[0] for c in steps] == ["none", "cse"] and steps[1][1] == "2"  # cSE at both positions of the 8-16 net
    for c in steps:
        eager, compiled, ratio = float(c[2]), float(c[4]), float(c[6])
        lo, hi = (float(v) for v in c[7].split(" .. "))
        assert eager > 0 and compiled > 0 and 0 < lo <= ratio <= hi
        assert re.fullmatch(r"(met|missed|not decided) \(<= 1\.00\)", c[8]) and c[9] == "2"
    rel = [_cells(r) for r in lines if re.match(r"\| (none|cse) \| [\d.]+ \| [^|]*\| [\d.]+ \| ", r)]
    assert [c[0] for c in rel] == ["none", "cse"] and rel[0][1:3] == ["1", ""]
    for m in (1, 3):  # block / none eager, compiled: median within its 25-75% range
        lo, hi = (float(v) for v in rel[1][m + 1].split(" .. "))
        assert lo <= float(rel[1][m]) <= hi
    for c in rel:
        assert float(c[5]) > 0  # compile seconds
        # one graph per network, no graph break: the fused fast paths step aside under torch.compile
        assert c[6:8] == ["1", "0"], c
    assert "compiled in" in capsys.readouterr().err


def test_step_cpu_compile_is_a_timing_source():
    src = docsync.SOURCES["step_cpu_compile"]
    assert src.dest == "benchmarks/results/step_cpu_compile.md" and src.is_timing
    assert re.search(r"benchmarks/bench_compile\.py --networks realistic --size 32 --threads 1 --rounds 15 "
                     r"--output \{work\}/out\.md", src.commands[0])


def test_bench_compile_rejects_bad_options(capsys):
    bench = _load()
    for argv in (["--rounds", "0"], ["--threads", "0"], ["--networks", "nope"]):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2
    assert "--rounds must be >= 1" in capsys.readouterr().err
