"""README and docs numbers come from results files: provenance headers, include blocks, --check, generate."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from medse.utils.errors import MedseError
from tools import docsync

REPO = Path(__file__).resolve().parents[1]
HEADER = ("<!-- medse:result\ncommand: medse thing --markdown\ncommit: abc123\n"
          "machine: Linux, 2 CPUs, torch 2.13.0, Python 3.11.7\ndate: 2026-12-01 21:00 UTC\n-->\n\n")


def _repo(tmp_path: Path, body: str, page: str) -> Path:
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "t.md").write_text(HEADER + body)
    (tmp_path / "README.md").write_text(page)
    return tmp_path


TABLE = "Caption line.\n\n| a | b |\n|---|---:|\n| x | 1.00 |\n| y | 2.00 |\n"


# ----------------------------------------------------------------------------- the repository itself
def test_repository_pages_match_their_results_files():
    assert docsync.sync(REPO, check=True) == []


def test_repository_passes_the_full_check(capsys):
    """Blocks, results files (fresh fingerprint, clean commit, environment, included) and prose figures: what
    CI enforces. Red whenever a producing source changed until `python -m tools.docsync generate --stale`
    is run on the committed tree."""
    rc = docsync.main(["--check"])
    assert rc == 0, capsys.readouterr().err


def test_every_results_file_has_a_parseable_header_and_numbers():
    files = docsync.results_files(REPO)
    assert len(files) >= 8
    for f in files:
        fields, body = docsync.parse_result(f)
        assert {"command", "commit", "date"} <= fields.keys(), f
        assert re.search(r"\d", body), f"{f} has no numbers"


@pytest.mark.parametrize("page", ["README.md", "docs/classifier.md"])
def test_no_measured_number_in_a_table_outside_generated_blocks(page):
    """Table rows with decimals, percentages or thousands outside medse:include blocks are hand-typed results."""
    text = (REPO / page).read_text()
    spans = [(b.start, b.stop) for b in docsync.find_blocks(Path(page), text)]
    pos = 0
    for line in text.splitlines(keepends=True):
        inside = any(a <= pos < b for a, b in spans)
        if line.startswith("|") and not inside:
            measured = re.search(r"\d\.\d|\d,\d{3}", line) or re.search(r"\d%", line.replace("95% CI", ""))
            assert not measured, f"{page}: hand-typed number in {line.strip()!r}"
        pos += len(line)


def test_stale_wording_is_gone():
    readme = (REPO / "README.md").read_text()
    flat = " ".join(readme.split())
    assert "closing note" not in flat
    assert "2.7 GiB" not in flat and "6.0 GiB" not in flat  # MiB / 1000, and typed by hand
    assert "+0.72%" not in flat
    assert "unlike in the authors' code and MONAI" not in flat  # MONAI 1.6.1 fixed Quicknat's cSE/scSE


# ----------------------------------------------------------------------------- sync and check
def test_check_names_the_stale_block_and_sync_rewrites_it(tmp_path, capsys):
    page = "# T\n\nintro\n<!-- medse:include docs/results/t.md -->\nold numbers\n<!-- medse:end -->\ntail\n"
    repo = _repo(tmp_path, TABLE, page)
    assert docsync.main(["--repo", str(repo), "--check"]) == 1
    err = capsys.readouterr().err
    assert "README.md:4" in err and "docs/results/t.md" in err and "stale" in err
    assert (repo / "README.md").read_text() == page  # --check writes nothing

    assert docsync.main(["--repo", str(repo)]) == 0
    new = (repo / "README.md").read_text()
    assert new == page.replace("old numbers\n", TABLE)
    assert "medse:result" not in new  # the provenance header stays in the results file
    assert docsync.sync(repo, check=True) == []

    # a changed results file makes the page stale again
    (repo / "docs" / "results" / "t.md").write_text(HEADER + TABLE.replace("2.00", "2.50"))
    assert docsync.main(["--repo", str(repo), "--check"]) == 1
    assert "README.md:4: block from docs/results/t.md is stale" in docsync.sync(repo, check=True)[0]


def test_table_option_and_blank_line_before_tables(tmp_path):
    body = "text\n| a |\n|---|\n| 1.5 |\n\nmore\n\n| b |\n|---|\n| 2.5 |\n"
    page = ('<!-- medse:include docs/results/t.md table="2" -->\n<!-- medse:end -->\n'
            "<!-- medse:include docs/results/t.md -->\n<!-- medse:end -->\n")
    repo = _repo(tmp_path, body, page)
    assert docsync.sync(repo) == []
    assert (repo / "README.md").read_text() == (
        '<!-- medse:include docs/results/t.md table="2" -->\n| b |\n|---|\n| 2.5 |\n<!-- medse:end -->\n'
        "<!-- medse:include docs/results/t.md -->\ntext\n\n| a |\n|---|\n| 1.5 |\n\nmore\n\n| b |\n|---|\n"
        "| 2.5 |\n<!-- medse:end -->\n")
    (repo / "README.md").write_text('<!-- medse:include docs/results/t.md table="3" -->\n<!-- medse:end -->\n')
    assert "has 2 table(s)" in docsync.sync(repo, check=True)[0]


def test_section_and_rows_options(tmp_path):
    body = "# top\n\n## Memory\n\nnote\n\n| v | n |\n|---|---|\n| 128 | 1 |\n| 512 | 2 |\n\n## Other\n\n| z |\n"
    page = ('<!-- medse:include docs/results/t.md section="Memory" rows="512" -->\n<!-- medse:end -->\n')
    repo = _repo(tmp_path, body, page)
    assert docsync.sync(repo) == []
    assert (repo / "README.md").read_text() == (
        '<!-- medse:include docs/results/t.md section="Memory" rows="512" -->\n'
        "note\n\n| v | n |\n|---|---|\n| 512 | 2 |\n<!-- medse:end -->\n")


@pytest.mark.parametrize("results,page,match", [
    ("no header\n", "<!-- medse:include docs/results/t.md -->\n<!-- medse:end -->\n", "provenance header"),
    (None, "<!-- medse:include docs/results/gone.md -->\n<!-- medse:end -->\n", "does not exist"),
    (HEADER.replace("commit: abc123\n", ""), "<!-- medse:include docs/results/t.md -->\n<!-- medse:end -->\n",
     "lacks commit"),
    (HEADER + TABLE, "<!-- medse:include docs/results/t.md -->\nno end marker\n", "no '<!-- medse:end -->'"),
    (HEADER + TABLE, '<!-- medse:include docs/results/t.md section="Nope" -->\n<!-- medse:end -->\n', "Nope"),
    (HEADER + TABLE, '<!-- medse:include docs/results/t.md colour="red" -->\n<!-- medse:end -->\n', "colour"),
])
def test_bad_results_files_and_markers_are_reported(tmp_path, results, page, match):
    (tmp_path / "docs" / "results").mkdir(parents=True)
    if results is not None:
        (tmp_path / "docs" / "results" / "t.md").write_text(results)
    (tmp_path / "README.md").write_text(page)
    problems = docsync.sync(tmp_path, check=True)
    assert len(problems) == 1 and match in problems[0], problems
    assert "README.md" in problems[0]


def test_results_folders_are_not_sync_targets(tmp_path):
    repo = _repo(tmp_path, TABLE, "x\n")
    (repo / "docs" / "page.md").write_text("<!-- medse:include docs/results/t.md -->\n<!-- medse:end -->\n")
    (repo / "docs" / "results" / "u.md").write_text(HEADER + "<!-- medse:include docs/results/t.md -->\n")
    assert [p.relative_to(repo).as_posix() for p in docsync.pages(repo)] == ["README.md", "docs/page.md"]


# ----------------------------------------------------------------------------- generate
IMPORTING = "{py} -c \"import sys; sys.path.insert(0, '.'); import pkg.mod; pkg.mod.main()\""
MOD = "def main():\n    print('| k | v |'); print('|---|---|'); print('| n | 3.25 |')\n"


def _git(repo: Path, *args: str) -> None:
    import subprocess

    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo, check=True,
                   capture_output=True)


def _source_repo(tmp_path: Path, monkeypatch, git: bool = True) -> Path:
    """A repository-like folder whose results file ``fake`` is made by a command importing ``pkg/mod.py`` and
    naming ``configs/c.yaml`` (which names ``configs/base.yaml``), committed when ``git``."""
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "__init__.py").write_text("")
    (repo / "pkg" / "mod.py").write_text(MOD)
    (repo / "pkg" / "unused.py").write_text("X = 1\n")
    (repo / "configs").mkdir()
    (repo / "configs" / "c.yaml").write_text("base: configs/base.yaml\n")
    (repo / "configs" / "base.yaml").write_text("epochs: 2\n")
    (repo / "README.md").write_text("<!-- medse:include docs/results/fake.md -->\n<!-- medse:end -->\n")
    if git:
        _git(repo, "init", "-q")
        _git(repo, "add", ".")
        _git(repo, "commit", "-qm", "init")
    monkeypatch.setitem(docsync.SOURCES, "fake", docsync.Source(
        "docs/results/fake.md", ["{py} -c \"open('{work}/made.txt', 'w').write('1')\"",
                                 IMPORTING + " --config configs/c.yaml"]))
    return repo


def test_generate_runs_the_commands_and_records_provenance(tmp_path, monkeypatch):
    repo = _source_repo(tmp_path, monkeypatch)
    assert docsync.main(["--repo", str(repo), "generate", "fake", "--work", str(tmp_path / "w")]) == 0
    fields, body = docsync.parse_result(repo / "docs" / "results" / "fake.md")
    assert body == "| k | v |\n|---|---|\n| n | 3.25 |\n"
    assert fields["command"].startswith("python -c") and " && python -c" in fields["command"]
    assert re.fullmatch(r"[0-9a-f]{40}", fields["commit"])  # clean: the results file is not part of the code
    env = fields["environment"]
    for word in ("torch ", "MONAI ", "torchio ", "numpy ", "scipy ", "nibabel ", "SimpleITK ", "Python ", "CPU: ",
                 "threads: ", "load average at start: "):
        assert word in env, word
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", fields["date"])
    assert re.fullmatch(r"\d+ s, \d+ s", fields["wall"])
    # the fingerprint: what the processes imported and what the command names, not what it did not touch
    files = [f.rsplit("@", 1)[0] for f in fields["source_files"].split()]
    assert files == ["configs/base.yaml", "configs/c.yaml", "pkg/__init__.py", "pkg/mod.py"]
    assert re.fullmatch(r"sha256 [0-9a-f]{64} over 4 files", fields["sources"])
    assert (tmp_path / "w" / "made.txt").read_text() == "1"
    assert "| n | 3.25 |" in (repo / "README.md").read_text()  # generate also syncs the pages
    assert docsync.stale_results(repo) == {}
    assert docsync.main(["--repo", str(repo), "--check"]) == 0


@pytest.mark.parametrize("changed", ["pkg/mod.py", "configs/base.yaml"])
def test_check_fails_naming_the_source_that_changed(tmp_path, monkeypatch, capsys, changed):
    repo = _source_repo(tmp_path, monkeypatch)
    assert docsync.main(["--repo", str(repo), "generate", "fake", "--work", str(tmp_path / "w")]) == 0
    (repo / "pkg" / "unused.py").write_text("X = 2\n")  # not used by the command: still fresh
    assert docsync.main(["--repo", str(repo), "--check"]) == 0
    capsys.readouterr()
    (repo / changed).write_text((repo / changed).read_text() + "# edited\n")
    assert docsync.main(["--repo", str(repo), "--check"]) == 1
    err = capsys.readouterr().err
    assert f"docs/results/fake.md: stale: {changed} changed since it was made (generate fake)" in err
    assert "generate --stale" in err
    assert docsync.stale_names(repo) == ["fake"]
    assert docsync.stale_names(repo, skip_timing=True) == ["fake"]  # docs/results: not a timing benchmark


def test_generate_refuses_a_dirty_tree_unless_allowed_and_check_rejects_dirty(tmp_path, monkeypatch, capsys):
    repo = _source_repo(tmp_path, monkeypatch)
    (repo / "pkg" / "mod.py").write_text(MOD.replace("3.25", "4.5"))  # uncommitted code
    assert docsync.main(["--repo", str(repo), "generate", "fake", "--work", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "pkg/mod.py" in err and "--allow-dirty" in err
    assert not (repo / "docs" / "results" / "fake.md").exists()

    assert docsync.main(["--repo", str(repo), "generate", "fake", "--allow-dirty", "--work", str(tmp_path / "w")]) == 0
    fields, _ = docsync.parse_result(repo / "docs" / "results" / "fake.md")
    assert fields["commit"].endswith("+dirty")
    capsys.readouterr()
    assert docsync.main(["--repo", str(repo), "--check"]) == 1
    assert "fake.md: stale: commit" in capsys.readouterr().err and "not a clean commit" in docsync.stale_results(
        repo)["docs/results/fake.md"]

    # committed: --stale regenerates it, and the check passes
    _git(repo, "commit", "-qam", "code")
    assert docsync.main(["--repo", str(repo), "generate", "--stale", "--work", str(tmp_path / "w")]) == 0
    assert docsync.main(["--repo", str(repo), "--check"]) == 0
    assert "| n | 4.5 |" in (repo / "README.md").read_text()


def test_stale_selection_skips_timing_and_nnunet(tmp_path, monkeypatch):
    monkeypatch.setattr(docsync, "SOURCES", {
        "t": docsync.Source("benchmarks/results/t.md", ["{py} benchmarks/b.py"]),
        "n": docsync.Source("docs/results/n.md", [".venv-nnunet/bin/python -m pytest"]),
        "d": docsync.Source("docs/results/d.md", ["{medse} models"])})
    for d in ("docs/results/d.md", "docs/results/n.md", "benchmarks/results/t.md"):
        (tmp_path / d).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / d).write_text(HEADER + TABLE)  # an old header: no fingerprint
    assert docsync.stale_names(tmp_path) == ["t", "n", "d"]
    assert docsync.stale_names(tmp_path, skip_timing=True, skip_nnunet=True) == ["d"]


def test_results_file_nothing_includes_is_reported(tmp_path):
    repo = _repo(tmp_path, TABLE, "<!-- medse:include docs/results/t.md -->\n" + TABLE + "<!-- medse:end -->\n")
    (repo / "docs" / "results" / "orphan.md").write_text(HEADER + TABLE)
    problems = docsync.results_problems(repo)
    assert "docs/results/orphan.md: nothing includes it (delete it, or include it in a page)" in problems
    assert any(p.startswith("docs/results/t.md: stale: no source fingerprint") for p in problems)


# ----------------------------------------------------------------------------- prose numbers and verdicts
@pytest.mark.parametrize("prose,bad", [
    ("scSE costs +3.5% per step here.", ["3.5%"]),
    ("The nnU-Net test took 157 s (221 s in all).", ["157 s", "221 s"]),
    ("Mean Dice 0.738, p 0.656.", ["0.738", "0.656"]),
    ("It has 1,811,076 parameters.", ["1,811,076"]),
    ("Uses torch 2.13.0 and Python 3.11 on 2 cores with 3x3 kernels, issue 14, arXiv:1709.01507.", []),
    ("A 95% CI and the 25-75% range; `--alpha 0.05` in code.", []),
])
def test_measured_numbers_in_prose(prose, bad):
    assert docsync.measured_numbers(docsync._prose_only(Path("p.md"), prose)) == bad


def test_prose_check_rejects_hand_typed_figures_and_accepts_marked_definitions(tmp_path, capsys):
    repo = _repo(tmp_path, TABLE, "# T\n\n<!-- medse:include docs/results/t.md -->\n" + TABLE +
                 "<!-- medse:end -->\n\nThe step overhead is +3.5% here.\n")
    (repo / "docs" / "guide.md").write_text(
        "Targets, a definition:\n<!-- medse:prose-number definition: the targets of issue 14 -->\n"
        "scSE at most +3%, memory at most +5% (11 MiB).\n\n"
        "<!-- medse:prose-number because -->\nAUC 0.7314.\n\n"
        "The 2.5x target is met for every block.\n\nA structure missed entirely scores Dice 0.\n")
    problems = docsync.prose_problems(repo)
    assert problems[0].startswith("README.md:12: hand-typed figure(s) 3.5% in prose")
    assert any(p.startswith("docs/guide.md:5: malformed marker") for p in problems)
    assert any(p.startswith("docs/guide.md:6: hand-typed figure(s) 0.7314") for p in problems)
    assert any(p.startswith("docs/guide.md:8: hand-typed figure(s) 2.5") for p in problems)
    assert any(p.startswith("docs/guide.md:8: verdict word 'met' outside an include block") for p in problems)
    assert len(problems) == 5, problems  # the marked paragraph and "missed entirely" (no target) pass
    assert docsync.main(["--repo", str(repo), "--check"]) == 1
    assert "README.md:12: hand-typed figure(s) 3.5%" in capsys.readouterr().err


def test_generate_refuses_a_foreign_work_folder(tmp_path, monkeypatch):
    repo = _source_repo(tmp_path, monkeypatch)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "precious.txt").write_text("keep")
    with pytest.raises(MedseError, match="not made by docsync"):
        docsync.generate("fake", repo, tmp_path / "w", log=lambda s: None)
    assert (tmp_path / "w" / "precious.txt").read_text() == "keep"
    docsync.generate("fake", repo, tmp_path / "w2", log=lambda s: None)
    (tmp_path / "w2" / "old.txt").write_text("from the last run")
    docsync.generate("fake", repo, tmp_path / "w2", log=lambda s: None)  # its own folder: cleared and rerun
    assert not (tmp_path / "w2" / "old.txt").exists()


def test_generate_failing_command_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(docsync.SOURCES, "bad", docsync.Source("docs/results/bad.md", ["{py} -c 'raise SystemExit(3)'"]))
    assert docsync.main(["--repo", str(tmp_path), "generate", "bad", "--allow-dirty", "--work",
                         str(tmp_path / "w")]) == 2
    assert "exit code 3" in capsys.readouterr().err
    assert not (tmp_path / "docs" / "results" / "bad.md").exists()


def test_generate_no_run_records_existing_output_with_its_commit(tmp_path):
    work = tmp_path / "demo"
    (work / "cells" / "a").mkdir(parents=True)
    (work / "table.md").write_text("| a |\n|---|\n| 0.723 |\n")
    (work / "cells" / "a" / "run_info.json").write_text('{"git_commit": "feedbeef"}')
    (work / "demo_summary.json").write_text('{"wall_s": 2712.4}')
    for f in docsync.SOURCES["demo_table"].copies:
        f = Path(f.replace("{work}", str(work)).replace("*", "case_003"))
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"png " + f.name.encode())
    with pytest.raises(MedseError, match="--allow-dirty"):  # tmp_path is no git checkout: not a clean commit
        docsync.generate("demo_table", tmp_path, work, run=False, log=lambda s: None)
    docsync.generate("demo_table", tmp_path, work, run=False, log=lambda s: None, allow_dirty=True)
    fields, body = docsync.parse_result(tmp_path / "docs" / "results" / "demo_table.md")
    assert fields["commit"] == "feedbeef" and "commands not rerun" in fields["recorded"]
    assert fields["wall"] == "2712 s (from demo_summary.json)"
    assert fields["command"] == f"medse demo --output {work}" and body == "| a |\n|---|\n| 0.723 |\n"
    assert (tmp_path / "docs" / "images" / "demo_gain.png").read_bytes() == b"png gain.png"
    assert (tmp_path / "docs" / "images" / "demo_gates.png").read_bytes() == b"png case_003_gates.png"

    (work / "figures" / "gates" / "case_004_gates.png").write_bytes(b"two montages")  # ambiguous: refused
    with pytest.raises(MedseError, match="exactly one"):
        docsync.generate("demo_table", tmp_path, work, run=False, log=lambda s: None, allow_dirty=True)
    assert "no source fingerprint" in docsync.stale_results(tmp_path)["docs/results/demo_table.md"]


def test_unknown_name_suggests(tmp_path):
    with pytest.raises(MedseError, match="Did you mean 'demo_table'"):
        docsync.generate("demo_tabel", tmp_path)


def test_every_source_names_a_results_file_and_a_command():
    for name, src in docsync.SOURCES.items():
        assert src.dest.startswith(("docs/results/", "benchmarks/results/")) and src.dest.endswith(".md"), name
        assert src.commands, name
        if src.dest.startswith("benchmarks/"):
            script = src.commands[0].split()[1]
            assert (REPO / script).is_file(), script


def test_module_runs_as_a_script():
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "tools.docsync", "list"], cwd=REPO, capture_output=True,
                          text=True, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and "demo_table: docs/results/demo_table.md" in proc.stdout


# ----------------------------------------------------------------------------- verdicts with spread (issue 21.6)
@pytest.mark.parametrize("samples,target,higher,expected", [
    ([2.0, 2.1, 2.2, 2.3, 2.4], 2.5, False, "met"),          # whole range below the bound
    ([2.2, 2.3, 2.38, 2.6, 2.7], 2.5, False, "not decided"),  # median meets it, q75 (2.6) does not
    ([2.6, 2.61, 2.65, 2.7, 2.9], 2.5, False, "missed"),      # even q25 above
    ([2.4, 2.45, 2.55, 2.6, 2.62], 2.5, False, "not decided"),  # median misses, q25 meets: undecided too
    ([3.1, 3.2, 3.3, 3.4, 3.5], 3.0, True, "met"),            # a speed-up of at least 3x
    ([2.8, 2.9, 3.1, 3.2, 3.3], 3.0, True, "not decided"),
    ([2.0, 2.1, 2.2, 2.3, 2.9], 3.0, True, "missed"),
    ([2.5], 2.5, False, "met"),                               # one sample: its own range
])
def test_verdict_uses_the_quartiles(samples, target, higher, expected):
    from medse.utils.benchstats import spread, verdict, verdict_cell

    assert verdict(samples, target, higher_is_better=higher) == expected
    assert verdict(spread(samples), target, higher_is_better=higher) == expected
    assert verdict_cell(samples, target, higher).startswith(expected + (" (>= " if higher else " (<= "))


def test_spread_is_the_median_and_inclusive_quartiles():
    from medse.utils.benchstats import spread

    s = spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.q25, s.q75, s.n) == (3.0, 2.0, 4.0, 5)
    assert s.range_text() == "2.00 .. 4.00"
    with pytest.raises(ValueError):
        spread([])
