"""Keep every number in README.md and docs/ tied to a results file that a command in the repo writes.

Results files (``docs/results/<name>.md``, ``benchmarks/results/<name>.md``) start with a provenance header::

    <!-- medse:result
    command: medse models --size 64 --dims 2 --attention scse,scse_smp --markdown
    commit: 1163141... (the code that produced the numbers; "+dirty" = with uncommitted changes: --check fails)
    environment: torch 2.13.0+cpu, MONAI 1.6.1, torchio ..., numpy ..., scipy ..., nibabel ..., SimpleITK ...,
        Python 3.11.7; CPU: <model>, 2 logical CPUs; threads: ...; load average at start: 0.12; Linux-...
    date: 2026-12-01 21:40 UTC
    wall: 3.2 s
    sources: sha256 <hash> over 57 files
    source_files: medse/__init__.py@<12 hex> medse/attention/cse.py@<12 hex> ... configs/demo.yaml@<12 hex>
    -->

``sources`` fingerprints what the command used: every repository ``.py`` file its Python processes imported
(recorded at exit by a ``sitecustomize`` hook that ``generate`` puts on PYTHONPATH; the benchmark scripts record
their own ``sys.modules``), plus the configs, pipelines and scripts named in the command (and the files a named
YAML names). ``--check`` recomputes it and names the results file and each changed source.

Markdown pages copy (parts of) them between markers::

    <!-- medse:include docs/results/models_2d.md -->
    ... generated, do not edit ...
    <!-- medse:end -->

Options in the opening marker: ``section="Heading text"`` (only that heading's part, up to the next heading of
the same or a higher level, the heading itself left out), ``table="N"`` (only the N-th table of that) and
``rows="regex"`` (table rows kept only if they match; header and separator rows, and non-table lines, are kept),
applied in that order. A table that directly follows a text line gets a blank line before it.

Prose numbers. Outside include blocks, code and comments, README.md and docs/*.md may not hand-type a
measured figure: a decimal (``0.738``, ``2.5x``), a percentage, a thousands-grouped count or a number with a
unit of time or memory (``157 s``, ``11 MiB``). A paragraph that states a definition, a setting or a paper's
figure says so with a marker anywhere in it (a paragraph = lines up to the next blank line; a table counts as
one)::

    <!-- medse:prose-number definition: the targets of issue 14 -->
    <!-- medse:prose-number paper: Roy et al. 2018, Table 2 -->

(kinds: ``definition``, ``setting``, ``paper``; a reason after the colon is required). In a paragraph about a
target, the verdict words "met" and "missed" may not appear outside include blocks: a verdict is a cell a
benchmark script wrote (``medse.utils.benchstats.verdict``), next to the figures and range it rests on.

A repository tool, not part of the installed package (it runs ``benchmarks/`` and ``.venv-nnunet``): run it from
the repository root. It imports ``medse``; ``medse`` never imports it.

Commands::

    python -m tools.docsync                 # rewrite every generated block from its file
    python -m tools.docsync --check         # exit 1 naming each stale block, results file or prose number
    python -m tools.docsync generate NAME   # run NAME's commands and write its results file (clean tree)
    python -m tools.docsync generate --stale [--skip-timing] [--skip-nnunet]   # every stale results file
    python -m tools.docsync generate NAME --work DIR --no-run   # record an existing output folder
    python -m tools.docsync list            # the results files this script knows how to make
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

REPO = Path(__file__).resolve().parents[1]
HEADER_START = "<!-- medse:result"
HEADER_KEYS = ("command", "commit", "date")  # and "environment" (or the older "machine")
FRESH_KEYS = ("command", "commit", "environment", "date", "sources", "source_files")  # what --check requires
INCLUDE_RE = re.compile(r"^<!-- medse:include (?P<path>\S+)(?P<opts>(?: \w+=\"[^\"]*\")*) -->[ \t]*$", re.M)
OPT_RE = re.compile(r"(\w+)=\"([^\"]*)\"")
END = "<!-- medse:end -->"
# pages whose generated blocks are kept in sync (results files themselves are sources, never targets)
PAGE_GLOBS = ("README.md", "docs/**/*.md", "benchmarks/README.md")
SOURCE_DIRS = ("docs/results", "benchmarks/results")
MARKER = ".medse-docsync"  # in a work folder: made by generate, so a rerun may clear it


# ----------------------------------------------------------------------------- provenance header
def machine_description() -> str:
    """The short machine line of older headers (platform, CPUs, torch, Python); new headers record
    ``environment`` (``medse.utils.runinfo.environment_description``)."""
    from medse.utils.runinfo import package_version

    return (f"{platform.platform()}, {os.cpu_count()} CPUs, torch {package_version('torch')}, "
            f"Python {platform.python_version()}")


def current_commit(repo: Path = REPO) -> str:
    from medse.utils.runinfo import git_commit

    return git_commit(repo) or "unknown (not a git checkout)"


def git_status(repo: Path = REPO) -> dict[str, str] | None:
    """{path: two-letter status} of every changed or untracked file (``git status --porcelain``); None outside
    a git checkout."""
    try:
        out = subprocess.run(["git", "status", "--porcelain=v1", "-z", "--untracked-files=all"], cwd=repo,
                             capture_output=True, timeout=30, check=True).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.SubprocessError):
        return None
    status: dict[str, str] = {}
    entries = iter(out.split("\0"))
    for e in entries:
        if len(e) > 3:
            status[e[3:]] = e[:2]
            if e[0] in "RC":  # a rename's second field is its old path
                next(entries, None)
    return status


def _is_code(path: str) -> bool:
    """Whether an uncommitted change to ``path`` can change what a command computes (pages and figures cannot)."""
    return not path.endswith(".md") and not path.startswith(("docs/images/", "runs/"))


def code_commit(repo: Path = REPO, files: Sequence[str] | None = None) -> tuple[str, list[str]]:
    """(commit of HEAD with "+dirty" when the code differs from it, the differing files). With ``files`` (a
    command's fingerprinted sources) only those count; without, every changed tracked file and every untracked
    Python or YAML file except Markdown pages and figures (which ``generate`` itself rewrites)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)", ["(not a git checkout)"]
    status = git_status(repo) or {}
    if files is not None:
        dirty = sorted(f for f in files if f in status)
    else:
        dirty = sorted(f for f, st in status.items()
                       if _is_code(f) and (st != "??" or f.endswith((".py", ".yaml", ".yml"))))
    return sha + ("+dirty" if dirty else ""), dirty


