"""Predict a folder of scans with a run: :func:`predict_folder` and the pipeline it runs the cases through.

:func:`predict_folder` runs :class:`~medse.inference.Predictor` over a folder / manifest
(:func:`medse.inference.inputs.collect_cases`), writes each mask with
:func:`medse.inference.writer.write_label_like` (input header copied, round-trip checked, atomic, fsync'd),
skips only masks its sidecar traces to the same run, checkpoint (sha256), settings and inputs, redoes this
run's own broken ones and refuses any other existing mask unless ``overwrite`` (:mod:`medse.inference.resume`,
docs/inference.md), checks settings, the window against the network (UNETR's fixed ``img_size``) and the
output folder before loading anything, records failures in ``failures.csv`` (a full disk: ``no space left on
device, <mask>``, the batch goes on), lists every file of an input folder that is not an image among the
failures (DICOM series folders are cases), stops cleanly on SIGINT/SIGTERM
(:class:`~medse.utils.interrupt.Interrupted`: where it stopped, the command that resumes) and shards the cases
over ``torchrun`` ranks (rank r takes ``cases[r::world]``).

The cases flow through :class:`_Batch`: a reader (:meth:`_Batch.prepare`: existing-mask decision, read and
preprocess), the network in the calling thread (:meth:`_Batch.predict`) and a writer
(:meth:`_Batch.finish_and_write`), the reader and writer on threads of their own with ``prefetch``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medse.inference.inputs import InputCase, collect_cases
from medse.inference.predictor import Predictor
from medse.inference.resume import existing_output, input_stats
from medse.runs import Run
from medse.utils.atomic import atomic_write_text
from medse.utils.errors import MedseError

__all__ = ["PredictReport", "predict_folder", "write_failures_csv"]


@dataclass
class PredictReport:
    """What :func:`predict_folder` did: masks written, cases skipped (finished by the same run, checkpoint
    and settings), failures (including existing masks refused without ``overwrite``), cases redone because
    their own earlier output was broken (``(case, reason)``), NaN/Inf voxel counts replaced per case, and
    stale temporary files removed at the start."""

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    redone: list[tuple[str, str]] = field(default_factory=list)
    nonfinite: dict[str, int] = field(default_factory=dict)
    removed_temp: list[Path] = field(default_factory=list)
    failures_csv: Path | None = None
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    #: wall seconds of each predicted case (preprocess + network + postprocess; writing excluded)
    case_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        return (f"{len(self.written)} written, {len(self.skipped)} skipped (already there), "
                f"{len(self.failed)} failed in {self.seconds:.1f} s")


def predict_folder(
    run_dir: str | os.PathLike | Run | Predictor,
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    *,
    checkpoint: str = "best",
    device: Any = "auto",
    save_probabilities: bool = False,
    progress: bool = True,
    echo: Any = None,
    warmup: bool = False,
    prefetch: bool = True,
    resume: str | None = None,
    model_file: str | os.PathLike | None = None,
    **overrides: Any,
) -> PredictReport:
    """Predict every case of ``inputs`` into ``output_dir``; failures don't stop the batch.

    Before any model or case is loaded: the inference settings are checked (run's ``infer`` section and
    ``overrides``; :func:`medse.inference.settings.resolve_settings`), the inputs are listed, and ``output_dir`` is
    created and checked for writing (a one-line :class:`MedseError` naming it). Temporary files a killed run
    left for this rank's cases are removed.

    Args:
        run_dir: a run (:class:`~medse.runs.Run`) or its folder, or a ready :class:`Predictor`.
        inputs: folder, manifest, image file or list of files (see :func:`collect_cases`).
        output_dir: where ``{case_id}{input suffix}`` masks and ``{case_id}.json`` sidecars go
            (probabilities in ``output_dir/probabilities/``).
        overwrite: redo every case whose mask exists. Defaults to False: a finished case of the same run,
            checkpoint, settings and inputs is skipped (a killed run resumes), this run's own broken
            outputs are redone, and any other existing mask is refused (a failure naming the reason).
        checkpoint: ``"best"``, ``"last"`` or a path. Defaults to ``"best"``.
        device: ``"auto"``, ``"cpu"``, ``"cuda:N"``. Defaults to ``"auto"`` (``cuda:LOCAL_RANK`` under torchrun).
        save_probabilities: also write float32 class probabilities ``(x, y, z, K)``. Defaults to False.
        progress: tqdm bar over the cases. Defaults to True.
        echo: callable taking a line for per-case failures and warnings. Defaults to ``tqdm.write`` to stderr.
        warmup: predict the first case once, untimed and unwritten, before the batch (allocator and kernel
            warm-up), so that ``report.case_seconds`` of the first case is comparable. Defaults to False.
        prefetch: pipeline the cases: a reader thread checks the existing mask and reads + preprocesses
            case i+1, and a writer thread maps case i-1 back to its grid and writes it (round-trip check,
            sidecar), while case i runs through the network. Masks, sidecars, failures and the order of
            ``report`` entries and echoed lines are those of ``prefetch=False``; a failure in either thread
            is that case's failure. Costs the memory of one more preprocessed image and one more label map.
            Defaults to True.
        resume: the command that continues the batch, for the message of an interruption. Defaults to None.
        model_file: an exported network (``model.onnx``, run by onnxruntime on the CPU, or ``model.ts``;
            :mod:`medse.export`) in place of the checkpoint; the run still gives the preprocessing, windows and
            labels. Defaults to None.
        overrides: inference settings passed to :meth:`Predictor.from_run` (``strict_nonfinite=True``
            refuses NaN/Inf voxels instead of replacing them).

    Raises:
        Interrupted: on ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM inside
            :func:`medse.utils.interrupt.stop_on_signals`) during the batch: the mask being written is finished
            (or nothing is left under its name), and the exception says at which case it stopped, how many were
            done and where the masks are; rerunning the same command skips the finished cases.

    Returns:
        A :class:`PredictReport`. Failures are also in ``output_dir/failures.csv`` (removed when a run has
        none). Under ``torchrun`` rank r predicts ``cases[r::world]`` and rank 0 writes the merged CSV.
        ``report.timings``: ``forward`` (network forward passes), and the time the batch spent *waiting*
        for each other stage: ``preprocess`` (the next case's existing-mask check, read and preprocessing),
        ``postprocess`` (blending and argmax not hidden behind the forward passes) and ``write`` (mapping
        back, label lookup, writing with its round-trip check); ``background_read`` / ``background_write``:
        the seconds the reader / writer threads worked (hidden behind the forward passes where they exceed
        the waits). Without ``prefetch`` the waits are the stages' whole durations.
    """
    from medse.inference.settings import choose_checkpoint, resolve_settings
    from medse.inference.writer import output_suffix
    from medse.utils.atomic import ensure_writable_dir

    t_start = time.perf_counter()
    out = Path(output_dir)
    ready = run_dir if isinstance(run_dir, Predictor) else None
    note = None
    if ready is not None:
        given = sorted(k for k, v in overrides.items() if v is not None)
        if given:
            raise ValueError(f"inference overrides ({', '.join(given)}) cannot be applied to a ready Predictor; "
                             "set them on it")
    else:  # settings checked and the weights file chosen, nothing loaded yet
        run = Run.open(run_dir)  # type: ignore[arg-type]
        settings = resolve_settings(run, overrides)
        weights, note = choose_checkpoint(run, checkpoint, model_file)
    if echo is None:
        from tqdm.auto import tqdm

        def echo(line: str) -> None:
            tqdm.write(line, file=sys.stderr)
    all_cases = collect_cases(inputs)
    rank, world = _dist_info()
    cases = all_cases[rank::world]
    if note and rank == 0:
        echo(f"note: {note}")
    created = ensure_writable_dir(out)
    if save_probabilities:
        created += ensure_writable_dir(out / "probabilities", "probabilities folder")
    try:
        predictor = ready if ready is not None else \
            Predictor._load(run, settings, weights, device, exported=model_file is not None)
    except BaseException:
        _remove_empty(created)  # nothing was written: leave no empty folder behind
        raise
    report = PredictReport()
    targets = {c.case_id: out / f"{c.case_id}{output_suffix(c.images[0])}" for c in cases if c.images}
    _remove_stale_temps(out, targets, rank, report, echo)
    batch = _Batch(predictor, out, targets, save_probabilities=save_probabilities, overwrite=overwrite, echo=echo,
                   report=report)
    if warmup and cases and cases[0].images and not cases[0].error:
        with contextlib.suppress(Exception):  # a bad first case is reported by the batch
            predictor.predict_case(cases[0].images, warn_nonfinite=False)
    if batch.run(cases, _case_checks(cases, targets, all_cases), prefetch=prefetch, progress=progress and rank == 0):
        _stopped(report, batch.pending, cases, batch.at, out, created, resume)
    _record_failures(report, out, all_cases, rank, world, echo)
    report.seconds = time.perf_counter() - t_start
    report.timings = dict(predictor.timings)
    return report


class _Batch:
    """The cases of one :func:`predict_folder` call on their way through the pipeline; outcomes (written, skipped,
    failed, redone, NaN/Inf counts, seconds) go into ``report`` and ``echo`` in case order, whichever thread
    did the work."""

    def __init__(self, predictor: Predictor, out: Path, targets: Mapping[str, Path], *, save_probabilities: bool,
                 overwrite: bool, echo: Callable[[str], None], report: PredictReport) -> None:
        self.predictor = predictor
        self.out = out
        self.targets = targets
        self.save_probabilities = save_probabilities
        self.overwrite = overwrite
        self.echo = echo
        self.report = report
        self.identity = predictor.identity()
        self.settings = predictor.output_settings()
        #: what every sidecar records about the batch (each case adds its own inputs)
        self.base: dict[str, Any] = {**self.identity, "settings": self.settings}
        try:
            import medse

            self.base["medse_version"] = medse.__version__
        except Exception:  # pragma: no cover
            pass
        #: the case being written and its future
        self.pending: tuple[_Prepared, Any] | None = None
        #: the index of the case in progress, for the line an interruption prints
        self.at = 0

    def run(self, cases: Sequence[InputCase], checks: Sequence[str | None], *, prefetch: bool,
            progress: bool) -> bool:
        """Predict ``cases`` (``checks``: :func:`_case_checks`); True when a ``KeyboardInterrupt`` (SIGINT, or
        SIGTERM under :func:`medse.utils.interrupt.stop_on_signals`) stopped it, with ``pending`` and ``at``
        saying where."""
        from medse.utils.progress import progress as progress_bar  # a tqdm bar on a terminal, plain lines otherwise

        reader = _Worker("medse-predict-read", prefetch, lazy=True)  # inline: read when the loop gets there
        writer = _Worker("medse-predict-write", prefetch)
        for k in ("background_read", "background_write"):
            self.predictor.timings.setdefault(k, 0.0)
        bar = progress_bar(cases, desc="predict", unit="case", disable=not progress, file=sys.stderr)
        try:
            nxt = reader.submit(self.prepare, cases[0], checks[0]) if cases else None
            for i, _ in enumerate(bar):
                self.at = i
                t0 = time.perf_counter()
                job = nxt.result()  # type: ignore[union-attr]
                self.predictor._add_time("preprocess", time.perf_counter() - t0)
                nxt = reader.submit(self.prepare, cases[i + 1], checks[i + 1]) if i + 1 < len(cases) else None
                self.predict(job, writer)
            self.settle()
        except KeyboardInterrupt:
            return True
        finally:
            reader.close()  # the write in flight is finished (atomic either way), queued work dropped
            writer.close()
        return False

    def prepare(self, case: InputCase, problem: str | None) -> _Prepared:
        """Existing-mask decision, then read + preprocess (reader thread); exceptions stay with the case."""
        job = _Prepared(case)
        t0 = time.perf_counter()
        try:
            if problem == "error":  # one file: name it; several (a case's channel files): their folder
                raise MedseError(case.error or "", case.images[0] if len(case.images) == 1 else case.images[0].parent)
            if problem == "duplicate":
                raise MedseError(f"duplicate case id '{case.case_id}' in the inputs", case.images[0])
            job.target = target = self.targets[case.case_id]
            if problem == "input":
                raise MedseError("the mask would overwrite an input scan: choose another output folder", target)
            job.prob_target = self.out / "probabilities" / target.name if self.save_probabilities else None
            if (target.exists() or target.is_symlink()) and not self.overwrite:
                action, reason = existing_output(target, case, self.identity, self.settings, job.prob_target)
                if action == "skip":
                    job.action = "skip"
                    return job
                if action == "refuse":
                    raise MedseError(reason, target)
                job.redo = reason
            t1 = time.perf_counter()
            job.image, job.props = self.predictor._read(case.images)
            job.read_s = time.perf_counter() - t1
            job.action = "predict"
        except Exception as e:  # one bad case never stops the batch
            job.action, job.error = "fail", _failure_message(e)
        finally:
            self.predictor._add_time("background_read", time.perf_counter() - t0)
        return job

    def predict(self, job: _Prepared, writer: _Worker) -> None:
        """Case ``job`` through the network (calling thread), after the previous case's write is settled; its
        write goes to ``writer``. A prepared failure or skip is recorded here, in case order."""
        predictor = self.predictor
        cid = job.case.case_id
        if job.action != "predict":
            self.settle()
            if job.action == "skip":
                self.report.skipped.append(cid)
            else:
                self.note_redo(job)  # this run's own broken mask, but the scan did not read
                self.fail(cid, job.error or "failed")
            return
        assert job.image is not None and job.props is not None
        predictor.last_props = job.props
        try:
            finish, wall = predictor._predict_timed(job.image, self.save_probabilities, defer=True)
        except Exception as e:
            self.settle()
            self.note_redo(job)
            self.fail(cid, _failure_message(e))
            return
        finally:
            job.image = None  # the preprocessed image is not needed any more
        self.settle()
        self.note_redo(job)
        self.report.case_seconds[cid] = job.read_s + wall
        job.n_bad = int(job.props.get("nonfinite_voxels") or 0)
        if job.n_bad:
            from medse.data.preprocess import nonfinite_message

            self.report.nonfinite[cid] = job.n_bad
            self.echo(f"warning: {cid}: {nonfinite_message(job.props)}")
        t0 = time.perf_counter()
        self.pending = (job, writer.submit(self.finish_and_write, job, finish))  # inline: the whole write
        predictor._add_time("write", time.perf_counter() - t0)

    def finish_and_write(self, job: _Prepared, finish: Callable[[], tuple[np.ndarray, np.ndarray | None]]) -> float:
        """The case's last blending and argmax, map back, label lookup, write mask (+ probabilities) and
        sidecar (writer thread, while the next case is in the network); its seconds."""
        from medse.inference.writer import file_sha256, write_label_like, write_probabilities_like

        predictor = self.predictor
        t0 = time.perf_counter()
        try:
            assert job.target is not None and job.props is not None
            idx, probs = finish()
            del finish
            res = predictor._finish(idx, probs, job.props, job.case.images[0], self.save_probabilities)
            labels, out_probs = res if self.save_probabilities else (res, None)
            del idx, probs, res
            extra = {**self.base, "case_id": job.case.case_id, "inputs": [str(p) for p in job.case.images],
                     "input_files": input_stats(job.case.images), "nonfinite_voxels": job.n_bad}
            if out_probs is not None:
                assert job.prob_target is not None
                write_probabilities_like(out_probs, job.case.images[0], job.prob_target)
                extra["probabilities_sha256"] = file_sha256(job.prob_target)
            del out_probs
            write_label_like(labels, job.case.images[0], job.target, label_names=predictor.label_names, extra=extra)
        finally:
            predictor._add_time("background_write", time.perf_counter() - t0)
        return time.perf_counter() - t0

    def settle(self) -> None:
        """Wait for the write in flight and record its outcome (before any later case's)."""
        if self.pending is None:
            return
        job, fut = self.pending
        t0 = time.perf_counter()
        try:
            seconds = fut.result()  # a stop (SIGINT/SIGTERM) while waiting leaves `pending` for the summary
        except Exception as e:
            self.pending = None
            self.fail(job.case.case_id, _failure_message(e))
        else:
            self.pending = None
            self.report.case_seconds[job.case.case_id] += seconds
            assert job.target is not None
            self.report.written.append(job.target)
        finally:
            self.predictor._add_time("write", time.perf_counter() - t0)

    def note_redo(self, job: _Prepared) -> None:
        """Record that ``job`` redoes this run's own broken or stale output (``job.redo``: why)."""
        if job.redo is not None:
            self.report.redone.append((job.case.case_id, job.redo))
            self.echo(f"redo: {job.case.case_id}: {job.redo}")

    def fail(self, cid: str, msg: str) -> None:
        self.report.failed.append((cid, msg))
        self.echo(f"failed: {cid}: {msg}")


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders this call created, deepest first, where still empty."""
    for d in reversed(folders):
        with contextlib.suppress(OSError):
            d.rmdir()


def _remove_stale_temps(out: Path, targets: Mapping[str, Path], rank: int, report: PredictReport,
                        echo: Callable[[str], None]) -> None:
    """Remove the temporary files a killed run left for this rank's outputs (``report.removed_temp``)."""
    from medse.inference.writer import sidecar_path
    from medse.utils.atomic import stale_temp_files

    own_files = [f for t in targets.values() for f in (t, sidecar_path(t), out / "probabilities" / t.name)]
    own_files += [out / "failures.csv", out / f"failures.rank{rank}.csv"] if rank == 0 else \
        [out / f"failures.rank{rank}.csv"]
    for tmp in stale_temp_files(own_files):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            report.removed_temp.append(tmp)
    if report.removed_temp:
        echo(f"removed {len(report.removed_temp)} temporary file(s) left by an interrupted run in {out}")


def _case_checks(cases: Sequence[InputCase], targets: Mapping[str, Path], all_cases: Sequence[InputCase]
                 ) -> list[str | None]:
    """What can be decided about each case without touching a file, in input order: ``"error"`` (not an
    image), ``"duplicate"`` (an earlier case has its id: the first of two equal ids wins), ``"input"`` (its
    mask would overwrite an input scan of the batch) or None."""
    input_files = {Path(p).resolve() for c in all_cases for p in c.images}
    seen: set[str] = set()
    checks: list[str | None] = []
    for case in cases:
        cid = case.case_id
        problem = None
        if case.error:
            problem = "error"
        elif cid in seen:
            problem = "duplicate"
        else:
            seen.add(cid)
            if targets[cid].resolve() in input_files:
                problem = "input"
        checks.append(problem)
    return checks


def _record_failures(report: PredictReport, out: Path, all_cases: Sequence[InputCase], rank: int, world: int,
                     echo: Callable[[str], None]) -> None:
    """Gather the failures of all ranks and write ``failures.csv`` (rank 0; ``failures.rank{r}.csv`` per rank
    without a rendezvous), or remove the one an earlier run left when there are none."""
    gathered = world == 1 or _dist_initialized() or "MASTER_ADDR" in os.environ
    failed = _gather_failures(report.failed, world)
    writer_rank = rank == 0 if gathered else True
    if writer_rank:
        fpath = out / ("failures.csv" if gathered else f"failures.rank{rank}.csv")
        if failed:
            try:
                report.failures_csv = write_failures_csv(fpath, failed, {c.case_id: c.images for c in all_cases})
            except OSError as e:  # a full disk: the failures were printed one per line; say why no CSV
                from medse.inference.writer import disk_full_error

                full = disk_full_error(e, fpath)
                echo(f"error: {full if full is not None else e}; the failed cases are listed above")
        elif fpath.exists():
            fpath.unlink()
    report.failed = list(failed) if rank == 0 else report.failed


def _dist_info() -> tuple[int, int]:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1 or not 0 <= rank < world:
        raise MedseError(f"invalid RANK={rank} / WORLD_SIZE={world} in the environment")
    return rank, world


def _gather_failures(failed: list[tuple[str, str]], world: int) -> list[tuple[str, str]]:
    if world <= 1:
        return failed
    import torch.distributed as dist

    if not dist.is_available() or (not dist.is_initialized() and "MASTER_ADDR" not in os.environ):
        return failed  # no rendezvous: each rank reports its own (failures.rank{r}.csv)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo")
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, failed)
    if created:  # ours: every rank has its answer, tear the group down again
        dist.barrier()
        dist.destroy_process_group()
    out = [tuple(f) for part in gathered for f in (part or [])]
    return sorted(out)  # type: ignore[arg-type]


def _dist_initialized() -> bool:
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized())


