"""What attention costs inside a network: training-step and inference time with each block vs ``none`` (issue 8).

Networks: the demo's 3D U-Net (``configs/demo.yaml``: MONAI UNet, channels 16-32-64-128, batch 2, 32^3 patches)
and SD-Net 2D (``configs/sdnet_2d.yaml`` architecture; batch 4 of 128^2 slices by default, ``--sdnet-size`` to
change). For each block the network is built with attention at every position (encoder, bottleneck, decoder),
once with the plain blocks (``fused=False``) and once with medse's fast path (``fused=True``), optionally also
with the ``torch.compile`` backend of the fast path (``--compile``).

Training step = forward, cross-entropy loss, backward, Adam step. Inference = forward in ``torch.inference_mode``
with the model in eval mode. Rounds are interleaved over all models in one process; medians are reported with the
overhead over ``none`` in percent.

Usage::

    python benchmarks/bench_networks.py                 # writes benchmarks/results/networks_cpu.md
    python benchmarks/bench_networks.py --quick         # tiny inputs (smoke run)
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_blocks import fused_backend  # noqa: E402

BLOCKS: list[tuple[str, str, dict]] = [
    ("cse", "cse", {}),
    ("sse", "sse", {}),
    ("scse (max)", "scse", {"aggregation": "max"}),
    ("scse (add)", "scse", {"aggregation": "add"}),
    ("eca", "eca", {}),
    ("simam", "simam", {}),
    ("ca", "ca", {}),
]

NUM_CLASSES = 4


def networks(quick: bool, sdnet_size: tuple[int, int]) -> list[dict]:
    """The benchmarked networks: name, builder kwargs, input shape."""
    unet_in = (1, 1, 16, 16, 16) if quick else (2, 1, 32, 32, 32)
    sd_b, sd_s = sdnet_size
    sd_in = (1, 1, 32, 32) if quick else (sd_b, 1, sd_s, sd_s)
    return [
        {"label": "U-Net 3D (demo)", "name": "unet", "dims": 3, "kwargs": {"channels": [16, 32, 64, 128]},
         "input": unet_in},
        {"label": "SD-Net 2D", "name": "sdnet", "dims": 2, "kwargs": {}, "input": sd_in},
    ]


def build(net: dict, attention: str, kw: dict, fused: bool) -> nn.Module:
    from medse.networks import create_model

    torch.manual_seed(0)
    model = create_model(net["name"], net["dims"], 1, NUM_CLASSES, attention=attention,
                         attention_kwargs=dict(kw), **net["kwargs"])
    for m in model.modules():
        if hasattr(m, "fused"):
            m.fused = fused
    return model


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    model.train()
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def infer_step(model: nn.Module, x: torch.Tensor) -> float:
    model.eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(x)
    return time.perf_counter() - t0


def bench_network(net: dict, blocks: list[tuple[str, str, dict]], repeats: int, compile_variant: bool,
                  log: Callable[[str], None]) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(net["input"], generator=g)
    y = torch.randint(0, NUM_CLASSES, (net["input"][0], *net["input"][2:]), generator=g)
    cands: list[tuple[str, str, nn.Module, str | None]] = [("none", "", build(net, "none", {}, True), None)]
    for label, name, kw in blocks:
        cands.append((label, "plain", build(net, name, kw, False), None))
        cands.append((label, "fused", build(net, name, kw, True), "eager"))
        if compile_variant:
            cands.append((label, "compile", build(net, name, kw, True), "compile"))
    opts = [torch.optim.Adam(m.parameters(), lr=1e-4) for _, _, m, _ in cands]
    tr: list[list[float]] = [[] for _ in cands]
    inf: list[list[float]] = [[] for _ in cands]
    for (_, _, m, be), opt in zip(cands, opts, strict=True):  # warm-up (and compilation)
        with fused_backend(be):
            train_step(m, opt, x, y)
            infer_step(m, x)
    for r in range(repeats):
        for i, ((_, _, m, be), opt) in enumerate(zip(cands, opts, strict=True)):
            with fused_backend(be):
                tr[i].append(train_step(m, opt, x, y))
                inf[i].append(infer_step(m, x))
        log(f"  {net['label']}: round {r + 1}/{repeats}")
    t_none, i_none = statistics.median(tr[0]) * 1e3, statistics.median(inf[0]) * 1e3
    rows = []
    for i, (label, variant, m, _) in enumerate(cands):
        t, it = statistics.median(tr[i]) * 1e3, statistics.median(inf[i]) * 1e3
        n_att = sum(1 for mod in m.modules() if getattr(mod, "_medse_attention", False))
        rows.append({"block": label, "variant": variant, "train_ms": t, "infer_ms": it,
                     "train_over": 100 * (t / t_none - 1), "infer_over": 100 * (it / i_none - 1),
                     "n_att": n_att, "params": sum(p.numel() for p in m.parameters())})
    return rows


def to_markdown(net: dict, rows: list[dict], repeats: int) -> str:
    lines = [
        f"### {net['label']}: `{net['name']}` {net['kwargs'] or ''}, input {tuple(net['input'])}, "
        f"{NUM_CLASSES} classes",
        "",
        "| block | variant | blocks in net | params | train step ms | overhead vs none | inference ms | "
        "overhead vs none |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['block']} | {r['variant']} | {r['n_att']} | {r['params']:,} | {r['train_ms']:.0f} | "
            f"{r['train_over']:+.1f}% | {r['infer_ms']:.0f} | {r['infer_over']:+.1f}% |"
        )
    lines += ["", f"Median of {repeats} interleaved rounds in one process."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--blocks", nargs="+", default=None, help="labels or registry names (default: all)")
    ap.add_argument("--networks", nargs="+", default=None, choices=["unet", "sdnet"])
    ap.add_argument("--sdnet-size", type=int, nargs=2, default=(4, 128), metavar=("BATCH", "SIZE"))
    ap.add_argument("--compile", action="store_true", help="also time the fast path with the compile backend")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--output", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for this process (default: torch's choice); on a loaded machine "
                         "1 thread avoids OpenMP barrier waits")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from medse.utils.atomic import atomic_path

    blocks = BLOCKS
    if args.blocks:
        want = set(args.blocks)
        blocks = [b for b in BLOCKS if b[0] in want or b[1] in want]
        if not blocks:
            raise SystemExit(f"error: --blocks {args.blocks}: none of {[b[0] for b in BLOCKS]}")
    nets = [n for n in networks(args.quick, tuple(args.sdnet_size)) if not args.networks or n["name"] in args.networks]
    out = args.output or RESULTS / f"networks_cpu{'_quick' if args.quick else ''}.md"

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if str(ROOT) not in sys.path:  # tools/ (the repository's, not the package's) imports from the root
        sys.path.append(str(ROOT))
    from tools.docsync import benchmark_header

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    head = [
        "# Attention blocks inside networks: overhead over `none` (CPU)",
        "",
        "Measured on the machine in the header (its load average at the start there): absolute times are noisy, "
        "compare rows within one table.",
        "",
        "Attention at every position the network offers (encoder, bottleneck, decoder). plain = `fused=False`; "
        "fused = medse's default fast path; compile = the fast path with the torch.compile backend.",
    ]
    if args.note:
        head += ["", args.note]
    sections = []
    for net in nets:
        log(f"{net['label']} {net['input']}: none + {len(blocks)} blocks, {args.repeats} rounds")
        rows = bench_network(net, blocks, args.repeats, args.compile, log)
        sections.append(to_markdown(net, rows, args.repeats))
        print(sections[-1], flush=True)
        provenance = benchmark_header("bench_networks.py", argv if argv is not None else sys.argv[1:],
                                      device="CPU", load=load)
        text = provenance + "\n" + "\n".join(head) + "\n\n" + "\n\n".join(sections) + "\n"
        with atomic_path(out) as tmp:  # written after every network, so a long run leaves its finished part
            Path(tmp).write_text(text)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
