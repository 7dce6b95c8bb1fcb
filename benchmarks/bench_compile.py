"""Training step of a 3D U-Net with each attention block, eager vs whole-model ``torch.compile``, in paired rounds
(issue 24, deliverable 1).

nnU-Net compiles its network by default on CUDA, so a block must not make the compiled step slower than the eager
one. Under ``torch.compile`` medse's fused fast paths step aside (``medse.attention.kernels.core.capturing``) and
inductor compiles the blocks' plain formulas with the rest of the network; this script measures what that gives.

For every block (``none`` included) the script builds the network twice from the same seed: one runs eagerly, the
other through ``torch.compile(model)`` (default inductor backend). A training step is forward, cross-entropy,
backward and an SGD step (momentum 0.9); the optimiser is not compiled (as in nnU-Net). Networks are
``bench_step.py``'s (``--networks``; the default is its ``realistic`` MONAI U-Net 32-64-128-256 with 2 residual units,
batch 2, at ``--size`` 32), every block at every position with its default settings.

Compilation: each compiled network is compiled once, by its first step, into a fresh temporary inductor cache (a
user's first run; an earlier run's on-disk cache would make it look cheaper), after an untimed compile of a tiny
network that pays the process's one-time costs. That first step's wall time is the compile time, reported apart; then every network, eager and compiled, takes two untimed warm-up steps.

Paired rounds: in each round every block runs its eager and its compiled step back to back (which one first
alternates between rounds), blocks in an order that rotates from round to round. Per round, a block's ratio
compiled / eager is its compiled step over its eager step of that round, and block / none under one mode is its
step over ``none``'s step of that round in the same mode. Tables give medians over the rounds with their 25-75%
ranges (:mod:`medse.utils.benchstats`), and the verdict of the target "the compiled step of a block is not slower
than its eager step" (compiled / eager <= 1.00): met when the 75th percentile meets it, missed when the 25th fails
it, not decided when the range straddles it.

Usage::

    python benchmarks/bench_compile.py                            # realistic U-Net, 32^3, 1 thread, 15 rounds
    python benchmarks/bench_compile.py --size 64 --threads 2 --rounds 9
    python benchmarks/bench_compile.py --quick                    # tiny network, 2 rounds: a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import NUM_CLASSES, Candidate, build, network_specs, select_blocks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_BLOCKS = ["cse", "sse", "scse (max)", "eca", "simam"]
TARGET = 1.0  # issue 24: compiled step / eager step of the same network


@contextlib.contextmanager
def fresh_inductor_cache() -> Iterator[None]:
    """A temporary, empty inductor cache for this block of code (removed after): compile times are cold."""
    with tempfile.TemporaryDirectory(prefix="medse-bench-inductor-") as d:
        try:
            from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
        except ImportError:  # an older or newer torch: fall back to the environment variable inductor reads
            old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = d
            try:
                yield
            finally:
                if old is None:
                    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
                else:
                    os.environ["TORCHINDUCTOR_CACHE_DIR"] = old
            return
        with temporary_cache_dir(d):
            yield


def warm_compiler(device: torch.device) -> None:
    """Compile and step a two-layer 3D network once, untimed: inductor's one-time costs in a process (imports, the
    C++ compiler's first run, its precompiled header) would otherwise count in the first block's compile time."""
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.ReLU()).to(device)
    torch.compile(net)(torch.randn(1, 1, 4, 4, 4, device=device)).sum().backward()


def _dynamo_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process, from dynamo's counters."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def build_pairs(spec: dict, blocks: list[tuple[str, str, dict]], device: torch.device,
                log: Callable[[str], None]) -> list[dict]:
    """Per block (``none`` first): its eager and compiled candidates, compiled by one step each, then warmed up;
    with the compile time and the graphs / graph breaks dynamo made for it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(spec["input"], generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (spec["input"][0], *spec["input"][2:]), generator=g).to(device)
    warm_compiler(device)
    pairs = []
    for label, reg, kw in [("none", "none", {}), *blocks]:
        eager = Candidate(label, "eager", build(spec, reg, kw, True, device), x, y, device)
        comp = Candidate(label, "compiled", build(spec, reg, kw, True, device), x, y, device, compile_model=True)
        g0, b0 = _dynamo_counts()
        t_compile = comp.step()  # dynamo traces, inductor compiles forward and backward
        g1, b1 = _dynamo_counts()
        log(f"  {label}: compiled in {t_compile:.1f} s ({g1 - g0} graph(s), {b1 - b0} graph break(s))")
        for c in (eager, comp):
            c.step()
            c.step()
        pairs.append({"label": label, "eager": eager, "compiled": comp, "compile_s": t_compile,
                      "graphs": g1 - g0, "breaks": b1 - b0, "t_eager": [], "t_compiled": []})
    return pairs