def write_failures_csv(path: Path, failed: Sequence[tuple[str, str]], inputs: Mapping[str, list[Path]]) -> Path:
    """``case_id,inputs,error`` one row per failed case (inputs joined with ``;``)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["case_id", "inputs", "error"])
    for cid, msg in failed:
        w.writerow([cid, ";".join(str(p) for p in inputs.get(cid, [])), msg])
    atomic_write_text(path, buf.getvalue())
    return path


def _stopped(report: PredictReport, pending: tuple[_Prepared, Any] | None, cases: Sequence[InputCase], at: int,
             out: Path, created: Sequence[Path], resume: str | None) -> None:
    """Raise :class:`~medse.utils.interrupt.Interrupted` for a batch stopped at case ``at``; the write that was in
    flight counts as done when it finished. Folders this call created are removed again while still empty."""
    from medse.utils.interrupt import Interrupted

    if pending is not None:
        job, fut = pending
        with contextlib.suppress(Exception):
            fut.result()
            assert job.target is not None
            report.written.append(job.target)
    done = len(report.written) + len(report.skipped) + len(report.failed)
    _remove_empty(created)
    n = len(cases)
    current = f"case {at + 1} of {n} ({cases[at].case_id})" if cases else "the start"
    raise Interrupted(f"{current}: {done} of {n} cases done ({len(report.written)} masks written"
                      f"{f', {len(report.failed)} failed' if report.failed else ''}) in {out}", resume=resume)


def _failure_message(e: BaseException) -> str:
    """One line for a failed case: the error's message, with its type unless it is a MedseError, ValueError
    or OSError."""
    msg = str(e).replace("\n", " ").strip() or type(e).__name__
    if not isinstance(e, (MedseError, ValueError, OSError)):
        msg = f"{type(e).__name__}: {msg}"
    return msg


@dataclass
class _Prepared:
    """One case on its way through :func:`predict_folder`'s pipeline."""

    case: InputCase
    action: str = "fail"  # "predict" | "skip" | "fail"
    error: str | None = None
    redo: str | None = None
    target: Path | None = None
    prob_target: Path | None = None
    image: np.ndarray | None = None
    props: dict[str, Any] | None = None
    read_s: float = 0.0
    n_bad: int = 0


