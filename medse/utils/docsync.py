"""Keep every number in README.md and docs/ tied to a results file that a command in the repo writes.

Results files (``docs/results/<name>.md``, ``benchmarks/results/<name>.md``) start with a provenance header::

    <!-- medse:result
    command: medse models --size 64 --dims 2 --attention scse,scse_smp --markdown
    commit: 1163141... (the code that produced the numbers; "+dirty" = with uncommitted changes)
    machine: Linux-...-x86_64, 2 CPUs, torch 2.13.0+cpu, Python 3.11.7
    date: 2026-12-01 21:40 UTC
    wall: 3.2 s
    -->

Markdown pages copy (parts of) them between markers::

    <!-- medse:include docs/results/models_2d.md -->
    ... generated, do not edit ...
    <!-- medse:end -->

Options in the opening marker: ``section="Heading text"`` (only that heading's part, up to the next heading of
the same or a higher level, the heading itself left out), ``table="N"`` (only the N-th table of that) and
``rows="regex"`` (table rows kept only if they match; header and separator rows, and non-table lines, are kept),
applied in that order. A table that directly follows a text line gets a blank line before it.

Commands::

    python -m medse.utils.docsync                 # rewrite every generated block from its file
    python -m medse.utils.docsync --check         # exit 1 naming each stale block or bad results file
    python -m medse.utils.docsync generate NAME   # run NAME's commands and write its results file
    python -m medse.utils.docsync generate NAME --work DIR --no-run   # record an existing output folder
    python -m medse.utils.docsync list            # the results files this script knows how to make
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medse.utils.atomic import atomic_write_bytes, atomic_write_text
from medse.utils.errors import MedseError

REPO = Path(__file__).resolve().parents[2]
HEADER_START = "<!-- medse:result"
HEADER_KEYS = ("command", "commit", "machine", "date")
INCLUDE_RE = re.compile(r"^<!-- medse:include (?P<path>\S+)(?P<opts>(?: \w+=\"[^\"]*\")*) -->[ \t]*$", re.M)
OPT_RE = re.compile(r"(\w+)=\"([^\"]*)\"")
END = "<!-- medse:end -->"
# pages whose generated blocks are kept in sync (results files themselves are sources, never targets)
PAGE_GLOBS = ("README.md", "docs/**/*.md", "benchmarks/README.md")
SOURCE_DIRS = ("docs/results", "benchmarks/results")
MARKER = ".medse-docsync"  # in a work folder: made by generate, so a rerun may clear it


# ----------------------------------------------------------------------------- provenance header
def machine_description() -> str:
    try:
        import torch

        tv = f"torch {torch.__version__}"
    except Exception:  # pragma: no cover - torch is a hard dependency
        tv = "torch not installed"
    return f"{platform.platform()}, {os.cpu_count()} CPUs, {tv}, Python {platform.python_version()}"


def current_commit(repo: Path = REPO) -> str:
    from medse.utils.runinfo import git_commit

    return git_commit(repo) or "unknown (not a git checkout)"


def format_header(fields: dict[str, str]) -> str:
    missing = [k for k in HEADER_KEYS if not fields.get(k)]
    if missing:
        raise ValueError(f"provenance header lacks {', '.join(missing)}")
    lines = [HEADER_START]
    for k, v in fields.items():
        v = " ".join(str(v).split())
        if "-->" in v:
            raise ValueError(f"provenance field {k!r} contains '-->'")
        lines.append(f"{k}: {v}")
    lines.append("-->")
    return "\n".join(lines) + "\n"


def parse_result(path: Path) -> tuple[dict[str, str], str]:
    """Return (provenance fields, body) of a results file; ``MedseError`` naming the file if malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MedseError("results file does not exist (make it with `python -m medse.utils.docsync generate`)",
                         path) from None
    if not text.startswith(HEADER_START + "\n"):
        raise MedseError(f"results file does not start with a '{HEADER_START}' provenance header", path)
    end = text.find("\n-->\n")
    if end < 0:
        raise MedseError("provenance header is not closed by a '-->' line", path)
    fields: dict[str, str] = {}
    for line in text[len(HEADER_START) + 1 : end].splitlines():
        key, sep, value = line.partition(":")
        if not sep or not key.strip() or not value.strip():
            raise MedseError(f"provenance header line {line!r} is not 'key: value'", path)
        fields[key.strip()] = value.strip()
    missing = [k for k in HEADER_KEYS if k not in fields]
    if missing:
        raise MedseError(f"provenance header lacks {', '.join(missing)}", path)
    return fields, text[end + len("\n-->\n") :].lstrip("\n")