def paired_rounds(pairs: list[dict], rounds: int, log: Callable[[str], None]) -> None:
    """Append one eager and one compiled step time per block per round to ``pairs`` (see the module)."""
    n = len(pairs)
    for r in range(rounds):
        for p in pairs[r % n:] + pairs[:r % n]:
            modes = ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")
            for m in modes:
                p[f"t_{m}"].append(p[m].step())
        log(f"    round {r + 1}/{rounds}: " + ", ".join(
            f"{p['label']} {p['t_compiled'][-1] / p['t_eager'][-1]:.2f}x" for p in pairs))


def to_markdown(spec: dict, pairs: list[dict]) -> list[str]:
    from medse.utils.benchstats import spread, verdict_cell

    none = pairs[0]
    net = "AttentionPlainConvUNet" if spec.get("kind") == "nnunet" else "unet"
    lines = [f"### {spec['label']}: `{net}` {spec['kwargs']}, input {tuple(spec['input'])}, {NUM_CLASSES} classes, "
             "SGD", "",
             "| block | blocks in net | eager step ms (median) | 25-75% | compiled step ms (median) | 25-75% "
             "| compiled / eager (median of paired rounds) | 25-75% | target | rounds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for p in pairs:
        e, c = spread([t * 1e3 for t in p["t_eager"]]), spread([t * 1e3 for t in p["t_compiled"]])
        ratios = [a / b for a, b in zip(p["t_compiled"], p["t_eager"], strict=True)]
        r = spread(ratios)
        lines.append(f"| {p['label']} | {p['eager'].n_att} | {e.median:.1f} | {e.range_text('{:.1f}')} | "
                     f"{c.median:.1f} | {c.range_text('{:.1f}')} | {r.median:.3f} | {r.range_text('{:.3f}')} | "
                     f"{verdict_cell(ratios, TARGET)} | {r.n} |")
    lines += ["", "| block | block / none, eager (median of paired rounds) | 25-75% | block / none, compiled | 25-75% "
              "| compile s (first step) | graphs | graph breaks |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in pairs:
        cells = []
        for m in ("eager", "compiled"):
            if p is none:
                cells.append("1 | ")
                continue
            s = spread([a / b for a, b in zip(p[f"t_{m}"], none[f"t_{m}"], strict=True)])
            cells.append(f"{s.median:.3f} | {s.range_text('{:.3f}')}")
        lines.append(f"| {p['label']} | {cells[0]} | {cells[1]} | {p['compile_s']:.1f} | {p['graphs']} | "
                     f"{p['breaks']} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--networks", nargs="+", default=["realistic"], choices=["realistic", "demo", "nnunet"],
                    help="bench_step.py's networks (default realistic)")
    ap.add_argument("--size", type=int, default=32, help="patch edge (default 32)")
    ap.add_argument("--blocks", nargs="+", default=None,
                    help=f"labels or registry names (default {DEFAULT_BLOCKS}; none is always timed)")
    ap.add_argument("--rounds", type=int, default=None, help="paired rounds (default 15; 2 with --quick)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny networks and inputs (16^3), 2 rounds: a smoke run")
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 15)
    if rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    from medse.utils.atomic import atomic_write_text
    if str(ROOT) not in sys.path:  # tools/ (the repository's, not the package's) imports from the root
        sys.path.append(str(ROOT))
    from tools.docsync import benchmark_header

    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    blocks = select_blocks(args.blocks or DEFAULT_BLOCKS)
    specs = network_specs(args.size, args.size, args.quick)
    out = args.output or RESULTS / f"step_{device.type}_compile{'_quick' if args.quick else ''}.md"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_bench = time.perf_counter()
    sections: list[str] = []
    try:
        with fresh_inductor_cache():
            for name in args.networks:
                spec = specs[name]
                log(f"{spec['label']} {spec['input']}: none + {len(blocks)} blocks, eager and compiled, "
                    f"{rounds} paired rounds, {torch.get_num_threads()} thread(s)")
                pairs = build_pairs(spec, blocks, device, log)
                paired_rounds(pairs, rounds, log)
                sections.append("\n".join(to_markdown(spec, pairs)))
                print(sections[-1], flush=True)
    finally:
        torch.set_num_threads(threads_before)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    head = benchmark_header("bench_compile.py", argv, device=dev, load=load,
                            wall_s=time.perf_counter() - t_bench).rstrip("\n")
    text = [head, "", "# Training step: eager vs whole-model torch.compile (issue 24, deliverable 1)", "",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, torch "
            f"{torch.__version__} ({args.threads} threads), inductor backend, Python {platform.python_version()}.",
            "",
            "Each block's network is built twice from one seed: eager, and `torch.compile(model)` (fast paths step "
            "aside under compile; inductor compiles the plain formulas). Compile time: the first compiled step, "
            "into a fresh inductor cache. After two warm-up steps each, every round runs every block's eager and "
            "compiled step back to back (order alternating by round, blocks rotating). compiled / eager and "
            "block / none are per-round ratios; medians with 25-75% ranges. Target (issue 24): compiled / eager "
            "<= 1.00; met when the 75th percentile meets it, missed when the 25th fails it, else not decided.",
            "", "\n\n".join(sections)]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(text) + "\n", fsync=False)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