class _Inline:
    """A "future" whose call runs in the calling thread: at once, or (``lazy``) when its result is asked for."""

    def __init__(self, fn: Any, args: tuple[Any, ...], lazy: bool) -> None:
        self._call: tuple[Any, tuple[Any, ...]] | None = (fn, args)
        self._value: Any = None
        self._error: Exception | None = None
        if not lazy:
            self._run()

    def _run(self) -> None:
        if self._call is not None:
            fn, args = self._call
            self._call = None
            try:
                self._value = fn(*args)
            except Exception as e:
                self._error = e

    def result(self) -> Any:
        self._run()
        if self._error is not None:
            raise self._error
        return self._value


class _Worker:
    """One background thread running calls in order (``concurrent.futures``), or, when not ``threaded``,
    the calls made in the calling thread (``lazy``: only when their result is asked for).

    An exception raised by a call is raised again by its future's ``result()`` in the caller's thread."""

    def __init__(self, name: str, threaded: bool, lazy: bool = False) -> None:
        self._pool = None
        self._lazy = lazy
        if threaded:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def submit(self, fn: Any, *args: Any) -> Any:
        return _Inline(fn, args, self._lazy) if self._pool is None else self._pool.submit(fn, *args)

    def close(self) -> None:
        if self._pool is not None:  # a write in flight is finished (it is atomic either way); queued calls dropped
            self._pool.shutdown(wait=True, cancel_futures=True)
