"""Pipelined inference (issue 14, target 4): the sliding window's forward passes in a worker thread, and
``predict_folder`` reading the next case and writing the previous one while a case runs through the network.
The outputs, failures and their order must be those of the sequential code."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medse.data.preprocess import PreprocessConfig
from medse.inference import Predictor, predict_folder
from medse.inference.sliding import iter_window_slabs, sliding_window_labels
from medse.testing import make_affine


def _nifti(path: Path, data: np.ndarray, kind: str = "oblique", seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), make_affine(kind, seed=seed)), str(path))
    return path


def _slabs(x, net, **kw):
    got = []
    for a, s0, s1, slab in iter_window_slabs(x, net, (8, 8, 8), overlap=0.5, sw_batch_size=2, **kw):
        got.append((a, s0, s1, slab.clone()))
    return got


def _sliding_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "medse-sliding-window"]


@pytest.mark.parametrize("axis", [None, 0, 2])
def test_background_forward_gives_bit_identical_slabs(axis) -> None:
    torch.manual_seed(0)
    net = torch.nn.Conv3d(2, 4, 3, padding=1)
    x = torch.randn(2, 21, 13, 18)
    with torch.inference_mode():
        ref = _slabs(x, net, axis=axis)
        got = _slabs(x, net, axis=axis, background=True)
    assert [s[:3] for s in got] == [s[:3] for s in ref] and len(ref) > 2
    assert all(torch.equal(a[3], b[3]) for a, b in zip(got, ref, strict=True))
    assert not _sliding_threads()


def test_background_forward_runs_in_a_worker_under_the_callers_modes() -> None:
    seen: list[tuple[str, bool, bool]] = []

    def net(b):
        seen.append((threading.current_thread().name, torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return torch.cat([b, -b], dim=1)

    x = torch.randn(1, 12, 12, 12)
    with torch.inference_mode():
        sliding_window_labels(iter_window_slabs(x, net, 8, background=True), (12, 12, 12))
    assert seen and all(s == ("medse-sliding-window", True, False) for s in seen)
    seen.clear()
    with torch.no_grad():
        sliding_window_labels(iter_window_slabs(x, net, 8, background=True), (12, 12, 12))
    assert seen and all(s == ("medse-sliding-window", False, False) for s in seen)


def test_background_forward_error_is_raised_and_the_worker_stops() -> None:
    calls = []

    def net(b):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom in the network")
        return torch.cat([b, -b], dim=1)

    x = torch.randn(1, 20, 20, 20)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="boom in the network"):
        sliding_window_labels(iter_window_slabs(x, net, 8, background=True), (20, 20, 20))
    assert len(calls) == 3 and not _sliding_threads()


def test_background_forward_stays_one_batch_ahead_and_stops_when_closed() -> None:
    calls = []

    def net(b):
        calls.append(1)
        return torch.cat([b, -b], dim=1)

    x = torch.randn(1, 32, 8, 8)  # streamed along axis 0: 7 groups of one window each (sw_batch_size 1)
    with torch.inference_mode():
        it = iter_window_slabs(x, net, 8, overlap=0.5, axis=0, background=True)
        next(it)  # group 0 blended; the first window of group 1 was taken to know that group 0 was complete
        time.sleep(0.3)  # a slow consumer: the worker must not run ahead
        assert len(calls) <= 3  # the two outputs taken + at most one computed ahead
        it.close()
    assert not _sliding_threads() and len(calls) <= 3


# ------------------------------------------------------------------------------------------ predict_folder
def _label_predictor(net: torch.nn.Module | None = None) -> Predictor:
    class Thresh(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.zeros_like(x[:, :1]), x[:, :1] - 0.5], dim=1)

    return Predictor(net or Thresh(), spatial_dims=3, in_channels=1, preprocess=PreprocessConfig(normalization="none"),
                     roi_size=[8, 8, 8], device="cpu")


def _scans(folder: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):  # at most 8 voxels along each axis: one 8^3 window, one forward pass per case
        _nifti(folder / f"c{i}.nii.gz", (rng.random((5 + i % 4, 7, 6)) > 0.5).astype(np.float32), seed=i)
    return folder


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.endswith(".nii.gz")}


def test_bad_case_in_the_middle_same_report_and_masks_as_without_prefetch(tmp_path: Path) -> None:
    inp = _scans(tmp_path / "in")
    (inp / "c1b.nii.gz").write_bytes(b"this is not an image" * 10)  # sorts between c1 and c2
    reports, lines = {}, {}
    for pf in (True, False):
        lines[pf] = []
        reports[pf] = predict_folder(_label_predictor(), inp, tmp_path / f"out_{pf}", progress=False,
                                     echo=lines[pf].append, prefetch=pf)
    rep = reports[True]
    assert [p.name for p in rep.written] == ["c0.nii.gz", "c1.nii.gz", "c2.nii.gz", "c3.nii.gz"]
    assert [c for c, _ in rep.failed] == ["c1b"] and "c1b.nii.gz" in rep.failed[0][1]
    assert lines[True] == lines[False] and len(lines[True]) == 1 and lines[True][0].startswith("failed: c1b: ")
    assert rep.failed == reports[False].failed
    assert [p.name for p in reports[False].written] == [p.name for p in rep.written]
    assert _outputs(tmp_path / "out_True") == _outputs(tmp_path / "out_False")
    assert (tmp_path / "out_True" / "failures.csv").is_file()
    assert set(rep.case_seconds) == {"c0", "c1", "c2", "c3"} and all(v > 0 for v in rep.case_seconds.values())
    assert rep.timings["background_read"] > 0 and rep.timings["background_write"] > 0


def test_reads_and_writes_overlap_the_forward_of_another_case(tmp_path: Path, monkeypatch) -> None:
    """Case 0's forward waits until case 1 is being read, case 1's until case 0 is being written: both
    happen only if the reader and writer threads run beside the network (else each wait times out)."""
    import medse.inference.writer as writer_mod

    inp = _scans(tmp_path / "in", 3)
    reading = {i: threading.Event() for i in range(3)}
    writing = {i: threading.Event() for i in range(3)}
    threads: dict[str, set[str]] = {"read": set(), "write": set(), "forward": set()}
    overlapped: list[bool] = []
    real_read, real_write = Predictor._read, writer_mod.write_label_like

    def read(self, paths):
        threads["read"].add(threading.current_thread().name)
        reading[int(Path(paths[0]).name[1])].set()
        return real_read(self, paths)

    def write(mask, ref, out, **kw):
        threads["write"].add(threading.current_thread().name)
        writing[int(Path(out).name[1])].set()
        return real_write(mask, ref, out, **kw)

    class Net(torch.nn.Module):
        calls = 0

        def forward(self, x):
            threads["forward"].add(threading.current_thread().name)
            case = Net.calls  # one window per case
            Net.calls += 1
            if case == 0:
                overlapped.append(reading[1].wait(5))
            elif case == 1:
                overlapped.append(writing[0].wait(5))
            return torch.cat([torch.zeros_like(x[:, :1]), x[:, :1] - 0.5], dim=1)

    monkeypatch.setattr(Predictor, "_read", read)
    monkeypatch.setattr(writer_mod, "write_label_like", write)
    rep = predict_folder(_label_predictor(Net()), inp, tmp_path / "out", progress=False)
    assert rep.ok and len(rep.written) == 3
    assert overlapped == [True, True]
    assert all(n.startswith("medse-predict-read") for n in threads["read"])
    assert all(n.startswith("medse-predict-write") for n in threads["write"])
    assert threads["forward"] == {"medse-sliding-window"}  # blending and argmax overlap the next batch


def test_reader_and_writer_errors_are_the_cases_failures(tmp_path: Path, monkeypatch) -> None:
    import medse.inference.writer as writer_mod

    inp = _scans(tmp_path / "in", 4)
    real_read, real_write = Predictor._read, writer_mod.write_label_like

    def read(self, paths):
        if Path(paths[0]).name == "c2.nii.gz":
            raise RuntimeError("reader exploded")
        return real_read(self, paths)

    def write(mask, ref, out, **kw):
        if Path(out).name == "c1.nii.gz":
            raise OSError("disk full (simulated)")
        return real_write(mask, ref, out, **kw)

    monkeypatch.setattr(Predictor, "_read", read)
    monkeypatch.setattr(writer_mod, "write_label_like", write)
    lines: list[str] = []
    rep = predict_folder(_label_predictor(), inp, tmp_path / "out", progress=False, echo=lines.append)
    # c2's read fails while c1 is still being written: c1's outcome is recorded first, as without threads
    assert rep.failed == [("c1", "disk full (simulated)"), ("c2", "RuntimeError: reader exploded")]
    assert lines == ["failed: c1: disk full (simulated)", "failed: c2: RuntimeError: reader exploded"]
    assert [p.name for p in rep.written] == ["c0.nii.gz", "c3.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c0.json", "c0.nii.gz", "c3.json", "c3.nii.gz",
                                                                    "failures.csv"]


def test_an_interrupt_in_the_reader_thread_is_not_lost(tmp_path: Path, monkeypatch) -> None:
    """A BaseException in the reader (not a case failure) stops the batch in the caller's thread; the mask
    being written is finished first."""
    inp = _scans(tmp_path / "in", 3)
    real_read = Predictor._read

    def read(self, paths):
        if Path(paths[0]).name == "c1.nii.gz":
            raise KeyboardInterrupt
        return real_read(self, paths)

    monkeypatch.setattr(Predictor, "_read", read)
    with pytest.raises(KeyboardInterrupt):
        predict_folder(_label_predictor(), inp, tmp_path / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c0.json", "c0.nii.gz"]
    assert not [t for t in threading.enumerate() if t.name.startswith(("medse-predict", "medse-sliding"))]


# ------------------------------------------------------------- gathering thread and the deferred tail of a case
def test_windows_are_gathered_in_another_thread_one_batch_ahead(monkeypatch) -> None:
    """The window batch for the next forward pass is cut out of the volume by a gathering thread, so the network
    worker goes from one forward straight to the next; the slabs stay bit-identical to the sequential code."""
    stacked: list[str] = []
    real_stack = torch.stack

    def spy_stack(tensors, *a, **k):
        stacked.append(threading.current_thread().name)
        return real_stack(tensors, *a, **k)

    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3, padding=1)
    x = torch.randn(1, 20, 12, 12)
    with torch.inference_mode():
        ref = _slabs(x, net)
        monkeypatch.setattr(torch, "stack", spy_stack)
        got = _slabs(x, net, background=True)
        monkeypatch.undo()
    assert stacked and all(name.startswith("medse-sliding-gather") for name in stacked)
    assert all(torch.equal(a[3], b[3]) for a, b in zip(got, ref, strict=True))
    assert not [t for t in threading.enumerate() if t.name.startswith("medse-sliding-gather")]


def test_gather_error_is_raised_and_the_workers_stop() -> None:
    x = torch.randn(1, 20, 20, 20)

    class Boom:
        calls = 0

        def __getitem__(self, idx):
            Boom.calls += 1
            if Boom.calls == 3:
                raise RuntimeError("boom while gathering")
            return x[idx]

    fake = Boom()
    fake.ndim, fake.shape, fake.device = x.ndim, x.shape, x.device
    with torch.inference_mode(), pytest.raises(RuntimeError, match="boom while gathering"):
        sliding_window_labels(iter_window_slabs(fake, lambda b: torch.cat([b, -b], 1), 8, background=True),
                              (20, 20, 20))
    assert not _sliding_threads()
    assert not [t for t in threading.enumerate() if t.name.startswith("medse-sliding-gather")]


@pytest.mark.parametrize("background", [False, True])
def test_forwards_done_is_set_when_the_last_batch_is_back_before_it_is_blended(background) -> None:
    done = threading.Event()
    calls = []

    def net(b):
        assert not done.is_set()  # never before the last forward pass
        calls.append(1)
        return torch.cat([b, -b], dim=1)

    x = torch.randn(1, 32, 8, 8)  # 7 groups along axis 0, one window each
    with torch.inference_mode():
        ref = [(a, s0, s1, t.clone()) for a, s0, s1, t in iter_window_slabs(x, net, 8, overlap=0.5, axis=0)]
        calls.clear()
        got = []
        for item in iter_window_slabs(x, net, 8, overlap=0.5, axis=0, background=background, forwards_done=done):
            got.append(item if item is None else (*item[:3], item[3].clone()))
            if item is None:
                assert len(calls) == 7  # the marker comes once every forward pass is done, not before
    assert done.is_set() and len(calls) == 7 and got.count(None) == 1
    assert got.index(None) < len(got) - 1  # slabs still follow it: the last output is blended after the marker
    real = [g for g in got if g is not None]
    assert [g[:3] for g in real] == [r[:3] for r in ref]
    assert all(torch.equal(g[3], r[3]) for g, r in zip(real, ref, strict=True))


def test_deferred_prediction_leaves_the_last_argmax_to_finish_and_equals_the_direct_one(monkeypatch) -> None:
    """``_predict_deferred(defer=True)`` returns once the network is done with the case; ``finish()``, called
    from another thread, does the remaining argmax work and gives exactly ``predict_preprocessed``'s result."""
    import medse.inference.sliding as sliding

    torch.manual_seed(0)
    pred = Predictor(torch.nn.Conv3d(1, 3, 3, padding=1), spatial_dims=3, in_channels=1, roi_size=[8, 8, 8],
                     device="cpu", sw_batch_size=2)
    img = np.random.default_rng(0).normal(size=(1, 24, 12, 10)).astype(np.float32)
    want, _ = pred.predict_preprocessed(img)
    argmaxes: list[str] = []
    real = sliding.argmax_channels

    def spy(scores):
        argmaxes.append(threading.current_thread().name)
        return real(scores)

    monkeypatch.setattr(sliding, "argmax_channels", spy)
    finish = pred._predict_deferred(img, False, defer=True)
    before = len(argmaxes)
    out: dict[str, np.ndarray] = {}
    t = threading.Thread(target=lambda: out.update(labels=finish()[0]), name="finisher")
    t.start()
    t.join()
    assert argmaxes[before:] and all(n == "finisher" for n in argmaxes[before:])  # the tail ran in "finisher"
    np.testing.assert_array_equal(out["labels"], want)
