"""Smoke test of the export benchmark (issue 24, deliverable 3): its quick mode exports a tiny demo-U-Net run to
ONNX and TorchScript, times whole-case prediction with each engine in paired rounds and writes a results file with
docsync's provenance header; docsync knows it as the ``export_cpu`` timing source."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _benchload import load_benchmark

from tools import docsync

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_export.py"


def _load():
    return load_benchmark("bench_export")


def test_bench_export_quick_writes_paired_ratios(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "export.md"
    assert _load().main(["--quick", "--rounds", "2", "--threads", "1", "--output", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("<!-- medse:result\ncommand: python benchmarks/bench_export.py --quick --rounds 2")
    assert "\ncommit: " in text and "\nenvironment: " in text and "\nsource_files: " in text
    assert "benchmarks/bench_export.py@" in text and "medse/inference/runtime.py@" in text
    assert "torch" in text and "(1 threads)" in text and "(1 intra-op threads)" in text
    rows = [r for r in text.splitlines() if r.startswith("| 24^3 |") or r.startswith("| 32x32x24 |")]
    assert [r.split(" | ")[1] for r in rows] == ["eager", "onnxruntime", "torchscript"] * 2
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert cells[-1] == "2" and cells[-2] == "100.000%"  # rounds; the exported masks equal eager's
        if cells[1] != "eager":
            median = float(cells[5])
            lo, hi = (float(v) for v in cells[6].split(" .. "))
            assert 0 < lo <= median <= hi
    assert "wrote" in capsys.readouterr().err


def test_export_cpu_is_a_timing_source():
    src = docsync.SOURCES["export_cpu"]
    assert src.dest == "benchmarks/results/export_cpu.md" and src.is_timing
    assert re.search(r"benchmarks/bench_export\.py --rounds \d+ --output \{work\}/out\.md", src.commands[0])
