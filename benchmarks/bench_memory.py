"""Training peak memory of a U-Net with each attention block vs none (issue 14, target 3).

The networks are those of ``bench_step.py`` (``realistic``: MONAI UNet 32-64-128-256, 2 residual units,
batch 2, 64^3 by default, ``--size`` to change; ``demo``: 16-32-64-128 at 32^3). For every block (default
settings, at every position) one warm-up step creates the optimiser state, the gradients are released
(``zero_grad(set_to_none=True)``), and one training step (forward, cross-entropy, backward, SGD step) is
measured:

- CPU: ``torch.profiler`` with ``profile_memory=True``; the peak of the CPU allocator's running total
  ("Total Allocated" on the ``[memory]`` events) during the step above its level before, i.e. the most tensor
  memory live at once on top of what was live before (parameters, optimiser state, the input). Allocator
  overhead and non-tensor memory are not counted.
- CUDA: ``torch.cuda.max_memory_allocated`` during the step minus the memory allocated before it.

The table gives the peak in MiB and its change over ``none`` in percent (target: at most +5%).

Usage::

    python benchmarks/bench_memory.py                         # realistic + demo, CPU
    python benchmarks/bench_memory.py --networks realistic --size 48
    python benchmarks/bench_memory.py --device cuda
    python benchmarks/bench_memory.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import (  # noqa: E402
    NUM_CLASSES,
    RESULTS,
    Candidate,
    build,
    cpu_peak_bytes,
    header,
    network_specs,
    select_blocks,
)

from medse.utils.benchstats import verdict_cell  # noqa: E402

MEMORY_TARGET = 5.0  # issue 14, target 3: training peak memory at most +5% over none


def step_peak_mib(c: Candidate) -> float:
    """Peak extra tensor memory (MiB) of one training step of ``c`` (after a warm-up step)."""
    c.step()
    c.opt.zero_grad(set_to_none=True)

    def run() -> None:
        loss = nn.functional.cross_entropy(c.forward(c.x), c.y)
        loss.backward()
        c.opt.step()
        del loss

    if c.device.type == "cuda":
        torch.cuda.synchronize(c.device)
        base = torch.cuda.memory_allocated(c.device)
        torch.cuda.reset_peak_memory_stats(c.device)
        run()
        torch.cuda.synchronize(c.device)
        return (torch.cuda.max_memory_allocated(c.device) - base) / 2**20
    return cpu_peak_bytes(run) / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--networks", nargs="+", default=["realistic", "demo"], choices=["realistic", "demo"])
    ap.add_argument("--size", type=int, default=64, help="patch edge of the realistic network (default 64)")
    ap.add_argument("--demo-size", type=int, default=32)
    ap.add_argument("--blocks", nargs="+", default=None, help="labels or registry names (default: as bench_step)")
    ap.add_argument("--plain", action="store_true", help="also the plain blocks (fused=False)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    from medse.utils.atomic import atomic_path

    device = torch.device(args.device)
    blocks = select_blocks(args.blocks)
    specs = network_specs(args.size, args.demo_size, args.quick)
    out = args.output or RESULTS / f"memory_{device.type}{'_quick' if args.quick else ''}.md"
    method = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
              "torch.profiler, peak of the CPU allocator's running total during the step")
    head = header("Training peak memory with each attention block (issue 14, target 3)", "bench_memory.py", argv,
                  device, load=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    head += ["", f"Peak extra memory of one training step (forward, loss, backward, SGD step) on top of what was "
             f"live before it; method: {method}. Target: at most +{MEMORY_TARGET:.0f}% over none (one measurement: "
             "the allocator's peak does not vary between rounds)."]
    sections = []
    for name in args.networks:
        spec = specs[name]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(spec["input"], generator=g).to(device)
        y = torch.randint(0, NUM_CLASSES, (spec["input"][0], *spec["input"][2:]), generator=g).to(device)
        variants = [("fused (default)", True)] + ([("plain", False)] if args.plain else [])
        rows = []
        base = step_peak_mib(Candidate("none", "", build(spec, "none", {}, True, device), x, y, device))
        rows.append(("none", "", 0, base))
        print(f"{spec['label']}: none {base:.0f} MiB", file=sys.stderr, flush=True)
        for label, reg, kw in blocks:
            for vname, fused in variants:
                c = Candidate(label, vname, build(spec, reg, kw, fused, device), x, y, device)
                rows.append((label, vname, c.n_att, step_peak_mib(c)))
                print(f"  {label} {vname}: {rows[-1][3]:.0f} MiB", file=sys.stderr, flush=True)
                del c
        lines = [f"### {spec['label']}: `unet` {spec['kwargs']}, input {tuple(spec['input'])}, {NUM_CLASSES} classes",
                 "", "| block | variant | blocks in net | peak MiB | vs none | target |", "|---|---|---:|---:|---:|---|"]
        for label, vname, n_att, mib in rows:
            over = 100 * (mib / base - 1)
            vs = "" if label == "none" else f"{over:+.1f}%"
            cell = "" if label == "none" or vname == "plain" else verdict_cell([over], MEMORY_TARGET, fmt="{:+.1f}%")
            lines.append(f"| {label} | {vname} | {n_att} | {mib:.0f} | {vs} | {cell} |")
        sections.append("\n".join(lines))
        print(sections[-1], flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            Path(tmp).write_text("\n".join(head) + "\n\n" + "\n\n".join(sections) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
