"""Training-step overhead of each attention block in a U-Net, in paired rounds (issue 14, target 2).

Networks (``--networks``):

- ``realistic``: MONAI UNet channels 32-64-128-256, 2 residual units, batch 2, 64^3 patches (``--size`` to
  change the patch edge when one step is too slow for the machine), 4 classes;
- ``demo``: the demo's network (``configs/demo.yaml``: MONAI UNet 16-32-64-128, no residual units, batch 2,
  32^3);
- ``nnunet``: nnU-Net v2's ``PlainConvUNet`` with medse blocks (``AttentionPlainConvUNet``): the 3d_fullres
  layout of a 64^3-class patch (6 stages 32-64-128-256-320-320, kernels 3, strides 1-2-2-2-2-2, 2 convs per
  stage, instance norm, leaky ReLU, no deep supervision), batch 2, ``--size`` patches; needs the nnU-Net
  environment (``make setup-nnunet``; run with ``.venv-nnunet/bin/python``).

Every block sits at every position (encoder, bottleneck, decoder) with its default settings (fast path on).
A training step is forward, cross-entropy, backward and an SGD step (momentum 0.9).

Paired rounds: in each round the baseline network (``none``) runs before the first block and after every
block (``none, b1, none, b2, none, ...``), and a block's ratio is its step time over the mean of the two
baseline steps around it. The table gives the median ratio over the rounds as an overhead in percent, with
the 25-75% range of the ratios (the spread) and the number of rounds. ``--plain`` adds the blocks with
``fused=False``; ``--compile`` adds whole-model ``torch.compile`` for ``none`` and every block (paired against
the compiled baseline).

Usage::

    python benchmarks/bench_step.py                                   # realistic + demo, CPU
    python benchmarks/bench_step.py --networks realistic --size 32 --rounds 9
    python benchmarks/bench_step.py --device cuda --compile           # on a GPU
    python benchmarks/bench_step.py --quick                           # tiny smoke run
    .venv-nnunet/bin/python benchmarks/bench_step.py --networks nnunet --output benchmarks/results/step_cpu_nnunet.md
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_blocks import cpu_peak_bytes  # noqa: E402,F401  (bench_memory imports it from here)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

BLOCKS: list[tuple[str, str, dict]] = [
    ("cse", "cse", {}),
    ("sse", "sse", {}),
    ("scse (max)", "scse", {"aggregation": "max"}),
    ("eca", "eca", {}),
    ("simam", "simam", {}),
    ("ca", "ca", {}),
]
DEFAULT_BLOCKS = ["cse", "sse", "scse (max)", "eca", "simam"]
NUM_CLASSES = 4


def network_specs(size: int, demo_size: int, quick: bool) -> dict[str, dict]:
    """name -> {label, kwargs, input shape}."""
    if quick:
        return {
            "realistic": {"label": "U-Net 3D 8-16, 2 res units (quick)", "kwargs": {"channels": [8, 16],
                          "num_res_units": 2}, "input": (1, 1, 16, 16, 16)},
            "demo": {"label": "U-Net 3D demo (quick)", "kwargs": {"channels": [8, 16]}, "input": (1, 1, 16, 16, 16)},
            "nnunet": {"label": "nnU-Net PlainConvUNet 3D 8-16-32 (quick)", "kind": "nnunet",
                       "kwargs": _plain_conv_unet_kwargs([8, 16, 32]), "input": (1, 1, 16, 16, 16)},
        }
    return {
        "realistic": {"label": f"U-Net 3D 32-64-128-256, 2 res units, {size}^3", "kwargs": {
            "channels": [32, 64, 128, 256], "num_res_units": 2}, "input": (2, 1, size, size, size)},
        "demo": {"label": f"U-Net 3D demo 16-32-64-128, {demo_size}^3", "kwargs": {"channels": [16, 32, 64, 128]},
                 "input": (2, 1, demo_size, demo_size, demo_size)},
        "nnunet": {"label": f"nnU-Net PlainConvUNet 3D 32-64-128-256-320-320, {size}^3", "kind": "nnunet",
                   "kwargs": _plain_conv_unet_kwargs([32, 64, 128, 256, 320, 320]), "input": (2, 1, size, size, size)},
    }


def _plain_conv_unet_kwargs(features: list[int]) -> dict:
    """``PlainConvUNet`` arguments as nnU-Net v2's 3d_fullres plans give them (the norm/nonlin classes are
    filled in by :func:`build`, which imports torch.nn only)."""
    n = len(features)
    return {"n_stages": n, "features_per_stage": features, "kernel_sizes": [[3, 3, 3]] * n,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1), "n_conv_per_stage": [2] * n,
            "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True}


def build(spec: dict, attention: str, kw: dict, fused: bool, device: torch.device) -> nn.Module:
    from medse.networks import create_model

    torch.manual_seed(0)
    if spec.get("kind") == "nnunet":
        try:
            from medse.integrations.nnunet.networks import AttentionPlainConvUNet
        except ImportError as e:
            raise SystemExit(f"--networks nnunet needs nnU-Net v2 (make setup-nnunet; .venv-nnunet/bin/python): {e}") from None
        model = AttentionPlainConvUNet(
            1, conv_op=nn.Conv3d, num_classes=NUM_CLASSES, norm_op=nn.InstanceNorm3d,
            norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
            deep_supervision=False, attention=attention, attention_kwargs=dict(kw), **spec["kwargs"],
        )
    else:
        model = create_model("unet", 3, 1, NUM_CLASSES, attention=attention, attention_kwargs=dict(kw),
                             **spec["kwargs"])
    for m in model.modules():
        if hasattr(m, "fused"):
            m.fused = fused
    return model.to(device).train()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Candidate:
    """One network with its optimiser; ``step()`` runs and times one training step."""

    def __init__(self, label: str, variant: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 device: torch.device, compile_model: bool = False):
        self.label, self.variant, self.x, self.y, self.device = label, variant, x, y, device
        self.model = model
        self.n_att = sum(1 for m in model.modules() if getattr(m, "_medse_attention", False))
        self.forward = torch.compile(model) if compile_model else model
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(self) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.forward(self.x), self.y)
        loss.backward()
        self.opt.step()
        _sync(self.device)
        return time.perf_counter() - t0


def paired_rounds(base: Candidate, cands: list[Candidate], rounds: int,
                  log: Callable[[str], None]) -> list[list[float]]:
    """Ratios block / mean(baseline before, baseline after), one list per candidate, ``rounds`` each."""
    ratios: list[list[float]] = [[] for _ in cands]
    base_times: list[float] = []
    for r in range(rounds):
        prev = base.step()
        base_times.append(prev)
        for i, c in enumerate(cands):
            t = c.step()
            nxt = base.step()
            base_times.append(nxt)
            ratios[i].append(t / (0.5 * (prev + nxt)))
            prev = nxt
        log(f"    round {r + 1}/{rounds}: " + ", ".join(f"{c.label} {c.variant} {100 * (ratios[i][-1] - 1):+.1f}%"
                                                      for i, c in enumerate(cands)))
    base.base_times = base_times  # type: ignore[attr-defined]
    return ratios


def quartiles(v: list[float]) -> tuple[float, float]:
    if len(v) < 2:
        return v[0], v[0]
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], q[2]


def bench_network(name: str, spec: dict, blocks: list[tuple[str, str, dict]], rounds: int, plain: bool,
                  compile_model: bool, device: torch.device, log: Callable[[str], None]) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(spec["input"], generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (spec["input"][0], *spec["input"][2:]), generator=g).to(device)
    groups: list[tuple[str, Candidate, list[Candidate]]] = []
    variants = [("fused (default)", True, False)]
    if plain:
        variants.append(("plain", False, False))
    base = Candidate("none", "", build(spec, "none", {}, True, device), x, y, device)
    cands = [Candidate(label, v, build(spec, reg, kw, fused, device), x, y, device)
             for label, reg, kw in blocks for v, fused, _ in variants]
    groups.append(("eager", base, cands))
    if compile_model:
        cbase = Candidate("none", "", build(spec, "none", {}, True, device), x, y, device, compile_model=True)
        ccands = [Candidate(label, "whole-model compile", build(spec, reg, kw, True, device), x, y, device,
                            compile_model=True) for label, reg, kw in blocks]
        groups.append(("compile", cbase, ccands))
    rows = []
    for gname, b, cs in groups:
        log(f"  {name} [{gname}]: warm-up")
        for c in [b, *cs]:
            c.step()
            c.step()
        ratios = paired_rounds(b, cs, rounds, log)
        base_ms = statistics.median(b.base_times) * 1e3  # type: ignore[attr-defined]
        rows.append({"block": "none", "variant": "whole-model compile" if gname == "compile" else "", "n_att": 0,
                     "ms": base_ms, "over": None, "lo": None, "hi": None, "rounds": rounds})
        for c, rs in zip(cs, ratios, strict=True):
            lo, hi = quartiles(rs)
            rows.append({"block": c.label, "variant": c.variant, "n_att": c.n_att,
                         "ms": base_ms * statistics.median(rs),
                         "over": 100 * (statistics.median(rs) - 1), "lo": 100 * (lo - 1), "hi": 100 * (hi - 1),
                         "rounds": len(rs), "overheads": [100 * (r - 1) for r in rs]})
    return rows


# issue 14, target 2: training-step overhead of the default (fast) block over none, in percent
STEP_TARGETS = {"scse": 3.0, "simam": 3.0, "cse": 2.0, "sse": 2.0, "eca": 2.0}


def step_target(label: str) -> float | None:
    reg = next((b[1] for b in BLOCKS if b[0] == label), label)
    return STEP_TARGETS.get(reg)


def to_markdown(spec: dict, rows: list[dict]) -> str:
    from medse.utils.benchstats import verdict_cell

    lines = [
        f"### {spec['label']}: `{'AttentionPlainConvUNet' if spec.get('kind') == 'nnunet' else 'unet'}` "
        f"{spec['kwargs']}, input {tuple(spec['input'])}, {NUM_CLASSES} classes, SGD",
        "",
        "| block | variant | blocks in net | step ms | overhead vs none (median of paired ratios) | 25-75% range "
        "| target | rounds |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        over = "" if r["over"] is None else f"{r['over']:+.1f}%"
        rng = "" if r["lo"] is None else f"{r['lo']:+.1f}% .. {r['hi']:+.1f}%"
        target = step_target(r["block"]) if r["over"] is not None and r["variant"] != "plain" else None
        cell = "" if target is None else verdict_cell(r["overheads"], target, fmt="{:+.1f}%")
        lines.append(f"| {r['block']} | {r['variant']} | {r['n_att']} | {r['ms']:.0f} | {over} | {rng} | {cell} "
                     f"| {r['rounds']} |")
    return "\n".join(lines)


def header(title: str, script: str, argv: list[str], device: torch.device, load: float | None = None) -> list[str]:
    """docsync's provenance header (command, clean commit, environment, date, source fingerprint; shared with
    every benchmark through ``tools.docsync.benchmark_header``), then the title. ``load``: the load
    average when the run started."""
    if str(ROOT) not in sys.path:  # tools/ (the repository's, not the package's) imports from the root
        sys.path.append(str(ROOT))
    from tools.docsync import benchmark_header

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return [benchmark_header(script, argv, device=dev, load=load).rstrip("\n"), "", f"# {title}"]


def select_blocks(names: list[str] | None) -> list[tuple[str, str, dict]]:
    want = set(names or DEFAULT_BLOCKS)
    blocks = [b for b in BLOCKS if b[0] in want or b[1] in want]
    if not blocks:
        raise SystemExit(f"error: --blocks {names}: none of {[b[0] for b in BLOCKS]}")
    return blocks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--networks", nargs="+", default=["realistic", "demo"], choices=["realistic", "demo", "nnunet"])
    ap.add_argument("--size", type=int, default=64, help="patch edge of the realistic network (default 64)")
    ap.add_argument("--demo-size", type=int, default=32, help="patch edge of the demo network (default 32)")
    ap.add_argument("--blocks", nargs="+", default=None, help=f"labels or registry names (default {DEFAULT_BLOCKS})")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--plain", action="store_true", help="also the plain blocks (fused=False)")
    ap.add_argument("--compile", action="store_true", help="also whole-model torch.compile (none and every block)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--quick", action="store_true", help="tiny networks and inputs (smoke run)")
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from medse.utils.atomic import atomic_path

    device = torch.device(args.device)
    blocks = select_blocks(args.blocks)
    specs = network_specs(args.size, args.demo_size, args.quick)
    out = args.output or RESULTS / f"step_{device.type}{'_quick' if args.quick else ''}.md"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    head = header("Training-step overhead of the attention blocks, paired rounds (issue 14, target 2)",
                  "bench_step.py", argv, device, load=load)
    head += ["", "Each block's step is timed between two steps of the same network without attention; the "
             "overhead is the median over rounds of block / mean(two neighbours). Default block settings "
             "(fast path on); target (issue 14, set for the realistic network): scSE and SimAM at most +3%, "
             "cSE/sSE/ECA at most +2%. The target column: met when the 75th percentile of the paired overheads "
             "meets it, missed when the 25th percentile fails it, not decided when the 25-75% range straddles it."]
    sections = []
    for name in args.networks:
        spec = specs[name]
        log(f"{spec['label']} {spec['input']}: {len(blocks)} blocks, {args.rounds} paired rounds")
        rows = bench_network(name, spec, blocks, args.rounds, args.plain, args.compile, device, log)
        sections.append(to_markdown(spec, rows))
        print(sections[-1], flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:  # after every network, so a long run leaves its finished part
            Path(tmp).write_text("\n".join(head) + "\n\n" + "\n\n".join(sections) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