# ----------------------------------------------------------------------------- include blocks
@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening marker
    source: str
    options: dict[str, str]
    start: int  # offset just after the opening marker's newline
    stop: int  # offset of the end marker


def find_blocks(page: Path, text: str) -> list[Block]:
    blocks = []
    pos = 0
    for m in INCLUDE_RE.finditer(text):
        if m.start() < pos:
            continue
        line = text.count("\n", 0, m.start()) + 1
        start = m.end() + 1
        stop = text.find("\n" + END, m.end())
        nxt = INCLUDE_RE.search(text, m.end())
        if stop < 0 or (nxt is not None and nxt.start() < stop):
            raise MedseError(f"line {line}: medse:include block has no '{END}' before the next include", page)
        opts = dict(OPT_RE.findall(m.group("opts")))
        unknown = set(opts) - {"section", "table", "rows"}
        if unknown:
            raise MedseError(f"line {line}: unknown include option(s) {sorted(unknown)} (allowed: section, table, rows)",
                             page)
        blocks.append(Block(page, line, m.group("path"), opts, start, stop + 1))
        pos = stop
    return blocks


def _section(body: str, heading: str, src: Path) -> str:
    lines = body.splitlines()
    for i, ln in enumerate(lines):
        m = re.match(r"^(#+)\s+(.*?)\s*$", ln)
        if m and m.group(2) == heading:
            level = len(m.group(1))
            out = []
            for nxt in lines[i + 1 :]:
                h = re.match(r"^(#+)\s", nxt)
                if h and len(h.group(1)) <= level:
                    break
                out.append(nxt)
            return "\n".join(out).strip("\n")
    raise MedseError(f"no heading {heading!r}", src)


def _rows(body: str, pattern: str) -> str:
    rx = re.compile(pattern)
    out = []
    for ln in body.splitlines():
        is_row = ln.startswith("|")
        is_header = is_row and (not out or not out[-1].startswith("|") or re.fullmatch(r"[|:\- ]+", ln))
        if not is_row or is_header or rx.search(ln):
            out.append(ln)
    return "\n".join(out)


def _table(body: str, number: str, src: Path) -> str:
    tables: list[list[str]] = []
    prev = False
    for ln in body.splitlines():
        row = ln.startswith("|")
        if row and not prev:
            tables.append([])
        if row:
            tables[-1].append(ln)
        prev = row
    if not number.isdigit() or not 1 <= int(number) <= len(tables):
        raise MedseError(f"table=\"{number}\": the selection has {len(tables)} table(s)", src)
    return "\n".join(tables[int(number) - 1])


def _separate_tables(body: str) -> str:
    """A blank line before every table that directly follows a text line (Markdown would not start a table)."""
    out: list[str] = []
    for ln in body.splitlines():
        if ln.startswith("|") and out and out[-1].strip() and not out[-1].startswith("|"):
            out.append("")
        out.append(ln)
    return "\n".join(out)


def render(block: Block, repo: Path) -> str:
    src = repo / block.source
    _, body = parse_result(src)
    if "section" in block.options:
        body = _section(body, block.options["section"], src)
    if "table" in block.options:
        body = _table(body, block.options["table"], src)
    if "rows" in block.options:
        body = _rows(body, block.options["rows"])
    body = _separate_tables(body).strip("\n")
    if not body:
        raise MedseError(f"{block.page.name} line {block.line}: the include selects nothing", src)
    return body + "\n"


def pages(repo: Path) -> list[Path]:
    found: set[Path] = set()
    for pattern in PAGE_GLOBS:
        found.update(p for p in repo.glob(pattern) if p.is_file())
    skip = [repo / d for d in SOURCE_DIRS]
    return sorted(p for p in found if not any(s in p.parents for s in skip))


