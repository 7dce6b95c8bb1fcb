"""Progress off a terminal: periodic plain lines, never tqdm's carriage-return redraws (issue 11, item 17)."""

from __future__ import annotations

import io
import shutil

import pytest

from medse.utils.progress import PlainProgress, format_duration, progress, use_plain_lines


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_duration():
    assert [format_duration(s) for s in (0, 42.4, 62, 3600 + 5 * 60 + 9)] == ["0s", "42s", "1m02s", "1h05m09s"]


def test_plain_lines_every_10_percent_without_carriage_returns():
    buf = io.StringIO()
    clock = _Clock()
    bar = PlainProgress(range(40), total=40, desc="predict", unit="case", file=buf, min_interval=0, clock=clock)
    for _ in bar:
        clock.t += 1.55
    out = buf.getvalue()
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert len(lines) == 10, lines  # 10%, 20%, ..., 90% and the closing 100%
    assert lines[2] == "predict 12/40 cases (30%), 19s elapsed, ~43s left"
    assert lines[-1] == "predict 40/40 cases (100%), 1m02s elapsed"


def test_plain_lines_respect_min_and_max_interval():
    buf = io.StringIO()
    clock = _Clock()
    bar = PlainProgress(total=1000, desc="epoch 1/2", file=buf, min_interval=5, max_interval=60, leave=False,
                        clock=clock)
    for _ in range(1000):  # 1000 steps in 10 s: a 10% line at most every 5 s, no closing line (leave=False)
        clock.t += 0.01
        bar.update()
    bar.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("epoch 1/2 50") and "(50%), 5s elapsed" in lines[0], lines
    buf2 = io.StringIO()
    slow = PlainProgress(desc="evaluate", unit="case", file=buf2, max_interval=60, clock=clock)  # no total
    for _ in range(5):
        clock.t += 25
        slow.update()
    slow.set_postfix(loss="0.1234")
    slow.close()
    assert buf2.getvalue().splitlines() == ["evaluate 3 cases, 1m15s elapsed", "evaluate 5 cases, 2m05s elapsed, loss=0.1234"]


def test_progress_picks_plain_lines_off_a_terminal(monkeypatch):
    monkeypatch.delenv("MEDSE_PROGRESS", raising=False)
    buf = io.StringIO()
    assert use_plain_lines(buf) and not use_plain_lines(_Tty())
    bar = progress(range(5), desc="x", file=buf, min_interval=0)
    assert isinstance(bar, PlainProgress)
    bar.set_postfix(loss="0.5", lr="1e-3")
    assert sum(1 for _ in bar) == 5
    assert "\r" not in buf.getvalue() and buf.getvalue().splitlines()[-1].startswith("x 5/5 it (100%)")
    tty = _Tty()  # a terminal gets tqdm's bar (redrawn with carriage returns)
    list(progress(range(5), desc="x", file=tty))
    assert "\r" in tty.getvalue()
    monkeypatch.setenv("MEDSE_PROGRESS", "plain")
    assert isinstance(progress(range(2), file=_Tty()), PlainProgress)
    monkeypatch.setenv("MEDSE_PROGRESS", "off")
    off = io.StringIO()
    assert list(progress(range(3), file=off)) == [0, 1, 2] and off.getvalue() == ""


def test_evaluate_progress_on_a_pipe_is_plain_lines(synth_dataset, tmp_path, capsys, monkeypatch):
    """A swapped call site end to end: ``medse.evaluation.evaluate(progress=True)`` with stderr not a terminal."""
    from medse.evaluation import evaluate

    monkeypatch.delenv("MEDSE_PROGRESS", raising=False)
    pred = tmp_path / "pred"
    shutil.copytree(synth_dataset / "labels", pred)
    evaluate(pred, synth_dataset, tmp_path / "eval", progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert any(ln.startswith("evaluate 6/6 cases (100%)") for ln in err.splitlines()), err


@pytest.mark.parametrize("steps", [4])
def test_training_progress_on_a_pipe_is_plain_lines(synth_dataset, tmp_path, capsys, monkeypatch, steps):
    from medse.training import train

    monkeypatch.delenv("MEDSE_PROGRESS", raising=False)
    cfg = {"data": {"root": str(synth_dataset), "split": {"val_fraction": 0.34, "seed": 1}},
           "model": {"name": "unet", "spatial_dims": 3, "kwargs": {"channels": [4, 8, 16]}},
           "train": {"epochs": 1, "iterations_per_epoch": steps, "batch_size": 1, "patch_size": [16, 16, 16],
                     "device": "cpu", "tensorboard": False, "progress": True},
           "infer": {"roi_size": [16, 16, 16]}}
    train(cfg, tmp_path / "run")
    err = capsys.readouterr().err
    assert "\r" not in err, err[:500]
    assert any(ln.startswith("epoch 1/1  loss ") for ln in err.splitlines()), err
