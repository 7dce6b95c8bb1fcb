"""CPU inference time of an exported network: torch eager vs onnxruntime vs TorchScript, in paired rounds (issue 24).

Usage::

    python benchmarks/bench_export.py                   # 128^3 and 256x256x200, writes benchmarks/results/export_cpu.md
    python benchmarks/bench_export.py --rounds 9 --threads 1
    python benchmarks/bench_export.py --quick --rounds 2  # tiny sizes, a smoke run (seconds)

A run folder holds the demo's network (``configs/demo.yaml``'s ``model`` section: MONAI U-Net 16-32-64-128 with
scSE at every position, 3 classes, seeded random weights: timing does not depend on the weights), windows of 96^3
(``--roi``), overlap 0.5, Gaussian blending, sw_batch_size 2, z-score normalisation. :func:`medse.export.export_run`
writes ``model.onnx`` and ``model.ts`` from it (each checked against the eager network, as ``medse export`` does).

Each engine is a :class:`medse.inference.Predictor` of the same run: eager loads the checkpoint, the others get the
exported file in the network's place (``model_file``, what ``medse predict --model`` does), so the reading,
preprocessing, windows, blending and mapping back are the same code; only the network call differs. One case is
one ``predict_case`` call (read + preprocess, sliding window, argmax, back to the file's grid; no writing).

Paired rounds: after one untimed warm-up case per engine, every round runs every engine once on every case, in an
order that rotates from round to round (so no engine always runs first or after the same one). An engine's ratio in
a round is its time over eager's time on the same case in the same round; the table gives the median ratio over the
rounds with its 25-75% range (:mod:`medse.utils.benchstats`). Onnxruntime runs with ``torch.get_num_threads()``
intra-op threads (:class:`medse.inference.runtime.OnnxNetwork`), so ``--threads`` / ``OMP_NUM_THREADS`` bound all three
engines alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import make_scan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ENGINES = {"eager": None, "onnxruntime": "onnx", "torchscript": "torchscript"}
NUM_CLASSES = 3


def make_demo_run(run: Path, roi: int, channels: list[int] | None = None) -> dict:
    """A run folder with the demo's network (``configs/demo.yaml`` ``model``; ``channels`` overrides its widths)
    and seeded random weights; returns the model section written."""
    import json

    import yaml

    from medse.config import config_to_dict, load_config
    from medse.training.trainer import build_model
    from medse.utils.checkpoint import save_checkpoint
    from medse.utils.config import dump_yaml

    model = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["model"]
    if channels:
        model = {**model, "kwargs": {**model.get("kwargs", {}), "channels": channels}}
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    cfg = load_config({
        "data": {"root": str(run), "preprocess": {"normalization": "zscore"}},
        "model": model,
        "train": {"patch_size": [roi] * 3},
        "infer": {"sw_batch_size": 2, "overlap": 0.5, "blend": "gaussian"},
    })
    (run / "config.yaml").write_text(dump_yaml(config_to_dict(cfg)))
    (run / "dataset.json").write_text(json.dumps({
        "labels": {"background": 0, **{f"class{i}": i for i in range(1, NUM_CLASSES)}}, "channel_names": ["ct"],
        "num_classes": NUM_CLASSES, "class_values": list(range(NUM_CLASSES))}))
    torch.manual_seed(0)
    save_checkpoint(run / "checkpoints" / "best.pt", {"model": build_model(cfg, 1, NUM_CLASSES).state_dict()})
    return model


def build_predictor(run: Path, model_file: Path | None):
    """The predictor ``medse predict --run RUN [--model FILE] --device cpu`` builds (same run, same settings)."""
    from medse.inference import Predictor

    return Predictor.from_run(run, device="cpu", model_file=model_file)


def time_case(pred, scan: Path) -> tuple[float, float, np.ndarray]:
    """Wall seconds of one ``predict_case``, the seconds in the network's forward calls, and the labels."""
    f0 = pred.timings.get("forward", 0.0)
    t0 = time.perf_counter()
    labels = pred.predict_case(scan)
    wall = time.perf_counter() - t0
    return wall, pred.timings.get("forward", 0.0) - f0, np.asarray(labels)


def paired_rounds(preds: dict, scans: dict[str, Path], rounds: int, log: Callable[[str], None]) -> dict:
    """``{case: {engine: {"wall": [...], "forward": [...]}}}`` over ``rounds`` rounds, and the label agreement of
    each engine with eager in the last round (``"agree"``)."""
    names = list(preds)
    res: dict = {c: {e: {"wall": [], "forward": []} for e in names} for c in scans}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for case, scan in scans.items():
            labels = {}
            for e in order:
                wall, fwd, labels[e] = time_case(preds[e], scan)
                res[case][e]["wall"].append(wall)
                res[case][e]["forward"].append(fwd)
            res[case]["agree"] = {e: float((labels[e] == labels["eager"]).mean()) for e in names}
            log(f"  round {r + 1}/{rounds} {case}: " + ", ".join(
                f"{e} {res[case][e]['wall'][-1]:.2f} s" for e in names))
    return res