def sync(repo: Path = REPO, check: bool = False) -> list[str]:
    """Rewrite (or, with ``check``, only compare) every generated block; return one line per problem."""
    problems: list[str] = []
    for page in pages(repo):
        text = page.read_text(encoding="utf-8")
        if "medse:include" not in text:
            continue
        rel = page.relative_to(repo)
        try:
            blocks = find_blocks(rel, text)
        except MedseError as e:
            problems.append(str(e))
            continue
        new, last = [], 0
        for b in blocks:
            try:
                content = render(b, repo)
            except MedseError as e:
                problems.append(f"{rel}:{b.line}: " + str(e).replace(f"{repo}{os.sep}", ""))
                content = text[b.start : b.stop]
            if check and content != text[b.start : b.stop]:
                problems.append(f"{rel}:{b.line}: block from {b.source} is stale "
                                "(run `python -m medse.utils.docsync`)")
            new += [text[last : b.start], content]
            last = b.stop
        new.append(text[last:])
        updated = "".join(new)
        if not check and updated != text:
            atomic_write_text(page, updated)
    return problems


# ----------------------------------------------------------------------------- making results files
@dataclass
class Source:
    """How one results file is made: ``commands`` run in the repo root (``{work}`` = its work folder, ``{py}`` =
    this Python, ``{medse}`` = the medse CLI of this Python); the body is the last command's stdout, or the
    file ``output`` (relative to the repo root, ``{work}`` allowed), or what ``formatter(work)`` returns.
    ``copies`` maps produced files (a ``*`` in the name must match exactly one) to repo paths (figures)."""

    dest: str
    commands: list[str]
    output: str | None = None
    formatter: Callable[[Path], str] | None = None
    copies: dict[str, str] = field(default_factory=dict)
    note: str = ""
    wall_json: str | None = None  # with --no-run: a JSON file in the work folder whose "wall_s" is the wall time


def _demo_configs_table(work: Path) -> str:
    import yaml

    rows = ["| config | network | attention | best validation foreground Dice | at epoch | epochs |",
            "|---|---|---|---:|---:|---:|"]
    for name in ("demo", "demo_2d"):
        run = work / name
        metrics = run / "metrics.csv"
        if not metrics.is_file():
            raise MedseError("no metrics.csv: the training command did not finish", metrics)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        recs = [r for r in csv.DictReader(metrics.open()) if r.get("val_dice_mean") not in (None, "", "nan")]
        if not recs:
            raise MedseError("no validation Dice recorded", metrics)
        best = max(recs, key=lambda r: float(r["val_dice_mean"]))
        model = cfg["model"]
        rows.append(f"| `configs/{name}.yaml` | {model['spatial_dims']}D {model['name']} | {model['attention']} | "
                    f"{float(best['val_dice_mean']):.3f} | {best['epoch']} | {cfg['train']['epochs']} |")
    return "\n".join(rows) + "\n\nValidation foreground Dice: mean over the foreground labels of the validation " \
                             "cases (`val_dice_mean` in each run's `metrics.csv`).\n"


def resnet50v2_counts_table() -> str:
    """Parameter counts of the full-size ResNet50V2 (Keras's convention) with and without SE, built on the meta
    device (no weights are initialised)."""
    import torch

    from medse.networks.resnet import ResNet50V2, keras_param_count

    def build(**kw):
        with torch.device("meta"):
            return ResNet50V2(spatial_dims=2, in_channels=3, **kw)

    full = build(out_channels=1000)
    counts = keras_param_count(full)
    learnable = sum(p.numel() for p in full.parameters())
    headless = keras_param_count(build(out_channels=0))["total"]
    se = sum(p.numel() for p in build(out_channels=1000, attention="se").parameters()) - learnable
    rows = [("learnable parameters (`sum(p.numel())`)", learnable),
            ("BatchNorm moving mean + variance (Keras's \"non-trainable params\"; PyTorch buffers)",
             counts["non_trainable"]),
            ("Keras total (`keras_param_count(model)[\"total\"]`)", counts["total"]),
            ("Keras total without the head", headless),
            ("SE (r = 16, both FC layers with bias) added", se)]
    lines = ["| count (1000-class head, 3 input channels) | value |", "|---|---:|"]
    lines += [f"| {name} | {value:,} |" for name, value in rows]
    return "\n".join(lines) + "\n"


