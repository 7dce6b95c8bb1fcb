"""Inference benchmark: throughput (cases/min), peak memory, and the share of wall time outside the forward pass.

Usage::

    .venv/bin/python benchmarks/bench_inference.py                 # CPU, writes benchmarks/results/inference_cpu.md
    .venv/bin/python benchmarks/bench_inference.py --device cuda   # writes benchmarks/results/inference_cuda.md
    .venv/bin/python benchmarks/bench_inference.py --quick         # small sizes, a smoke run

Part 1 (``medse predict`` end to end, through :func:`medse.inference.predict_folder`): a run folder with
a randomly initialised default medse U-Net (channels 16-32-64-128, 3 classes), sliding windows of 96^3,
overlap 0.5, Gaussian blending, on scans of 128^3 and 256x256x200 voxels with an oblique affine. Each
size runs in its own process, so its peak resident memory (``ru_maxrss``) is its own. Time is split into
reading + preprocessing, network forward passes, the rest of inference (window blending, argmax,
inverse mapping) and writing (with the round-trip check). ``predict_folder`` pipelines the cases (the next
case is read and the previous one written while a case is in the network; the window blending runs while
the next window batch is in the network), so these columns are the time the batch *waited* for each stage;
the background columns give the seconds the reader / writer threads worked.

Part 2 (memory of the sliding-window aggregation alone): a pointwise 14-class network (a 1x1x1 conv, so
the network costs nothing) on a 256x256x200 and a 512x512x300 volume with 128^3 windows: MONAI's
``SlidingWindowInferer`` (full float32 ``(K, X, Y, Z)`` output + count map) against medse's streamed
:func:`medse.inference.sliding.iter_window_slabs` + argmax. MONAI's 512x512x300 peak is given
analytically unless ``--monai-large`` is given, as it needs > 5 GiB. Memory is in MiB (2^20 bytes) and GiB
(2^30 bytes) throughout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


# ----------------------------------------------------------------------------------- setup helpers
def make_run(run: Path, roi: int, num_classes: int = 3) -> None:
    import torch

    from medse.config import config_to_dict, load_config
    from medse.training.trainer import build_model
    from medse.utils.checkpoint import save_checkpoint
    from medse.utils.config import dump_yaml

    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    cfg = load_config({
        "data": {"root": str(run), "preprocess": {"normalization": "zscore"}},
        "model": {"name": "unet", "spatial_dims": 3},
        "train": {"patch_size": [roi] * 3},
        "infer": {"sw_batch_size": 2, "overlap": 0.5, "blend": "gaussian"},
    })
    (run / "config.yaml").write_text(dump_yaml(config_to_dict(cfg)))
    labels = {"background": 0, **{f"class{i}": i for i in range(1, num_classes)}}
    (run / "dataset.json").write_text(json.dumps({"labels": labels, "channel_names": ["ct"],
                                                  "num_classes": num_classes,
                                                  "class_values": list(range(num_classes))}))
    torch.manual_seed(0)
    model = build_model(cfg, 1, num_classes)
    save_checkpoint(run / "checkpoints" / "best.pt", {"model": model.state_dict()})


def make_scan(path: Path, shape: tuple[int, int, int], seed: int) -> None:
    import nibabel as nib
    import numpy as np

    from medse.testing import make_affine

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij"))
    r = np.sqrt((grid ** 2).sum(0))
    data = (100.0 * (r < 0.7) + 50.0 * (r < 0.3) + rng.normal(0, 10, size=shape)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, make_affine("oblique", seed=seed)), str(path))


# ----------------------------------------------------------------------------------------- workers
def worker_predict(args: argparse.Namespace) -> dict:
    from medse.inference import Predictor, predict_folder

    t_setup = time.perf_counter()
    predictor = Predictor.from_run(args.run, device=args.device)  # imports, network, checkpoint: once per batch
    setup = time.perf_counter() - t_setup
    base = _current_rss_mib()
    t0 = time.perf_counter()
    rep = predict_folder(predictor, args.input, args.output, overwrite=True, progress=False)
    wall = time.perf_counter() - t0
    if rep.failed:
        raise SystemExit(f"benchmark cases failed: {rep.failed}")
    return {"wall_s": wall, "setup_s": setup, "cases": len(rep.written), "timings": rep.timings,
            "peak_rss_mib": _rss_mib(), "baseline_rss_mib": base}


def worker_inferer(args: argparse.Namespace) -> dict:
    import monai.data.utils  # noqa: F401  (imported before the clock starts)
    import monai.inferers  # noqa: F401
    import torch

    from medse.inference.sliding import iter_window_slabs, monai_sliding_window, sliding_window_labels

    size = tuple(int(s) for s in args.size.split("x"))
    k = int(args.classes)
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, k, 1).eval()
    x = torch.randn(1, *size)
    base = _current_rss_mib()
    t0 = time.perf_counter()
    with torch.inference_mode():
        if args.engine == "monai":
            out = monai_sliding_window(x, net, (args.roi,) * 3, overlap=0.5, mode="gaussian", sw_batch_size=2,
                                       device="cpu")
            labels = out.argmax(0).to(torch.uint8)
            del out
        else:
            labels, _ = sliding_window_labels(
                iter_window_slabs(x, net, (args.roi,) * 3, overlap=0.5, mode="gaussian", sw_batch_size=2), size)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "peak_rss_mib": _rss_mib(), "baseline_rss_mib": base, "labels_shape": list(labels.shape)}


def _run_worker(argv: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"worker {' '.join(argv)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--roi", type=int, default=96)
    ap.add_argument("--output", type=Path, default=None)
    ap.add_argument("--monai-large", action="store_true", help="also run MONAI's inferer at 512x512x300 (> 5 GiB)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="end-to-end runs per scan size, each in a fresh process; the table shows the run with the "
                         "median share outside the forward pass and lists every run's share")
    ap.add_argument("--_worker", choices=["predict", "inferer"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--input", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", dest="output_dir_w", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--classes", default="14", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="stream", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        from medse.utils.runinfo import imported_repo_files

        if args._worker == "predict":
            args.output = args.output_dir_w
        res = worker_predict(args) if args._worker == "predict" else worker_inferer(args)
        res["sources"] = imported_repo_files()  # for the results file's source fingerprint
        print(json.dumps(res))
        return

    import torch

    out_md = args.output or ROOT / "benchmarks" / "results" / f"inference_{'cuda' if 'cuda' in args.device else 'cpu'}.md"
    sizes = [("128^3", (128, 128, 128), 3), ("256x256x200", (256, 256, 200), 1)]
    mem_sizes = ["256x256x200", "512x512x300"]
    roi_mem = 128
    if args.quick:
        sizes = [("48^3", (48, 48, 48), 2), ("64x64x40", (64, 64, 40), 1)]
        mem_sizes = ["64x64x48"]
        roi_mem = 32
    rows = []
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t_bench = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medse-bench-") as tmp:
        tmp_p = Path(tmp)
        run = tmp_p / "run"
        make_run(run, args.roi)
        for name, shape, n in sizes:
            d = tmp_p / f"in_{name.replace('^', '')}"
            for i in range(n):
                make_scan(d / f"case{i}.nii.gz", shape, seed=i)
            runs = []
            for rep in range(max(1, args.repeats)):
                res = _run_worker(["--_worker", "predict", "--run", str(run), "--input", str(d), "--out-dir",
                                   str(tmp_p / f"out_{name.replace('^', '')}"), "--device", args.device])
                res["outside"] = 1.0 - res["timings"].get("forward", 0.0) / res["wall_s"]
                runs.append(res)
                print(f"{name} run {rep + 1}: {res['cases']} cases in {res['wall_s']:.1f} s, outside the forward "
                      f"{100 * res['outside']:.1f}%, peak RSS {res['peak_rss_mib']:.0f} MiB", flush=True)
            res = sorted(runs, key=lambda r: r["outside"])[(len(runs) - 1) // 2]  # the median run
            res["name"], res["shape"] = name, shape
            res["all_outside"] = [r["outside"] for r in runs]
            rows.append(res)
        mem_rows = []
        for size in mem_sizes:
            for engine in ("stream", "monai"):
                large = size == "512x512x300"
                if engine == "monai" and large and not args.monai_large:
                    continue
                res = _run_worker(["--_worker", "inferer", "--size", size, "--classes", "14", "--engine", engine,
                                   "--roi", str(roi_mem)])
                res.update(size=size, engine=engine)
                mem_rows.append(res)
                print(f"inferer {engine} {size}: {res['wall_s']:.1f} s, peak RSS {res['peak_rss_mib']:.0f} MiB "
                      f"(baseline {res['baseline_rss_mib']:.0f})", flush=True)
    worker_sources = {f for r in [*rows, *mem_rows] for f in r.get("sources", [])}
    header = provenance(sys.argv[1:], load_start, time.perf_counter() - t_bench, worker_sources)
    write_report(out_md, args, rows, mem_rows, roi_mem, torch.__version__, header)
    print(f"wrote {out_md}")


def _analytic_mib(size: tuple[int, ...], k: int, roi: int) -> dict[str, float]:
    from medse.inference.sliding import choose_stream_axis, stream_buffer_bytes

    n = 1
    for s in size:
        n *= s
    mib = 1024.0 ** 2
    axis = choose_stream_axis(size, (roi,) * 3)
    return {
        "input": 4 * n / mib,
        "monai_output_count": (4 * k * n + 4 * n) / mib,
        "stream_buffer": stream_buffer_bytes(size, (roi,) * 3, k, axis) / mib,
        "labels": n / mib,
        "axis": axis,
    }


def provenance(argv: list[str], load_start: float | None, wall_s: float, worker_sources: set[str]) -> str:
    """docsync's provenance header (``benchmark_header``), with the repository files the workers imported."""

    if str(ROOT) not in sys.path:  # tools/ (the repository's, not the package's) imports from the root
        sys.path.append(str(ROOT))
    from tools.docsync import benchmark_header

    return benchmark_header("bench_inference.py", argv, device="CPU",
                            load=load_start, extra_files=sorted(worker_sources), wall_s=wall_s)


