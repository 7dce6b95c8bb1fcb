"""Benchmark of the attention blocks against the memory floor and a convolution (issue 8).

For each block, on a 2D (8, 64, 128, 128) and a 3D (2, 32, 64, 64, 64) tensor, times forward (autograd
recording, as in training) and forward+backward of

(a) ``plain``: the block with ``fused=False``: the textbook transcription of the authors' formula;
(b) ``fused``: medse's block with its default fast path (``medse/attention/kernels/``);
(c) ``floor``: ``x * 1.0`` on a tensor that requires grad (forward reads and writes the tensor once, backward
    once more): the least any block can cost;
(d) ``conv``: a 3x3(x3) convolution of the same width (C -> C, padding 1, bias).

Rounds are interleaved (a, b, c, d, a, b, ...) in one process and the median of the rounds is reported, with
ratios to (c) and to (a), the peak extra memory of one forward+backward (CPU: peak of the allocator's total on
the profiler's memory events; CUDA: ``max_memory_allocated``) and the bytes saved for backward (saved-tensor
hooks).

Usage::

    python benchmarks/bench_blocks.py                      # CPU, both shapes, writes benchmarks/results/blocks_cpu.md
    python benchmarks/bench_blocks.py --quick               # small shapes, a smoke run
    python benchmarks/bench_blocks.py --device cuda --dtype bf16 --channels-last
    python benchmarks/bench_blocks.py --whole --busy 4   # cache blocks vs whole tensors on an oversubscribed CPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

SHAPES = {2: (8, 64, 128, 128), 3: (2, 32, 64, 64, 64)}
QUICK_SHAPES = {2: (2, 16, 32, 32), 3: (1, 16, 16, 16, 16)}

# (label, registry name, kwargs)
BLOCKS: list[tuple[str, str, dict]] = [
    ("scse (max)", "scse", {"aggregation": "max"}),
    ("scse (add)", "scse", {"aggregation": "add"}),
    ("sse", "sse", {}),
    ("cse", "cse", {}),
    ("eca", "eca", {}),
    ("simam", "simam", {}),
    ("ca", "ca", {}),
    # blocks since 2021 (issue 25): plain PyTorch only (no fast path), so only their plain row is timed: a
    # "fused" row would run the same code and its ratio to plain would be noise
    ("grn", "grn", {}),
    ("cbam", "cbam", {}),
    ("ela", "ela", {}),
    ("ema", "ema", {}),
]


class Floor(nn.Module):
    """``x * 1.0``: one read and one write of the tensor forward, one of each backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def make_input(shape: tuple[int, ...], device: torch.device, channels_last: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
    return x


def time_step(
    module: nn.Module, x: torch.Tensor, backward: bool, device: torch.device, dtype: torch.dtype
) -> float:
    """Seconds of one forward (and backward) of ``module`` on a fresh leaf copy of ``x``."""
    xi = x.detach().requires_grad_(True)
    _sync(device)
    t0 = time.perf_counter()
    with _autocast(device, dtype):
        y = module(xi)
    if backward:
        y.backward(torch.ones_like(y))
    _sync(device)
    dt = time.perf_counter() - t0
    del y, xi
    return dt


def cpu_peak_bytes(fn) -> int:
    """Most bytes the CPU allocator held at once during ``fn()`` above the level before it: the running total
    ("Total Allocated") on the torch profiler's ``[memory]`` events (summing per-operator memory would count
    nested operators twice)."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        trace = Path(d) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not mem:
        return 0
    before = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in mem) - before


def peak_memory(module: nn.Module, x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> float:
    """Peak extra bytes (MiB) allocated during one forward+backward, inputs excluded."""
    xi = x.detach().requires_grad_(True)
    g = torch.ones_like(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with _autocast(device, dtype):
            y = module(xi)
        y.backward(g)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    def run() -> None:
        with _autocast(device, dtype):
            y = module(xi)
        y.backward(g)
        del y

    return cpu_peak_bytes(run) / 2**20


def saved_bytes(module: nn.Module, x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> float:
    """MiB of distinct tensors saved for backward by one forward (input included when saved)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            key = t.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    xi = x.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with _autocast(device, dtype):
            y = module(xi)
    del y
    return sum(seen.values()) / 2**20


@contextlib.contextmanager
def fused_backend(name: str | None):
    """Run with the fused kernels' setting ``name``: "eager" / "compile" (the backend) or "whole" (eager with the
    default cache blocking off, ``SCRATCH_ELEMENTS = 0``); None: leave them as they are."""
    if name is None:
        yield
        return
    from medse.attention import kernels
    from medse.attention.kernels import core

    old, old_block = kernels.get_backend(), core.SCRATCH_ELEMENTS
    kernels.set_backend("eager" if name == "whole" else name)
    if name == "whole":
        core.SCRATCH_ELEMENTS = 0
    try:
        yield
    finally:
        kernels.set_backend(old)
        core.SCRATCH_ELEMENTS = old_block


def _spin() -> None:  # pragma: no cover - runs in a child process until terminated
    while True:
        pass


@contextlib.contextmanager
def busy_processes(n: int):
    """``n`` processes that spin on a core each while the benchmark runs: a reproducible oversubscribed CPU."""
    import multiprocessing as mp

    procs = [mp.get_context("spawn").Process(target=_spin, daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
            p.join()


def bench_shape(
    spatial_dims: int,
    shape: tuple[int, ...],
    blocks: list[tuple[str, str, dict]],
    repeats: int,
    device: torch.device,
    dtype: torch.dtype,
    channels_last: bool,
    log: Callable[[str], None],
    compile_variant: bool = False,
    whole_variant: bool = False,
) -> list[dict]:
    from medse.attention import create_attention

    c = shape[1]
    x = make_input(shape, device, channels_last)
    conv_cls = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    conv = conv_cls(c, c, 3, padding=1).to(device)
    floor = Floor()
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last if spatial_dims == 2 else torch.channels_last_3d)
    cands: dict[str, nn.Module] = {"floor": floor, "conv": conv}
    backends: dict[str, str | None] = {"floor": None, "conv": None}
    variants = ("plain", "fused") + (("whole",) if whole_variant else ()) + (("compile",) if compile_variant else ())
    compile_s: dict[str, float] = {}
    block_variants: dict[str, tuple[str, ...]] = {}
    for label, name, kw in blocks:
        torch.manual_seed(0)
        fused = create_attention(name, spatial_dims, c, **kw).to(device)
        plain = copy.deepcopy(fused)
        for m in plain.modules():
            if hasattr(m, "fused"):
                m.fused = False
        cands[f"{label}|plain"], backends[f"{label}|plain"] = plain, None
        # a block without a fast path (no ``fused`` switch) runs the same code in every variant: plain only
        block_variants[label] = variants if any(hasattr(m, "fused") for m in fused.modules()) else ("plain",)
        if block_variants[label] == ("plain",):
            continue
        cands[f"{label}|fused"], backends[f"{label}|fused"] = fused, "eager"
        if whole_variant:
            cands[f"{label}|whole"], backends[f"{label}|whole"] = fused, "whole"
        if compile_variant:
            cands[f"{label}|compile"], backends[f"{label}|compile"] = fused, "compile"
    times: dict[tuple[str, str], list[float]] = {(k, p): [] for k in cands for p in ("fwd", "fwdbwd")}
    for k, m in cands.items():  # warm-up (and compilation, timed: first call of each compiled kernel)
        t0 = time.perf_counter()
        with fused_backend(backends[k]):
            time_step(m, x, True, device, dtype)
        if backends[k] == "compile":
            compile_s[k] = time.perf_counter() - t0
    for r in range(repeats):
        for k, m in cands.items():
            with fused_backend(backends[k]):
                times[(k, "fwd")].append(time_step(m, x, False, device, dtype))
                times[(k, "fwdbwd")].append(time_step(m, x, True, device, dtype))
        log(f"  {spatial_dims}D round {r + 1}/{repeats} done")
    med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    mem, sav = {}, {}
    for k, m in cands.items():
        with fused_backend(backends[k]):
            mem[k] = peak_memory(m, x, device, dtype)
            sav[k] = saved_bytes(m, x, device, dtype)
    rows = []
    for k in ("floor", "conv"):
        rows.append({"block": k, "variant": "", "fwd": med[(k, "fwd")], "fwdbwd": med[(k, "fwdbwd")],
                     "peak": mem[k], "saved": sav[k]})
    for label, _, _ in blocks:
        for variant in block_variants[label]:
            k = f"{label}|{variant}"
            rows.append({"block": label, "variant": variant, "fwd": med[(k, "fwd")],
                         "fwdbwd": med[(k, "fwdbwd")], "peak": mem[k], "saved": sav[k]})
            if k in compile_s:
                rows[-1]["first_call_s"] = compile_s[k]
    fl, cv = med[("floor", "fwdbwd")], med[("conv", "fwdbwd")]
    fl_f = med[("floor", "fwd")]

    def per_round(num: str, den: str) -> list[float]:  # paired within each interleaved round
        return [a / b for a, b in zip(times[(num, "fwdbwd")], times[(den, "fwdbwd")], strict=True)]

    for row in rows:
        k = f"{row['block']}|{row['variant']}" if row["variant"] else row["block"]
        row["x_floor"] = row["fwdbwd"] / fl
        row["x_floor_fwd"] = row["fwd"] / fl_f
        row["x_conv"] = row["fwdbwd"] / cv
        if row["variant"]:  # the medians of the per-round ratios, so each sits inside its 25-75% range
            row["floor_rounds"] = per_round(k, "floor")
            row["x_floor"] = statistics.median(row["floor_rounds"])
            row["speedup_rounds"] = per_round(f"{row['block']}|plain", k)
            row["speedup"] = statistics.median(row["speedup_rounds"])
    return rows


TARGET_FLOOR = 2.5  # issue 14, target 1: a fast block's fwd+bwd at most 2.5x the floor ...
TARGET_SPEEDUP = 1.0  # ... and never slower than its plain formula


def to_markdown(title: str, shape: tuple[int, ...], rows: list[dict], repeats: int) -> str:
    """The table of one shape. Ratios are per-round ratios (each round times every candidate once), reported as
    median and 25-75% range; the verdicts (``medse.utils.benchstats.verdict``) need the whole range on one side
    of the target."""
    from medse.utils.benchstats import spread, verdict_cell

    lines = [
        f"### {title}, input {tuple(shape)}",
        "",
        "| block | variant | fwd ms | fwd+bwd ms | fwd / floor fwd | fwd+bwd / floor | 25-75% | "
        f"<= {TARGET_FLOOR}x floor | fwd+bwd / conv | speed-up vs plain | 25-75% | not slower than plain | "
        "peak MiB | saved MiB |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        fl_rng = fl_v = sp_rng = sp_v = sp = ""
        if "floor_rounds" in r:
            fs = spread(r["floor_rounds"])
            fl_rng = fs.range_text()
            fl_v = "" if r["variant"] == "plain" else verdict_cell(fs, TARGET_FLOOR)
        if "speedup" in r:
            sp = f"{r['speedup']:.2f}x"
            if r["variant"] != "plain":
                ss = spread(r["speedup_rounds"])
                sp_rng = ss.range_text("{:.2f}x")
                sp_v = verdict_cell(ss, TARGET_SPEEDUP, higher_is_better=True, fmt="{:.2f}x")
        if "first_call_s" in r:
            sp += f" (first call {r['first_call_s']:.0f} s)"
        lines.append(
            f"| {r['block']} | {r['variant']} | {r['fwd']:.1f} | {r['fwdbwd']:.1f} | {r['x_floor_fwd']:.2f} | "
            f"{r['x_floor']:.2f} | {fl_rng} | {fl_v} | {r['x_conv']:.2f} | {sp} | {sp_rng} | {sp_v} | "
            f"{r['peak']:.0f} | {r['saved']:.0f} |"
        )
    lines.append("")
    lines.append(f"Median of {repeats} interleaved rounds in one process; ratios and their 25-75% ranges are over the "
                 "per-round ratios. A target is met when the 75th percentile meets it, missed when the 25th "
                 "percentile fails it, not decided when the range straddles it.")
    return "\n".join(lines)


def environment(device: torch.device) -> str:
    """The device part of the environment line (the GPU's name, or "CPU"; torch's threads are in it already)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    ap.add_argument("--blocks", nargs="+", default=None, help="labels or registry names to run (default: all)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    ap.add_argument("--compile", action="store_true",
                    help="also time the fused blocks with the torch.compile backend (variant 'compile')")
    ap.add_argument("--whole", action="store_true",
                    help="also time the fused blocks without their default cache blocking (variant 'whole': "
                         "MEDSE_FUSED_BLOCK=0)")
    ap.add_argument("--busy", type=int, default=0, metavar="N",
                    help="run N spinning processes during the benchmark (an oversubscribed CPU)")
    ap.add_argument("--output", type=Path, default=None, help="Markdown file (default benchmarks/results/blocks_<dev>.md)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for this process (default: torch's choice); on a loaded machine "
                         "1 thread avoids OpenMP barrier waits")
    ap.add_argument("--note", default="", help="free text added under the title (e.g. machine load)")
    ap.add_argument("--shapes", nargs="+", default=None, metavar="BxCxS...",
                    help="input shapes instead of the defaults, e.g. 1x16x32x32x32 8x64x128x128 (dims from length)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from medse.utils.atomic import atomic_path

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    blocks = BLOCKS
    if args.blocks:
        want = set(args.blocks)
        blocks = [b for b in BLOCKS if b[0] in want or b[1] in want]
        if not blocks:
            raise SystemExit(f"error: --blocks {args.blocks}: none of {[b[0] for b in BLOCKS]}")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    runs = [(sd, shapes[sd]) for sd in args.dims]
    if args.shapes:
        try:
            parsed = [tuple(int(v) for v in sh.lower().split("x")) for sh in args.shapes]
        except ValueError:
            raise SystemExit(f"error: --shapes {args.shapes}: expected e.g. 1x16x32x32x32") from None
        if any(len(sh) not in (4, 5) for sh in parsed):
            raise SystemExit(f"error: --shapes {args.shapes}: 4 (2D) or 5 (3D) sizes each")
        runs = [(len(sh) - 2, sh) for sh in parsed]
    tag = f"{device.type}" + ("" if args.dtype == "fp32" else f"_{args.dtype}") + ("_cl" if args.channels_last else "")
    out = args.output or RESULTS / f"blocks_{tag}{'_quick' if args.quick else ''}.md"

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    sections = []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    busy = f", {args.busy} spinning processes (--busy) during the run" if args.busy else ""
    with busy_processes(args.busy):
        for sd, shape in runs:
            log(f"{sd}D {shape}: {len(blocks)} blocks x (plain, fused) + floor + conv, {args.repeats} rounds")
            rows = bench_shape(sd, shape, blocks, args.repeats, device, dtype, args.channels_last, log,
                               compile_variant=args.compile, whole_variant=args.whole)
            sections.append(to_markdown(f"{sd}D, {args.dtype}{', channels_last' if args.channels_last else ''}",
                                        shape, rows, args.repeats))
            print(sections[-1], flush=True)
    if str(ROOT) not in sys.path:  # tools/ (the repository's, not the package's) imports from the root
        sys.path.append(str(ROOT))
    from tools.docsync import benchmark_header

    provenance = benchmark_header("bench_blocks.py", argv if argv is not None else sys.argv[1:],
                                  device=environment(device) + busy, load=load)
    head = [
        provenance.rstrip("\n"),
        "",
        f"# Attention blocks vs the memory floor ({tag})",
        "",
        f"MEDSE_FUSED_CHUNK={os.environ.get('MEDSE_FUSED_CHUNK', 'default')}, "
        f"MEDSE_FUSED_BLOCK={os.environ.get('MEDSE_FUSED_BLOCK', 'default')}.",
        "",
        "floor = `x * 1.0` on a tensor requiring grad; conv = 3x3(x3) convolution C -> C. Targets (issue 14): a "
        f"fast block's fwd+bwd at most {TARGET_FLOOR}x the floor, never slower than plain. "
        "peak = extra memory allocated during one forward+backward; saved = bytes saved for backward "
        "(the input included). Variants: plain = `fused=False` (textbook formula); fused = medse's default fast "
        "path (hand-derived backward, eager kernels, cache blocks where the kernel has them); whole = the same without "
        "the cache blocks (`MEDSE_FUSED_BLOCK=0`); compile = the same fast path with "
        "`medse.attention.kernels.set_backend('compile')` (first call = compilation, or loading PyTorch's disk "
        "cache).",
    ]
    if device.type == "cpu":
        head.append("Measured on a shared machine (its load average at the start, and any `--busy` processes, are "
                    "in the header): absolute times are noisy, per-round ratios within one run are what to read.")
    if args.note:
        head += ["", args.note]
    text = "\n".join(head) + "\n\n" + "\n\n".join(sections) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Path(tmp).write_text(text)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