def _classifier(seed: int) -> Source:
    data = "{work}/data"
    seed_set = f" train.seed={seed}"
    cmds = [f"{{medse}} synth-cls --out {data} --n-images 800 --size 96 --seed 0"]
    for name, cfg in (("base", "classifier_cpu_demo"), ("se", "classifier_se_cpu_demo")):
        cmds.append(f"{{medse}} classify train --config configs/{cfg}.yaml --output {{work}}/{name} "
                    f"data.root={data}/manifest.csv{seed_set}")
    cmds.append("{medse} classify compare --baseline {work}/base --candidate {work}/se --output {work}/compare")
    return Source(f"docs/results/classifier_seed{seed}.md", cmds, output="{work}/compare/comparison.md")


SOURCES: dict[str, Source] = {
    "demo_table": Source(
        "docs/results/demo_table.md", ["{medse} demo --output {work}"], output="{work}/table.md",
        wall_json="demo_summary.json",
        copies={"{work}/figures/dice_boxplot.png": "docs/images/demo_dice_boxplot.png",
                "{work}/figures/gain.png": "docs/images/demo_gain.png",
                "{work}/figures/overlay.png": "docs/images/demo_overlay.png",
                "{work}/figures/gates/*_gates.png": "docs/images/demo_gates.png"}),
    "demo_configs": Source(
        "docs/results/demo_configs.md",
        ["{medse} synth --out {work}/data",
         "{medse} train --config configs/demo.yaml --output {work}/demo data.root={work}/data",
         "{medse} train --config configs/demo_2d.yaml --output {work}/demo_2d data.root={work}/data"],
        formatter=_demo_configs_table),
    "classifier_seed0": _classifier(0),
    "classifier_seed1": _classifier(1),
    "models_2d": Source(
        "docs/results/models_2d.md", ["{medse} models --size 64 --dims 2 --attention scse,scse_smp --markdown"]),
    "models_demo_unet": Source(
        "docs/results/models_demo_unet.md",
        ["{medse} models --size 64 --dims 3 --networks unet --attention cse,sse,scse,scse_smp "
         "--arch 'unet.channels=[16,32,64,128]' --out-channels 7 --markdown"]),
    "networks_excerpt": Source(
        "docs/results/networks_excerpt.md",
        ["{medse} models --size 64 --networks unet,fc_densenet,sdnet,quicknat --attention cse,sse,scse --markdown"]),
    "networks_monai_3d": Source(
        "docs/results/networks_monai_3d.md",
        ["{medse} models --size 64 --dims 3 --networks dynunet,segresnet,unetr --attention cse,sse,scse,eca,simam "
         "--attention encoder=cse,decoder=scse --markdown"]),
    "networks_tokens": Source(
        "docs/results/networks_tokens.md",
        ["{medse} models --size 64 --dims 3 --networks swinunetr,unetr --attention cse,scse --attention tokens=cse "
         "--attention encoder=scse,decoder=scse,tokens=cse --markdown"]),
    "resnet50v2_counts": Source(
        "docs/results/resnet50v2_counts.md", ["{py} -m medse.utils.docsync table resnet50v2_counts"]),
    "blocks_list": Source(
        "docs/results/blocks_list.md", ["{medse} blocks --list --markdown"],
        note="Every registered attention block, from the registry (medse.attention.list_attention)."),
    "blocks_table": Source(
        "docs/results/blocks_table.md", ["{medse} blocks --channels 64 --size 32 --markdown"]),
    "blocks_cpu_run2": Source(
        "benchmarks/results/blocks_cpu_run2.md",
        ["{py} benchmarks/bench_blocks.py --repeats 3 --compile --output {work}/out.md"], output="{work}/out.md"),
    "networks_cpu_1thread": Source(
        "benchmarks/results/networks_cpu_1thread.md",
        ["{py} benchmarks/bench_networks.py --networks unet --threads 1 --repeats 9 --blocks 'scse (max)' ca simam "
         "--output {work}/out.md"], output="{work}/out.md"),
    "search_demo": Source(
        "docs/results/search_demo.md",
        ["{medse} search --config pipelines/search_demo.yaml --output {work}"], output="{work}/report.md"),
    "nnunet_smoke": Source(
        "docs/results/nnunet_smoke.md",
        ["OMP_NUM_THREADS=1 nnUNet_n_proc_DA=1 nnUNet_def_n_proc=1 .venv-nnunet/bin/python -m pytest -q -p "
         "no:cacheprovider -m 'nnunet and slow' tests/test_nnunet_pipeline.py 2>&1 | tail -n 1"],
        note="The slow end-to-end nnU-Net test (`make test-nnunet-slow`): tiny synthetic dataset in nnU-Net's raw "
             "layout -> plan and preprocess -> derived scse plans -> the short trainer for baseline and scse on "
             "fold 0 -> nnUNetv2_predict -> medse nnunet compare. Its wall time is in the header; the line below "
             "is pytest's summary."),
    "blocks_cpu_issue14": Source(
        "benchmarks/results/blocks_cpu_issue14.md",
        ["{py} benchmarks/bench_blocks.py --whole --repeats 5 --output {work}/out.md"], output="{work}/out.md"),
    "blocks_cpu_busy": Source(
        "benchmarks/results/blocks_cpu_busy.md",
        ["{py} benchmarks/bench_blocks.py --whole --busy 4 --dims 3 --blocks scse simam --repeats 5 "
         "--output {work}/out.md"], output="{work}/out.md"),
    "blocks_cpu_small": Source(
        "benchmarks/results/blocks_cpu_small.md",
        ["{py} benchmarks/bench_blocks.py --whole --repeats 5 --shapes 1x16x32x32x32 --output {work}/out.md"],
        output="{work}/out.md"),
    "step_cpu": Source(
        "benchmarks/results/step_cpu.md",
        ["{py} benchmarks/bench_step.py --networks realistic demo --rounds 9 --output {work}/out.md"],
        output="{work}/out.md"),
    "step_cpu_nnunet": Source(
        "benchmarks/results/step_cpu_nnunet.md",
        [".venv-nnunet/bin/python benchmarks/bench_step.py --networks nnunet --size 64 --rounds 9 "
         "--output {work}/out.md"], output="{work}/out.md"),
    "memory_cpu": Source(
        "benchmarks/results/memory_cpu.md",
        ["{py} benchmarks/bench_memory.py --networks realistic demo --plain --output {work}/out.md"],
        output="{work}/out.md"),
    "inference_cpu": Source(
        "benchmarks/results/inference_cpu.md",
        ["{py} benchmarks/bench_inference.py --monai-large --output {work}/out.md"], output="{work}/out.md"),
}