def write_report(path: Path, args: argparse.Namespace, rows: list[dict], mem_rows: list[dict], roi_mem: int,
                 torch_version: str, header: str = "") -> None:
    command = " ".join(["python", "benchmarks/bench_inference.py", *sys.argv[1:]]).replace(f"{ROOT}{os.sep}", "")
    lines = [
        *([header.rstrip("\n"), ""] if header else []),
        f"# Inference benchmark ({args.device.upper()})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, "
        f"torch {torch_version}, Python {platform.python_version()}. Command: `{command}`.",
        "",
        "## End to end (`predict_folder`: read, preprocess, sliding window, invert, write + round-trip check)",
        "",
        f"Default medse U-Net (16-32-64-128, 3 classes, random weights), windows {args.roi}^3, overlap 0.5, "
        "Gaussian blending, sw_batch_size 2, z-score normalisation, oblique affine, float32 NIfTI-1 (.nii.gz).",
        "",
        "| scan | cases | setup (s) | wall (s) | cases/min | forward (s) | outside forward | every run "
        "| read+preprocess | other inference | write | background read / write (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["timings"]
        wall = r["wall_s"]
        fwd = t.get("forward", 0.0)
        lines.append(
            f"| {r['name']} | {r['cases']} | {r['setup_s']:.1f} | {wall:.1f} | {60.0 * r['cases'] / wall:.2f} | "
            f"{fwd:.1f} | "
            f"{100.0 * (1 - fwd / wall):.1f}% | "
            f"{' / '.join(f'{100.0 * o:.1f}' for o in sorted(r.get('all_outside', [1 - fwd / wall])))}% | "
            f"{100.0 * t.get('preprocess', 0) / wall:.1f}% | "
            f"{100.0 * t.get('postprocess', 0) / wall:.1f}% | {100.0 * t.get('write', 0) / wall:.1f}% | "
            f"{t.get('background_read', 0):.1f} / {t.get('background_write', 0):.1f} | "
            f"{r['peak_rss_mib']:.0f} |")
    lines += [
        "",
        "\"setup\" (imports, building the network, loading the checkpoint: once per batch) is not in the wall "
        "time. \"outside forward\" = 1 - (time in the network's forward calls) / wall time, i.e. the share of "
        "the wall time in which no forward pass was running. `predict_folder` pipelines the cases: a reader "
        "thread reads and preprocesses the next case and a writer thread maps the previous case back and writes "
        "it while a case is in the network, and the window blending and argmax run while the next window batch "
        "is in the network. So read+preprocess, \"other inference\" (blending and argmax not hidden behind a "
        "forward pass) and write (inverse mapping, label lookup, writing with the round-trip check) are the "
        "shares of the wall time the batch *waited* for them (the first case's read and the last case's write "
        "cannot overlap anything); \"background read / write\" are the seconds the reader and writer threads "
        "worked in all. The remainder is case listing and bookkeeping. A gathering thread cuts the next window "
        "batch out of the volume while a batch is in the network, and a case's last blending and argmax (after "
        "its last forward pass) run in the writer thread while the next case is in the network. Each size ran "
        f"{max(1, args.repeats)} times, each in a fresh process: the row is the run with the median share "
        "outside the forward pass, \"every run\" lists all of them.",
        "",
        f"## Sliding-window aggregation memory (14 classes, {roi_mem}^3 windows, overlap 0.5, pointwise network)",
        "",
        "| volume | engine | wall (s) | peak RSS (MiB) | RSS before inference (MiB) | peak - before (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in mem_rows:
        lines.append(f"| {r['size']} | {'medse streamed' if r['engine'] == 'stream' else 'MONAI SlidingWindowInferer'}"
                     f" | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['baseline_rss_mib']:.0f} | "
                     f"{r['peak_rss_mib'] - r['baseline_rss_mib']:.0f} |")
    lines += ["", "Analytic sizes (MiB) of the large arrays:", "",
              "| volume | input float32 | MONAI output + count map (float32) | medse stream buffer (axis) | "
              "labels uint8 |", "|---|---|---|---|---|"]
    for size in sorted({r["size"] for r in mem_rows} | {"512x512x300"}):
        shp = tuple(int(s) for s in size.split("x"))
        a = _analytic_mib(shp, 14, roi_mem)
        lines.append(f"| {size} | {a['input']:.0f} | {a['monai_output_count']:.0f} | "
                     f"{a['stream_buffer']:.0f} (axis {a['axis']}) | {a['labels']:.0f} |")
    by = {(r["size"], r["engine"]): r for r in mem_rows}
    lines.append("")
    for size in sorted({r["size"] for r in mem_rows}):
        a, b = by.get((size, "stream")), by.get((size, "monai"))
        if a and b:
            lines.append(f"{size}: streamed peak {a['peak_rss_mib'] / 1024:.2f} GiB vs MONAI "
                         f"{b['peak_rss_mib'] / 1024:.2f} GiB ({b['peak_rss_mib'] / a['peak_rss_mib']:.1f}x); above "
                         f"the loaded input and libraries {(a['peak_rss_mib'] - a['baseline_rss_mib']) / 1024:.2f} vs "
                         f"{(b['peak_rss_mib'] - b['baseline_rss_mib']) / 1024:.2f} GiB.")
            lines.append("")
    lines += ["Wall times come from a machine shared with other jobs: compare them within one table only.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    from medse.utils.atomic import atomic_write_text

    atomic_write_text(path, "\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