def _few(items: Sequence[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


# The provenance machinery itself: it writes headers, not numbers, so a change to it does not make every results
# file stale. A results file whose numbers it computes names it in ``Source.sources``.
PROVENANCE_FILES = frozenset({"tools/__init__.py", "tools/docsync.py", "medse/utils/runinfo.py"})


def provenance_fields(command: str, files: Sequence[str], environment: str, repo: Path = REPO,
                      wall: str | None = None, extra: Sequence[str] = ()) -> dict[str, str]:
    """The header fields every results file records: the command, the commit (``+dirty`` if a fingerprinted
    file differs from it), the environment, the date, the wall time and the source fingerprint (``files`` less
    the provenance machinery, plus what the command names, plus ``extra``)."""
    from medse.utils.runinfo import files_named_in, fingerprint_fields

    used = sorted((set(files) - PROVENANCE_FILES) | set(files_named_in(command, repo)) | set(extra))
    fields = {"command": command, "commit": code_commit(repo, used)[0], "environment": environment,
              "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if wall:
        fields["wall"] = wall
    fields.update(fingerprint_fields(used, repo))
    return fields


def benchmark_header(script: str, argv: Sequence[str], device: str | None = None, load: float | None = None,
                     extra_files: Sequence[str] = (), wall_s: float | None = None) -> str:
    """The provenance header a benchmark script writes at the top of its results file: what ``generate``
    records, with the repository files this process (and any worker that reported ``extra_files``) imported.
    ``load``: the load average when the benchmark started. A run from uncommitted code is marked ``+dirty``
    (``--check`` rejects it) rather than refused: refusing at the end would throw the measurement away."""
    from medse.utils.runinfo import FINGERPRINT_ENV, environment_description, imported_repo_files, read_sources_log

    files = set(imported_repo_files(REPO)) | set(extra_files)
    if os.environ.get(FINGERPRINT_ENV):  # run by generate: its other processes' imports too
        files |= set(read_sources_log(Path(os.environ[FINGERPRINT_ENV]), REPO))
    command = shlex.join(["python", f"benchmarks/{script}", *argv])
    return format_header(provenance_fields(command, sorted(files), environment_description(device=device, load=load),
                                           REPO, wall=f"{wall_s:.0f} s" if wall_s is not None else None))


def format_header(fields: dict[str, str]) -> str:
    missing = [k for k in HEADER_KEYS if not fields.get(k)]
    if not fields.get("environment") and not fields.get("machine"):
        missing.append("environment")
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
        raise MedseError("results file does not exist (make it with `python -m tools.docsync generate`)",
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
    if "environment" not in fields and "machine" not in fields:
        missing.append("environment")
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
                                "(run `python -m tools.docsync`)")
            new += [text[last : b.start], content]
            last = b.stop
        new.append(text[last:])
        updated = "".join(new)
        if not check and updated != text:
            atomic_write_text(page, updated)
    return problems


# ----------------------------------------------------------------------------- freshness of results files
def results_files(repo: Path) -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (repo / d).glob("*.md"))


def included_sources(repo: Path) -> set[str]:
    """The results files some page includes (repository-relative)."""
    found = set()
    for page in pages(repo):
        text = page.read_text(encoding="utf-8")
        try:
            found |= {b.source for b in find_blocks(page.relative_to(repo), text)}
        except MedseError:
            continue  # reported by sync
    return found


def stale_results(repo: Path = REPO) -> dict[str, str]:
    """{results file: why it must be regenerated}: no source fingerprint (made before issue 21, or recorded
    with --no-run), made from uncommitted code, no environment line, or a fingerprinted source changed since."""
    from medse.utils.runinfo import changed_sources

    stale: dict[str, str] = {}
    for f in results_files(repo):
        rel = f.relative_to(repo).as_posix()
        try:
            fields, _ = parse_result(f)
        except MedseError as e:
            stale[rel] = str(e).replace(f"{repo}{os.sep}", "")
            continue
        commit = fields.get("commit", "")
        changed = changed_sources(fields, repo)
        if changed is None:
            stale[rel] = "no source fingerprint (made before provenance v2, or recorded with --no-run)"
        elif changed:
            stale[rel] = f"{_few(changed)} changed since it was made"
        elif "+dirty" in commit or not re.fullmatch(r"[0-9a-f]{7,40}", commit):
            stale[rel] = f"commit {commit!r} is not a clean commit (made from uncommitted code)"
        elif "environment" not in fields:
            stale[rel] = "no environment line (package versions, CPU, threads, load)"
    return stale


def results_problems(repo: Path = REPO) -> list[str]:
    """One line per results file that --check rejects (stale, unincluded or without a docsync source), and a
    last line saying how to regenerate the stale ones."""
    stale = stale_results(repo)
    dests = {s.dest: n for n, s in SOURCES.items()}
    included = included_sources(repo)
    problems = []
    for f in results_files(repo):
        rel = f.relative_to(repo).as_posix()
        if rel not in included:
            problems.append(f"{rel}: nothing includes it (delete it, or include it in a page)")
        elif rel in stale:
            how = f"generate {dests[rel]}" if rel in dests else "no docsync source: add one to SOURCES"
            problems.append(f"{rel}: stale: {stale[rel]} ({how})")
    if any(rel in included for rel in stale):
        problems.append(f"{sum(rel in included for rel in stale)} results file(s) stale: regenerate them all with "
                        "`python -m tools.docsync generate --stale` (on a clean, committed tree; "
                        "`--skip-timing` leaves the benchmarks for a quiet machine)")
    return problems


# ----------------------------------------------------------------------------- numbers in prose
PROSE_GLOBS = ("README.md", "docs/*.md", "benchmarks/README.md")
# pages written whole by a command and checked by their own test (not prose)
GENERATED_PAGES = {"docs/blocks.md": "medse blocks --docs --output docs/blocks.md (tests/test_attention_registry.py)"}
PROSE_MARK_RE = re.compile(r"<!-- medse:prose-number (definition|setting|paper): *[^ \-][^>]*-->")
_ANY_MARK_RE = re.compile(r"<!-- medse:prose-number\b[^>]*-->")
_NUMBER_RE = re.compile(
    r"(?<![\w.])(?:\d{1,3}(?:,\d{3})+|\d+\.\d+(?:\.\d+)*|\d+)"
    r"(?:\s?(%|ms|s|min|h|MiB|GiB|KiB|MB|GB|kB|seconds|minutes|hours)\b|(?=%))?")
# a version number, an arXiv id or a figure/issue reference is not a measurement
_NOT_A_FIGURE_BEFORE = re.compile(r"(?i)(python|torch|pytorch|monai|numpy|scipy|nibabel|simpleitk|torchio|nnunetv2|"
                                  r"nnu-net|cuda|version|release|v|issue|arxiv:|doi:?|section|table|figure|eq\.?)\s*$")
_VERDICT_RE = re.compile(r"(?i)\b(met|missed)\b")
_TARGET_RE = re.compile(r"(?i)\btargets?\b")  # a verdict word counts in a paragraph about targets


def _blank(text: str, a: int, b: int) -> str:
    """``text`` with [a, b) replaced by spaces, newlines kept (so line numbers stay)."""
    return text[:a] + re.sub(r"[^\n]", " ", text[a:b]) + text[b:]


def _prose_only(page: Path, text: str) -> str:
    """The page with include blocks, fenced code, inline code, link targets and HTML comments blanked."""
    for blk in reversed(find_blocks(page, text)):
        text = _blank(text, blk.start, blk.stop)
    code_span = re.compile(r"`(?:[^`\n]|\n(?![ \t]*\n))+`")  # may wrap lines, never a paragraph
    for rx in (re.compile(r"^```.*?^```", re.S | re.M), re.compile(r"<!--.*?-->", re.S), code_span,
               re.compile(r"\]\([^)\s]*\)")):
        for m in reversed(list(rx.finditer(text))):
            text = _blank(text, m.start(), m.end())
    return text


def measured_numbers(line: str) -> list[str]:
    """The figures in a prose line that look measured: decimals, percentages, thousands-grouped counts and
    numbers with a unit of time or memory (not versions, arXiv ids, plain integers, shapes or ``3x3``)."""
    found = []
    for m in _NUMBER_RE.finditer(line):
        tok = m.group(0)
        if not ("." in tok or "," in tok or m.group(1) or line[m.end():m.end() + 1] == "%"):
            continue
        if re.fullmatch(r"\d+\.\d+\.\d+.*", tok) or _NOT_A_FIGURE_BEFORE.search(line[:m.start()]):
            continue
        if (line[m.end():].lstrip().startswith(("% CI", "CI")) or re.match(r"-75%", line[m.end():])
                or line[:m.start()].endswith("25-")):
            continue  # "95% CI" and "25-75%" name a statistic, they do not report one
        found.append(tok + ("%" if line[m.end():m.end() + 1] == "%" else ""))
    return found


def prose_problems(repo: Path = REPO) -> list[str]:
    """Hand-typed figures and verdict words in README/docs prose (see the module's "Prose numbers")."""
    problems = []
    found: set[Path] = set()
    for pattern in PROSE_GLOBS:
        found.update(p for p in repo.glob(pattern) if p.is_file())
    for page in sorted(found):
        rel = page.relative_to(repo)
        if rel.as_posix() in GENERATED_PAGES or any(rel.as_posix().startswith(d + "/") for d in SOURCE_DIRS):
            continue
        text = page.read_text(encoding="utf-8")
        try:
            prose = _prose_only(rel, text)
        except MedseError:
            continue  # reported by sync
        raw_lines, lines = text.splitlines(), prose.splitlines()
        para_start = 0
        for i, line in enumerate(lines + [""]):
            if line.strip() or (i < len(raw_lines) and raw_lines[i].strip()):
                continue
            para = range(para_start, i)  # one paragraph: lines up to a blank line
            para_start = i + 1
            marked = any((m := _ANY_MARK_RE.search(raw_lines[j])) and PROSE_MARK_RE.fullmatch(m.group(0))
                         for j in para)
            about_targets = any(_TARGET_RE.search(lines[j]) for j in para)
            for j in para:
                m = _ANY_MARK_RE.search(raw_lines[j])
                if m and not PROSE_MARK_RE.fullmatch(m.group(0)):
                    problems.append(f"{rel}:{j + 1}: malformed marker {m.group(0)!r} (use '<!-- medse:prose-number "
                                    "definition|setting|paper: reason -->')")
                if not marked:
                    nums = measured_numbers(lines[j])
                    if nums:
                        problems.append(f"{rel}:{j + 1}: hand-typed figure(s) {', '.join(nums)} in prose: include "
                                        "them from a results file, or mark the paragraph '<!-- medse:prose-number "
                                        "definition|setting|paper: reason -->'")
                v = _VERDICT_RE.search(lines[j])
                if v and about_targets:
                    problems.append(f"{rel}:{j + 1}: verdict word {v.group(0)!r} outside an include block: verdicts "
                                    "come from the benchmark's verdict cells (include the table that holds them)")
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
    timing: bool = False  # its numbers are timings (besides every benchmarks/ file): run it on a quiet machine
    sources: tuple[str, ...] = ()  # fingerprinted besides what the commands import (e.g. docsync's own formatter)

    @property
    def is_timing(self) -> bool:
        return self.timing or self.dest.startswith("benchmarks/")

    @property
    def needs_nnunet(self) -> bool:
        return any(".venv-nnunet" in c for c in self.commands)


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
        formatter=_demo_configs_table, sources=("tools/docsync.py",)),
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
    "models_new_blocks": Source(
        "docs/results/models_new_blocks.md",
        ["{medse} models --size 64 --networks unet,fc_densenet,sdnet,quicknat --attention grn,cbam,ela,ema "
         "--markdown"]),
    "networks_monai_3d": Source(
        "docs/results/networks_monai_3d.md",
        ["{medse} models --size 64 --dims 3 --networks dynunet,segresnet,unetr --attention cse,sse,scse,eca,simam "
         "--attention encoder=cse,decoder=scse --markdown"]),
    "networks_tokens": Source(
        "docs/results/networks_tokens.md",
        ["{medse} models --size 64 --dims 3 --networks swinunetr,unetr --attention cse,scse --attention tokens=cse "
         "--attention encoder=scse,decoder=scse,tokens=cse --markdown"]),
    "resnet50v2_counts": Source(
        "docs/results/resnet50v2_counts.md", ["{py} -m tools.docsync table resnet50v2_counts"],
        sources=("tools/docsync.py",)),
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
    "networks_cpu_run2": Source(
        "benchmarks/results/networks_cpu_run2.md",
        ["{py} benchmarks/bench_networks.py --repeats 5 --compile --blocks 'scse (max)' ca simam "
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
    "export_cpu": Source(
        "benchmarks/results/export_cpu.md",
        ["{py} benchmarks/bench_export.py --rounds 5 --output {work}/out.md"], output="{work}/out.md", timing=True),
    "step_cpu_compile": Source(
        "benchmarks/results/step_cpu_compile.md",
        ["{py} benchmarks/bench_compile.py --networks realistic --size 32 --threads 1 --rounds 15 "
         "--output {work}/out.md"], output="{work}/out.md", timing=True),
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


def _dirty_error(dirty: Sequence[str], when: str) -> MedseError:
    return MedseError(f"{when} the working tree differs from the last commit in {_few(list(dirty))}: commit "
                      "first (a results file records the commit its numbers came from), or pass --allow-dirty "
                      "(the file is then marked +dirty and --check rejects it)")


def generate(name: str, repo: Path = REPO, work: Path | None = None, run: bool = True,
             log: Callable[[str], None] = print, allow_dirty: bool = False) -> Path:
    """Run the commands of ``SOURCES[name]`` (or, ``run=False``, reuse their output in ``work``) and write the
    results file with its provenance header; return its path. Refuses (``MedseError``) to run from, or record,
    uncommitted code unless ``allow_dirty``."""
    from medse.utils.runinfo import FINGERPRINT_ENV, SITECUSTOMIZE, environment_description, read_sources_log

    if name not in SOURCES:
        from medse.utils.errors import did_you_mean

        raise MedseError(f"unknown results name '{name}'.{did_you_mean(name, SOURCES)} "
                         f"Known: {', '.join(SOURCES)}.")
    src = SOURCES[name]
    work = (work or repo / "runs" / "docsync" / name).resolve()
    head_before, dirty = code_commit(repo)
    if dirty and not allow_dirty:
        raise _dirty_error(dirty, f"generate {name}:")
    walls = []
    stdout = ""
    used: list[str] = []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    threads = os.environ.get("OMP_NUM_THREADS")
    environment = environment_description(threads=f"OMP_NUM_THREADS={threads}" if threads else "torch default",
                                          load=load)
    if run:
        if work.exists() and any(work.iterdir()):
            if not (work / MARKER).is_file():
                raise MedseError("work folder exists and was not made by docsync: give an empty or new folder", work)
            shutil.rmtree(work)  # a previous docsync run of the same results: start clean
        work.mkdir(parents=True, exist_ok=True)
        (work / MARKER).write_text(f"{name}\n")
        hook = work / ".medse-hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
        sources_log = work / ".medse-sources"
        env = {**os.environ, FINGERPRINT_ENV: str(sources_log),
               "PYTHONPATH": os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)}
        for cmd in src.commands:
            line = _expand(cmd, work)
            log(f"$ {_display(cmd, work)}")
            t0 = time.perf_counter()
            proc = subprocess.run(line, shell=True, cwd=repo, stdout=subprocess.PIPE, text=True, env=env)
            walls.append(time.perf_counter() - t0)
            if proc.returncode:
                raise MedseError(f"command failed with exit code {proc.returncode}: {_display(cmd, work)}", work)
            stdout = proc.stdout
        used = read_sources_log(sources_log, repo)
        if not used:
            raise MedseError("the commands imported no repository file (was the sitecustomize hook shadowed?): "
                             "no source fingerprint to record", sources_log)
    else:
        if not work.is_dir():
            raise MedseError("work folder does not exist (run without --no-run first)", work)
        if src.output is None and src.formatter is None:
            raise MedseError(f"'{name}' is taken from the command's stdout: it cannot be recorded with --no-run", work)
    if src.formatter is not None:
        body = src.formatter(work)
    elif src.output is not None:
        out = Path(_expand(src.output, work))
        if not out.is_file():
            raise MedseError(f"the commands did not write {out.name}", out)
        body = out.read_text(encoding="utf-8")
        if body.startswith(HEADER_START):  # a results file with a header of its own: keep the inner body
            inner, body = parse_result(out)
            # a benchmark's environment line says more (its torch threads, the load average at its start)
            environment = inner.get("environment", environment)
            used = sorted(set(used) | {f.rsplit("@", 1)[0] for f in inner.get("source_files", "").split()})
    else:
        body = stdout
    command = " && ".join(_display(c, work) for c in src.commands)
    if run:
        fields = provenance_fields(command, used, environment, repo,
                                   wall=", ".join(f"{w:.0f} s" for w in walls), extra=src.sources)
        moved = fields["commit"].split("+")[0] != head_before.split("+")[0]
        if (fields["commit"].endswith("+dirty") or moved) and not allow_dirty:
            changed = code_commit(repo, [f.rsplit("@", 1)[0] for f in fields["source_files"].split()])[1]
            raise _dirty_error(changed or ["HEAD (a commit was made during the run)"],
                               f"generate {name}: after the run,")
    else:
        commit = _recorded_commit(work) or current_commit(repo)
        if "+dirty" in commit and not allow_dirty:
            raise MedseError(f"the run in this folder recorded commit {commit} (uncommitted code): rerun it from a "
                             "clean tree, or pass --allow-dirty", work)
        fields = {"command": command, "commit": commit, "environment": environment,
                  "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  "recorded": f"from the existing output in {_shown(work)} (commands not rerun, so no source "
                              "fingerprint: --check reports it until it is regenerated)"}
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


def check(repo: Path = REPO) -> list[str]:
    """Everything --check reports: stale blocks, stale or unincluded results files, hand-typed prose figures."""
    return sync(repo, check=True) + prose_problems(repo) + results_problems(repo)


def stale_names(repo: Path = REPO, skip_timing: bool = False, skip_nnunet: bool = False) -> list[str]:
    """The SOURCES names whose results file is stale, or missing while a page includes it, in SOURCES order."""
    stale = stale_results(repo)
    included = included_sources(repo)
    return [n for n, s in SOURCES.items()
            if (s.dest in stale or (s.dest in included and not (repo / s.dest).is_file()))
            and not (skip_timing and s.is_timing) and not (skip_nnunet and s.needs_nnunet)]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.docsync", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="only compare; exit 1 naming each stale block, stale results file and prose figure")
    ap.add_argument("--repo", type=Path, default=REPO, help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="cmd")
    g = sub.add_parser("generate", help="run a results file's commands and write it (then syncs the pages)")
    g.add_argument("names", nargs="*", metavar="NAME", help=f"one of: {', '.join(SOURCES)}")
    g.add_argument("--stale", action="store_true", help="every results file --check calls stale (or missing)")
    g.add_argument("--skip-timing", action="store_true", help="with --stale: leave the timing benchmarks out")
    g.add_argument("--skip-nnunet", action="store_true", help="with --stale: leave out what needs .venv-nnunet")
    g.add_argument("--allow-dirty", action="store_true",
                   help="run from uncommitted code (the file is marked +dirty and --check rejects it)")
    g.add_argument("--work", type=Path, help="work folder (default runs/docsync/NAME)")
    g.add_argument("--no-run", action="store_true", help="record the existing output in --work")
    sub.add_parser("list", help="list the results files, their commands, and which are timings or need nnU-Net")
    t = sub.add_parser("table", help="print one of the tables computed here (no files written)")
    t.add_argument("table", choices=sorted(TABLES))
    args = ap.parse_args(argv)
    repo = args.repo.resolve()
    try:
        if args.cmd == "list":
            for n, s in SOURCES.items():
                tags = ", ".join(t for t, on in (("timing", s.is_timing), ("nnU-Net env", s.needs_nnunet)) if on)
                print(f"{n}: {s.dest}{f' [{tags}]' if tags else ''}\n    "
                      + "\n    ".join(_display(c, Path('runs/docsync') / n) for c in s.commands))
            return 0
        if args.cmd == "table":
            print(TABLES[args.table](), end="")
            return 0
        if args.cmd == "generate":
            names = list(args.names)
            if args.stale:
                names += [n for n in stale_names(repo, args.skip_timing, args.skip_nnunet) if n not in names]
                print(f"stale: {', '.join(names) or 'nothing'}")
            elif not names:
                raise MedseError("generate: give NAME(s) or --stale")
            if args.work and len(names) > 1:
                raise MedseError("--work takes one results name at a time", args.work)
            failed = []
            for n in names:
                try:
                    generate(n, repo, args.work, run=not args.no_run, allow_dirty=args.allow_dirty)
                except MedseError as e:
                    if len(names) == 1:
                        raise
                    print(f"error: {n}: {e}", file=sys.stderr)  # keep going; reported at the end
                    failed.append(n)
            if failed:
                sync(repo)
                print(f"error: {len(failed)} of {len(names)} failed: {', '.join(failed)}", file=sys.stderr)
                return 2
        problems = check(repo) if args.check else sync(repo)
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