TABLES: dict[str, Callable[[], str]] = {"resnet50v2_counts": resnet50v2_counts_table}


def _expand(s: str, work: Path) -> str:
    medse_cli = Path(sys.executable).with_name("medse")
    return (s.replace("{work}", str(work)).replace("{py}", shlex.quote(sys.executable))
            .replace("{medse}", shlex.quote(str(medse_cli)) if medse_cli.is_file() else "medse"))


def _shown(work: Path) -> Path:
    """The work folder as results files name it: relative to the repository when inside it."""
    try:
        return Path(work).resolve().relative_to(REPO)
    except ValueError:
        return Path(work)


def _display(s: str, work: Path) -> str:
    """The command as the results file records it: ``python``/``medse``, the work folder relative to the repo."""
    return s.replace("{py}", "python").replace("{medse}", "medse").replace("{work}", str(_shown(work)))


def _recorded_commit(work: Path) -> str | None:
    commits = set()
    for info in work.rglob("run_info.json"):
        try:
            c = json.loads(info.read_text()).get("git_commit")
        except (OSError, ValueError):
            continue
        if c:
            commits.add(c)
    return ", ".join(sorted(commits)) if commits else None


def generate(name: str, repo: Path = REPO, work: Path | None = None, run: bool = True,
             log: Callable[[str], None] = print) -> Path:
    """Run the commands of ``SOURCES[name]`` (or, ``run=False``, reuse their output in ``work``) and write the
    results file with its provenance header; return its path."""
    if name not in SOURCES:
        from medse.utils.errors import did_you_mean

        raise MedseError(f"unknown results name '{name}'.{did_you_mean(name, SOURCES)} "
                         f"Known: {', '.join(SOURCES)}.")
    src = SOURCES[name]
    work = (work or repo / "runs" / "docsync" / name).resolve()
    commit = current_commit(repo)
    walls = []
    stdout = ""
    if run:
        if work.exists() and any(work.iterdir()):
            if not (work / MARKER).is_file():
                raise MedseError("work folder exists and was not made by docsync: give an empty or new folder", work)
            shutil.rmtree(work)  # a previous docsync run of the same results: start clean
        work.mkdir(parents=True, exist_ok=True)
        (work / MARKER).write_text(f"{name}\n")
        for cmd in src.commands:
            line = _expand(cmd, work)
            log(f"$ {_display(cmd, work)}")
            t0 = time.perf_counter()
            proc = subprocess.run(line, shell=True, cwd=repo, stdout=subprocess.PIPE, text=True)
            walls.append(time.perf_counter() - t0)
            if proc.returncode:
                raise MedseError(f"command failed with exit code {proc.returncode}: {_display(cmd, work)}", work)
            stdout = proc.stdout
    else:
        if not work.is_dir():
            raise MedseError("work folder does not exist (run without --no-run first)", work)
        commit = _recorded_commit(work) or commit
        if src.output is None and src.formatter is None:
            raise MedseError(f"'{name}' is taken from the command's stdout: it cannot be recorded with --no-run", work)
    machine = machine_description()
    if src.formatter is not None:
        body = src.formatter(work)
    elif src.output is not None:
        out = Path(_expand(src.output, work))
        if not out.is_file():
            raise MedseError(f"the commands did not write {out.name}", out)
        body = out.read_text(encoding="utf-8")
        if body.startswith(HEADER_START):  # a results file with a header of its own: keep the inner body
            inner, body = parse_result(out)
            # a benchmark's machine line says more (threads, device, the load average at its start)
            if inner["machine"].startswith(machine_description()):
                machine = inner["machine"]
    else:
        body = stdout
    fields = {
        "command": " && ".join(_display(c, work) for c in src.commands),
        "commit": commit,
        "machine": machine,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if walls:
        fields["wall"] = ", ".join(f"{w:.0f} s" for w in walls)
    else:
        fields["recorded"] = f"from the existing output in {_shown(work)} (commands not rerun)"
        if src.wall_json and (work / src.wall_json).is_file():
            wall_s = json.loads((work / src.wall_json).read_text()).get("wall_s")
            if isinstance(wall_s, (int, float)):
                fields["wall"] = f"{wall_s:.0f} s (from {src.wall_json})"
    if src.note:
        fields["note"] = src.note
    found = {}
    for a, b in src.copies.items():  # check every copy before writing any
        pattern = Path(_expand(a, work))
        matches = sorted(pattern.parent.glob(pattern.name)) if "*" in pattern.name else [pattern]
        if len(matches) != 1 or not matches[0].is_file():
            raise MedseError(f"the commands did not write exactly one {pattern.name}", pattern.parent)
        found[matches[0]] = repo / b
    for s, b in found.items():
        atomic_write_bytes(b, s.read_bytes())
    dest = repo / src.dest
    atomic_write_text(dest, format_header(fields) + "\n" + body.strip("\n") + "\n")
    log(f"wrote {src.dest}")
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medse.utils.docsync", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 naming each stale block")
    ap.add_argument("--repo", type=Path, default=REPO, help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="cmd")
    g = sub.add_parser("generate", help="run a results file's commands and write it (then syncs the pages)")
    g.add_argument("names", nargs="+", metavar="NAME", help=f"one of: {', '.join(SOURCES)}")
    g.add_argument("--work", type=Path, help="work folder (default runs/docsync/NAME)")
    g.add_argument("--no-run", action="store_true", help="record the existing output in --work")
    sub.add_parser("list", help="list the results files and their commands")
    t = sub.add_parser("table", help="print one of the tables computed here (no files written)")
    t.add_argument("table", choices=sorted(TABLES))
    args = ap.parse_args(argv)
    repo = args.repo.resolve()
    try:
        if args.cmd == "list":
            for n, s in SOURCES.items():
                print(f"{n}: {s.dest}\n    " + "\n    ".join(_display(c, Path('runs/docsync') / n) for c in s.commands))
            return 0
        if args.cmd == "table":
            print(TABLES[args.table](), end="")
            return 0
        if args.cmd == "generate":
            if args.work and len(args.names) > 1:
                raise MedseError("--work takes one results name at a time", args.work)
            for n in args.names:
                generate(n, repo, args.work, run=not args.no_run)
        problems = sync(repo, check=args.check)
    except MedseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    if not args.check:
        print("generated blocks are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