def ratios(res: dict, case: str, engine: str, key: str = "wall") -> list[float]:
    """Per-round paired ratios engine / eager on ``case``."""
    return [a / b for a, b in zip(res[case][engine][key], res[case]["eager"][key], strict=True)]


def _s(seconds: float) -> str:
    return f"{seconds:.3g}" if seconds < 10 else f"{seconds:.1f}"


def to_markdown(res: dict, engines: list[str], rounds: int) -> list[str]:
    from medse.utils.benchstats import spread

    lines = ["| case | engine | seconds per case (median) | 25-75% (s) | forward (s, median) | ratio to eager "
             "(median of paired rounds) | 25-75% | forward ratio to eager | labels equal to eager | rounds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for case in res:
        for e in engines:
            w, f = spread(res[case][e]["wall"]), spread(res[case][e]["forward"])
            if e == "eager":
                ratio_cells = "1 | | 1"
            else:
                r, rf = spread(ratios(res, case, e)), spread(ratios(res, case, e, "forward"))
                ratio_cells = f"{r.median:.3f} | {r.range_text('{:.3f}')} | {rf.median:.3f}"
            lines.append(f"| {case} | {e} | {_s(w.median)} | {_s(w.q25)} .. {_s(w.q75)} | {_s(f.median)} | "
                         f"{ratio_cells} | "
                         f"{100 * res[case]['agree'][e]:.3f}% | {rounds} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="paired rounds (default 5)")
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES),
                    help="engines to time (eager is always included: the ratios are to it)")
    ap.add_argument("--roi", type=int, default=None, help="sliding-window edge (default 96; 16 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (onnxruntime follows it)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny network (8-16), scans 24^3 and 32x32x24, windows 16^3: a smoke run")
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from medse.export import export_run
    from medse.utils.atomic import atomic_write_text
    if str(ROOT) not in sys.path:  # tools/ (the repository's, not the package's) imports from the root
        sys.path.append(str(ROOT))
    from tools.docsync import benchmark_header

    engines = ["eager", *[e for e in args.engines if e != "eager"]]
    shapes = {"128^3": (128, 128, 128), "256x256x200": (256, 256, 200)}
    roi, channels = args.roi or 96, None
    if args.quick:
        shapes = {"24^3": (24, 24, 24), "32x32x24": (32, 32, 24)}
        roi, channels = args.roi or 16, [8, 16]
    out = args.output or RESULTS / f"export_cpu{'_quick' if args.quick else ''}.md"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_bench = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medse-bench-export-") as tmp:
        tmp_p = Path(tmp)
        run = tmp_p / "run"
        model = make_demo_run(run, roi, channels)
        files: dict[str, Path | None] = {"eager": None}
        exports = {}
        for e in engines[1:]:
            result = export_run(run, ENGINES[e], tmp_p / e)
            files[e], exports[e] = result.model_path, result
            log(result.summary())
        scans = {}
        for i, (case, shape) in enumerate(shapes.items()):
            scans[case] = tmp_p / "scans" / f"case{i}.nii.gz"
            make_scan(scans[case], shape, seed=i)
        preds = {e: build_predictor(run, files[e]) for e in engines}
        ort_threads = next((p.model.session.get_session_options().intra_op_num_threads for p in preds.values()
                            if hasattr(p.model, "session")), None)
        first = next(iter(scans.values()))
        log(f"warm-up ({first.name}), then {args.rounds} paired rounds; torch threads {torch.get_num_threads()}")
        for p in preds.values():
            time_case(p, first)
        res = paired_rounds(preds, scans, args.rounds, log)
    wall_s = time.perf_counter() - t_bench

    import onnxruntime

    parity = "; ".join(f"{e} {x.max_abs_diff:.2g}" for e, x in exports.items())
    head = benchmark_header("bench_export.py", argv, device="CPU", load=load, wall_s=wall_s).rstrip("\n")
    text = [
        head, "",
        "# CPU inference: torch eager vs onnxruntime vs TorchScript (issue 24)", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__} "
        f"({ort_threads if ort_threads is not None else 'not run'} intra-op threads), Python "
        f"{platform.python_version()}.", "",
        f"Network: the demo's `{model['name']}` {model.get('kwargs', {})} with attention `{model.get('attention')}`, "
        f"{NUM_CLASSES} classes, random weights; windows {roi}^3, overlap 0.5, Gaussian blending, sw_batch_size 2, "
        "z-score normalisation; scans float32 NIfTI (.nii.gz) with an oblique affine. Exported with "
        f"`medse.export.export_run` (largest logit difference to eager at its check inputs: {parity or 'none'}).",
        "",
        "One case = one `Predictor.predict_case` (read, preprocess, sliding window, argmax, back to the file's grid; "
        "nothing written), the same predictor code for every engine (the exported file takes the network's place, "
        "as in `medse predict --model`). \"forward\" is the part of it spent in the network's calls. Ratios are "
        "per round, engine over eager on the same case in the same round, after one untimed warm-up case per "
        "engine; engines run in an order rotating each round. \"labels equal to eager\": share of voxels of the "
        "last round's mask equal to eager's.", "",
        *to_markdown(res, engines, args.rounds),
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(text) + "\n", fsync=False)
    print("\n".join(text[2:]))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
