"""README and docs numbers come from results files: provenance headers, include blocks, --check, generate."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from medse.utils import docsync
from medse.utils.errors import MedseError

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
def test_repository_pages_match_their_results_files(capsys):
    rc = docsync.main(["--check"])
    assert rc == 0, capsys.readouterr().err


def test_every_results_file_records_command_commit_machine_and_date():
    files = sorted((REPO / "docs" / "results").glob("*.md")) + sorted((REPO / "benchmarks" / "results").glob("*.md"))
    assert len(files) >= 8
    for f in files:
        fields, body = docsync.parse_result(f)
        assert {"command", "commit", "machine", "date"} <= fields.keys(), f
        assert re.search(r"\d", body), f"{f} has no numbers"


def test_readme_includes_the_generated_results():
    text = (REPO / "README.md").read_text()
    included = {b.source for b in docsync.find_blocks(Path("README.md"), text)}
    for name in ("docs/results/demo_table.md", "docs/results/demo_configs.md", "docs/results/classifier_seed0.md",
                 "docs/results/classifier_seed1.md", "docs/results/models_2d.md", "docs/results/models_demo_unet.md",
                 "docs/results/blocks_list.md", "docs/results/nnunet_smoke.md",
                 "benchmarks/results/blocks_cpu_issue14.md", "benchmarks/results/step_cpu.md",
                 "benchmarks/results/memory_cpu.md", "benchmarks/results/inference_cpu.md"):
        assert name in included, name


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
    assert docsync.main(["--repo", str(repo), "--check"]) == 0

    # a changed results file makes the page stale again
    (repo / "docs" / "results" / "t.md").write_text(HEADER + TABLE.replace("2.00", "2.50"))
    assert docsync.main(["--repo", str(repo), "--check"]) == 1


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
def test_generate_runs_the_commands_and_records_provenance(tmp_path, monkeypatch):
    (tmp_path / "README.md").write_text("<!-- medse:include docs/results/fake.md -->\n<!-- medse:end -->\n")
    script = "import sys; print('| k | v |'); print('|---|---|'); print('| n |', len(sys.argv), '|')"
    monkeypatch.setitem(docsync.SOURCES, "fake", docsync.Source(
        "docs/results/fake.md", ["{py} -c \"open('{work}/made.txt', 'w').write('1')\"",
                                 f"{{py}} -c \"{script}\" a b"]))
    assert docsync.main(["--repo", str(tmp_path), "generate", "fake", "--work", str(tmp_path / "w")]) == 0
    fields, body = docsync.parse_result(tmp_path / "docs" / "results" / "fake.md")
    assert body == "| k | v |\n|---|---|\n| n | 3 |\n"
    assert fields["command"].startswith("python -c") and " && python -c" in fields["command"]
    assert fields["commit"]  # "unknown (not a git checkout)" in tmp_path
    assert f"{__import__('os').cpu_count()} CPUs" in fields["machine"] and "torch " in fields["machine"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", fields["date"])
    assert re.fullmatch(r"\d+ s, \d+ s", fields["wall"])
    assert (tmp_path / "w" / "made.txt").read_text() == "1"
    assert "| n | 3 |" in (tmp_path / "README.md").read_text()  # generate also syncs the pages


def test_generate_refuses_a_foreign_work_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(docsync.SOURCES, "x", docsync.Source("docs/results/x.md", ["{py} -c 'print(1)'"]))
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "precious.txt").write_text("keep")
    with pytest.raises(MedseError, match="not made by docsync"):
        docsync.generate("x", tmp_path, tmp_path / "w", log=lambda s: None)
    assert (tmp_path / "w" / "precious.txt").read_text() == "keep"
    docsync.generate("x", tmp_path, tmp_path / "w2", log=lambda s: None)
    (tmp_path / "w2" / "old.txt").write_text("from the last run")
    docsync.generate("x", tmp_path, tmp_path / "w2", log=lambda s: None)  # its own folder: cleared and rerun
    assert not (tmp_path / "w2" / "old.txt").exists()


def test_generate_failing_command_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(docsync.SOURCES, "bad", docsync.Source("docs/results/bad.md", ["{py} -c 'raise SystemExit(3)'"]))
    assert docsync.main(["--repo", str(tmp_path), "generate", "bad", "--work", str(tmp_path / "w")]) == 2
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
    docsync.generate("demo_table", tmp_path, work, run=False, log=lambda s: None)
    fields, body = docsync.parse_result(tmp_path / "docs" / "results" / "demo_table.md")
    assert fields["commit"] == "feedbeef" and "commands not rerun" in fields["recorded"]
    assert fields["wall"] == "2712 s (from demo_summary.json)"
    assert fields["command"] == f"medse demo --output {work}" and body == "| a |\n|---|\n| 0.723 |\n"
    assert (tmp_path / "docs" / "images" / "demo_gain.png").read_bytes() == b"png gain.png"
    assert (tmp_path / "docs" / "images" / "demo_gates.png").read_bytes() == b"png case_003_gates.png"

    (work / "figures" / "gates" / "case_004_gates.png").write_bytes(b"two montages")  # ambiguous: refused
    with pytest.raises(MedseError, match="exactly one"):
        docsync.generate("demo_table", tmp_path, work, run=False, log=lambda s: None)


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

    proc = subprocess.run([sys.executable, "-m", "medse.utils.docsync", "list"], cwd=REPO, capture_output=True,
                          text=True, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and "demo_table: docs/results/demo_table.md" in proc.stdout
