"""Sliding-window and slice-by-slice inference that never holds more class scores than needed.

MONAI's :func:`monai.inferers.sliding_window_inference` (behind ``SlidingWindowInferer``) allocates a
float32 ``(K, X, Y, Z)`` output plus a count map on the output device: 4.4 GB for a 512x512x300 scan
with 14 classes, before any resampling (MONAI issues 6427, 9071). :func:`iter_window_slabs` places the
*same* windows (``monai.data.utils.dense_patch_slices`` with MONAI's scan interval and padding) with the
*same* importance map (``monai.data.utils.compute_importance_map``), so its output equals
``SlidingWindowInferer``'s up to float rounding (tested), but it visits the windows in order along one
axis and keeps a buffer only one window deep along that axis. As soon as no later window can touch a
slab, the slab is finalised (divided by its weight sum) and handed on: to an argmax into a uint8 label
map (:func:`sliding_window_labels`), or into a float16 store when probabilities are wanted.
NOTE: not in paper (medse's memory-bounded variant of MONAI's inferer; window placement and blending
are MONAI's, logits are blended before the softmax as in nnU-Net v2).

Peak memory of the buffer: ``4 * (K + 1) * roi_a * prod(size) / size_a`` bytes, ``a`` the streaming
axis (by default the one that makes this smallest). Examples in ``docs/inference.md``.

:func:`iter_slice_slabs` does the same for 2D networks applied slice by slice to a 3D volume.
:func:`flip_tta` wraps a network so each window is averaged over all flips of its spatial axes
(nnU-Net v2's mirroring; 8 passes in 3D, 4 in 2D).
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

__all__ = [
    "LabelAssembler",
    "argmax_channels",
    "choose_stream_axis",
    "flip_tta",
    "iter_slice_slabs",
    "iter_window_slabs",
    "monai_sliding_window",
    "sliding_window_labels",
    "stream_buffer_bytes",
]

Predictor = Callable[[Any], Any]


def _tuple(v: int | Sequence[int], n: int) -> tuple[int, ...]:
    if isinstance(v, (int, np.integer)):
        return (int(v),) * n
    v = tuple(int(x) for x in v)
    if len(v) != n:
        raise ValueError(f"roi_size has {len(v)} values for {n} spatial dimensions")
    return v


def _padded_size(size: Sequence[int], roi: Sequence[int]) -> tuple[tuple[int, ...], list[tuple[int, int]]]:
    """MONAI's padding of an image smaller than the ROI: symmetric, the extra voxel at the end."""
    pads = []
    for s, r in zip(size, roi, strict=True):
        diff = max(r - s, 0)
        pads.append((diff // 2, diff - diff // 2))
    return tuple(s + a + b for s, (a, b) in zip(size, pads, strict=True)), pads


def stream_buffer_bytes(size: Sequence[int], roi: Sequence[int], num_classes: int, axis: int,
                        bytes_per_value: int = 4) -> int:
    """Bytes of the accumulation buffer (scores + weights) of :func:`iter_window_slabs` along ``axis``."""
    padded, _ = _padded_size(size, roi)
    roi_a = min(roi[axis], padded[axis])
    plane = int(np.prod(padded)) // padded[axis]
    return bytes_per_value * (num_classes + 1) * roi_a * plane


def choose_stream_axis(size: Sequence[int], roi: Sequence[int]) -> int:
    """The spatial axis that minimises the buffer (ties: the last axis)."""
    costs = [stream_buffer_bytes(size, roi, 1, a) for a in range(len(size))]
    best = min(costs)
    return max(a for a, c in enumerate(costs) if c == best)


def iter_window_slabs(
    image: Any,
    predictor: Predictor,
    roi_size: int | Sequence[int],
    *,
    overlap: float = 0.5,
    mode: str = "gaussian",
    sigma_scale: float = 0.125,
    sw_batch_size: int = 1,
    device: Any = None,
    axis: int | None = None,
    background: bool = False,
    forwards_done: threading.Event | None = None,
) -> Iterator[Any]:
    """Sliding-window inference yielding finished slabs ``(axis, start, stop, scores)``.

    Args:
        image: tensor ``(C, *spatial)`` (1, 2 or 3 spatial axes), on any device.
        predictor: maps a batch ``(B, C, *roi)`` to scores ``(B, K, *roi)`` (logits or probabilities).
        roi_size: window size (one int for all axes, or one per axis).
        overlap: fraction of overlap between neighbouring windows. Defaults to 0.5 (nnU-Net v2).
        mode: ``"gaussian"`` or ``"constant"`` blending (MONAI). Defaults to ``"gaussian"``.
        sigma_scale: Gaussian sigma as a fraction of the ROI (MONAI). Defaults to 0.125.
        sw_batch_size: windows per forward pass. Defaults to 1.
        device: device the windows run on and the buffer lives on. Defaults to the image's.
        axis: spatial axis to stream along. Defaults to :func:`choose_stream_axis`.
        background: run the window batches through ``predictor`` in a worker thread, one batch ahead of
            the blending, so that blending, finalising and whatever the caller does with a slab (argmax)
            overlap the next forward pass. Same windows, same order, same float operations: the slabs
            are bit-identical to ``background=False``. The worker runs under the caller's grad /
            inference mode and autocast state; at most two batch outputs are alive at once; an exception
            in ``predictor`` is raised here, and closing the iterator early stops the worker. Defaults
            to False.
        forwards_done: set once the last window batch has come back from ``predictor``; the iterator then
            yields ``None`` once, before it blends the output in hand: what is left from there on is blending,
            finalising and the caller's work on the slabs, which a caller may hand to another thread
            (:meth:`Predictor._predict_timed` with ``defer``). Defaults to None (no ``None`` is yielded).

    Yields:
        ``(axis, start, stop, scores)`` with ``scores`` a float32 tensor ``(K, ...)`` covering
        ``start:stop`` along ``axis`` and the full image along the other axes (unpadded coordinates);
        slabs arrive in order and tile the image exactly once. A slab is a view of the internal buffer,
        valid until the next one is requested: copy it (or reduce it) before asking for the next.
    """
    import torch
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    nd = image.ndim - 1
    if nd < 1:
        raise ValueError(f"image must be (C, *spatial), got shape {tuple(image.shape)}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    size = tuple(int(s) for s in image.shape[1:])
    roi = _tuple(roi_size, nd)
    roi = tuple(s if r <= 0 else r for r, s in zip(roi, size, strict=True))  # MONAI: non-positive -> whole axis
    padded, pads = _padded_size(size, roi)
    device = torch.device(device) if device is not None else image.device
    if axis is None:
        axis = choose_stream_axis(size, roi)
    if not 0 <= axis < nd:
        raise ValueError(f"axis must be in [0, {nd}), got {axis}")
    if any(a or b for a, b in pads):
        flat = [p for pair in reversed(pads) for p in pair]
        image = torch.nn.functional.pad(image[None], flat, mode="constant", value=0.0)[0]
    roi_eff = tuple(min(r, p) for r, p in zip(roi, padded, strict=True))
    interval = _get_scan_interval(padded, roi_eff, nd, (overlap,) * nd)
    windows = dense_patch_slices(padded, roi_eff, interval)
    weight = _importance_map(roi_eff, mode, sigma_scale, device)
    groups: dict[int, list[tuple[slice, ...]]] = {}
    for w in windows:
        groups.setdefault(w[axis].start, []).append(w)
    starts = sorted(groups)
    batches = [(z, groups[z][b:b + sw_batch_size]) for z in starts for b in range(0, len(groups[z]), sw_batch_size)]

    def gather(ib: tuple[int, tuple[int, list[tuple[slice, ...]]]]) -> tuple[int, Any]:
        i, (_, batch) = ib
        return i, torch.stack([image[(slice(None), *w)] for w in batch]).to(device)

    def run(ix: tuple[int, Any]) -> Any:
        i, x = ix
        out = predictor(x)
        if out.shape[2:] != x.shape[2:]:
            raise ValueError(f"predictor returned spatial shape {tuple(out.shape[2:])} for windows "
                             f"{tuple(x.shape[2:])}")
        if forwards_done is not None and i == len(batches) - 1:
            forwards_done.set()
        return out.to(device=device, dtype=torch.float32)

    numbered = list(enumerate(batches))
    outputs: Any = (_BackgroundMap(run, numbered, device, prepare=gather) if background
                    else (run(gather(ib)) for ib in numbered))
    try:
        yield from _blend(zip(batches, outputs, strict=True), starts, padded, pads, size, roi_eff[axis], axis, weight,
                          device, forwards_done)
    finally:
        if background:
            outputs.close()


def _importance_map(roi: tuple[int, ...], mode: str, sigma_scale: float, device: Any) -> Any:
    """MONAI's ``compute_importance_map`` (float32), computed once per window size, mode, sigma and device.

    The cached tensor is only ever read (``addcmul_`` / ``+=`` take it as an operand)."""
    key = (tuple(int(r) for r in roi), str(mode), float(sigma_scale), str(device))
    hit = _IMPORTANCE_CACHE.get(key)
    if hit is None:
        import torch
        from monai.data.utils import compute_importance_map

        hit = compute_importance_map(key[0], mode=mode, sigma_scale=sigma_scale, device=device, dtype=torch.float32)
        with _IMPORTANCE_LOCK:
            if len(_IMPORTANCE_CACHE) >= 8:  # a handful of window sizes per process; drop the oldest
                _IMPORTANCE_CACHE.pop(next(iter(_IMPORTANCE_CACHE)))
            _IMPORTANCE_CACHE[key] = hit
    return hit


_IMPORTANCE_CACHE: dict[tuple[Any, ...], Any] = {}
_IMPORTANCE_LOCK = threading.Lock()


class _BackgroundMap:
    """``map(fn, map(prepare, items))`` computed in one worker thread, at most one item ahead of the consumer;
    ``prepare`` (gathering a window batch) runs in a second thread one item ahead of ``fn``, so that the
    worker goes from one forward pass straight to the next.

    Results come back in order; an exception raised by ``fn`` or ``prepare`` is raised by ``__next__`` (the
    worker then stops). The worker runs under the caller's grad / inference mode and autocast state
    (thread-local in torch), on ``device`` for CUDA. :meth:`close` stops the worker and waits for it.
    """

    _DONE = object()

    def __init__(self, fn: Callable[[Any], Any], items: Sequence[Any], device: Any,
                 prepare: Callable[[Any], Any] | None = None) -> None:
        import torch

        self._fn, self._items, self._device = fn, list(items), device
        self._prepare = prepare if prepare is not None else (lambda item: item)
        self._grad = torch.is_grad_enabled()
        self._inference = torch.is_inference_mode_enabled()
        dtype = getattr(device, "type", str(device))
        self._autocast: tuple[str, Any] | None = None
        with contextlib.suppress(Exception):  # device types without autocast support
            if torch.is_autocast_enabled(dtype):
                self._autocast = (dtype, torch.get_autocast_dtype(dtype))
        self._results: queue.Queue[Any] = queue.Queue()
        self._slots = threading.Semaphore(2)  # outputs alive: the one being blended + the one computed next
        self._stop = threading.Event()
        self._held = False
        self._thread = threading.Thread(target=self._work, name="medse-sliding-window", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        import torch

        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.inference_mode(self._inference))
                if not self._inference:
                    stack.enter_context(torch.set_grad_enabled(self._grad))
                if self._autocast is not None:
                    stack.enter_context(torch.autocast(self._autocast[0], dtype=self._autocast[1]))
                cuda = getattr(self._device, "type", None) == "cuda"
                if cuda:
                    torch.cuda.set_device(self._device)
                pool = stack.enter_context(ThreadPoolExecutor(
                    1, thread_name_prefix="medse-sliding-gather",
                    initializer=(lambda: torch.cuda.set_device(self._device)) if cuda else None))
                nxt = pool.submit(self._prepare, self._items[0]) if self._items else None
                for i in range(len(self._items)):
                    self._slots.acquire()
                    if self._stop.is_set():
                        return
                    assert nxt is not None
                    x = nxt.result()
                    nxt = pool.submit(self._prepare, self._items[i + 1]) if i + 1 < len(self._items) else None
                    self._results.put((True, self._fn(x)))
                    del x
        except BaseException as e:  # handed to the consumer, raised there
            self._results.put((False, e))
            return
        self._results.put((True, self._DONE))

    def __iter__(self) -> _BackgroundMap:
        return self

    def __next__(self) -> Any:
        if self._held:  # the consumer is done with the output it took last: the worker may compute one more
            self._held = False
            self._slots.release()
        ok, value = self._results.get()
        if not ok:
            self._stop.set()
            raise value
        if value is self._DONE:
            raise StopIteration
        self._held = True
        return value

    def close(self) -> None:
        self._stop.set()
        self._slots.release()
        self._slots.release()
        self._thread.join()
        while not self._results.empty():  # drop outputs computed ahead
            self._results.get_nowait()


def _blend(batches: Iterator[tuple[tuple[int, list[tuple[slice, ...]]], Any]], starts: list[int],
           padded: tuple[int, ...], pads: list[tuple[int, int]], size: tuple[int, ...], depth: int, axis: int,
           weight: Any, device: Any, forwards_done: threading.Event | None = None
           ) -> Iterator[tuple[int, int, int, Any] | None]:
    """Blending half of :func:`iter_window_slabs`: ``((start, windows), output)`` in window order -> slabs; with
    ``forwards_done``, one ``None`` as soon as it is set (before the output in hand is blended)."""
    import torch

    nd = len(padded)
    acc: torch.Tensor | None = None
    cnt = None
    lo_crop, hi_crop = pads[axis][0], pads[axis][0] + size[axis]
    crop_other = tuple(
        slice(None) if a == axis else slice(pads[a][0], pads[a][0] + size[a]) for a in range(nd)
    )

    def finalise(gi: int) -> Iterator[tuple[int, int, int, Any]]:
        z = starts[gi]
        nxt = starts[gi + 1] if gi + 1 < len(starts) else padded[axis]
        d = nxt - z
        # finalise [z, nxt) along the axis; crop MONAI's padding
        a0, a1 = max(z, lo_crop), min(nxt, hi_crop)
        if a1 > a0:
            sel = [slice(None)] * (nd + 1)
            sel[axis + 1] = slice(a0 - z, a1 - z)
            sel = tuple(sel)
            slab = acc[sel]
            slab.div_(cnt[sel])  # finalised in place; these rows are never accumulated into again
            yield axis, a0 - lo_crop, a1 - lo_crop, slab[(slice(None), *crop_other)]
        if gi + 1 < len(starts):
            keep = depth - d
            # shift rows [d, depth) to [0, keep) in chunks of at most d rows: a chunk's source lies
            # after its destination and is not yet overwritten, and no temporary copy is made
            for c0 in range(0, keep, max(d, 1)):
                c1 = min(keep, c0 + d)
                for buf in (acc, cnt):
                    buf.narrow(axis + 1, c0, c1 - c0).copy_(buf.narrow(axis + 1, c0 + d, c1 - c0))
            tail = [slice(None)] * (nd + 1)
            tail[axis + 1] = slice(keep, depth)
            acc[tuple(tail)] = 0
            cnt[tuple(tail)] = 0

    gi = 0
    handed = forwards_done is None
    for (z, batch), out in batches:
        if not handed and forwards_done.is_set():  # type: ignore[union-attr]
            handed = True
            yield None  # the network is done with this image: the caller may carry on in another thread
        while starts[gi] != z:  # every window of group gi is blended: its leading rows are final
            yield from finalise(gi)
            gi += 1
        if acc is None:
            shape = list(padded)
            shape[axis] = depth
            acc = torch.zeros((out.shape[1], *shape), dtype=torch.float32, device=device)
            cnt = torch.zeros((1, *shape), dtype=torch.float32, device=device)
        for o, w in zip(out, batch, strict=True):
            s = list(w)
            s[axis] = slice(w[axis].start - z, w[axis].stop - z)
            sl = (slice(None), *s)
            acc[sl].addcmul_(o, weight)  # in place: no (K, *roi) temporary
            cnt[sl] += weight
        del out, o  # no reference left to the batch output when the next one is requested
    if acc is not None:
        yield from finalise(gi)


def iter_slice_slabs(
    image: Any,
    predictor: Predictor,
    *,
    axis: int = 2,
    batch_size: int = 4,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.5,
    mode: str = "gaussian",
    sigma_scale: float = 0.125,
    sw_batch_size: int = 4,
    device: Any = None,
) -> Iterator[tuple[int, int, int, Any]]:
    """Apply a 2D network slice by slice to a 3D volume, yielding ``(axis, start, stop, scores)``.

    Args:
        image: tensor ``(C, X, Y, Z)``.
        predictor: maps ``(B, C, H, W)`` to ``(B, K, H, W)``.
        axis: spatial axis (0, 1 or 2) the slices are taken across. Defaults to 2 (axial in RAS).
        batch_size: slices per forward pass. Defaults to 4.
        roi_size: 2D window; when given and smaller than a slice, each slice batch goes through MONAI's
            ``sliding_window_inference``; a slice smaller than the window is padded up to it (MONAI's symmetric
            zero padding) and the scores cropped back. Defaults to None (whole slices; networks pad internally).
        overlap, mode, sigma_scale, sw_batch_size: MONAI sliding-window settings for ``roi_size``.
        device: device the network runs on. Defaults to the image's.
    """
    import torch
    from monai.inferers import sliding_window_inference

    if image.ndim != 4:
        raise ValueError(f"slice-wise inference needs a (C, X, Y, Z) volume, got shape {tuple(image.shape)}")
    device = torch.device(device) if device is not None else image.device
    n = int(image.shape[axis + 1])
    for s0 in range(0, n, batch_size):
        s1 = min(n, s0 + batch_size)
        sl = image.narrow(axis + 1, s0, s1 - s0)  # (C, ..., b, ...)
        x = sl.movedim(axis + 1, 0).to(device)  # (b, C, H, W)
        if roi_size is not None and any(r < s for r, s in zip(roi_size, x.shape[2:], strict=True)):
            # MONAI pads an axis smaller than the window up to it itself
            out = sliding_window_inference(x, tuple(roi_size), sw_batch_size, predictor, overlap=overlap,
                                           mode=mode, sigma_scale=sigma_scale)
        elif roi_size is not None and tuple(roi_size) != tuple(x.shape[2:]):
            # a slice smaller than the window: padded up to the window as MONAI does (a network that normalises
            # per instance may have no spatial extent left at the slice's own size), cropped back after
            size = tuple(int(v) for v in x.shape[2:])
            _, pads = _padded_size(size, roi_size)
            x = torch.nn.functional.pad(x, [p for pair in reversed(pads) for p in pair], mode="constant", value=0.0)
            out = predictor(x)[(..., *(slice(a, a + s) for (a, _), s in zip(pads, size, strict=True)))]
        else:
            out = predictor(x)
        out = out.to(torch.float32).movedim(0, axis + 1)  # (K, ..., b, ...)
        yield axis, s0, s1, out


def monai_sliding_window(image: Any, predictor: Predictor, roi_size: Sequence[int], *, overlap: float = 0.5,
                         mode: str = "gaussian", sigma_scale: float = 0.125, sw_batch_size: int = 1,
                         device: Any = None) -> Any:
    """``monai.inferers.SlidingWindowInferer`` on ``(C, *spatial)``: the full float32 ``(K, *spatial)`` output.

    The reference :func:`iter_window_slabs` is tested against; fine for small volumes.
    """
    from monai.inferers import SlidingWindowInferer

    inferer = SlidingWindowInferer(roi_size=tuple(roi_size), sw_batch_size=sw_batch_size, overlap=overlap,
                                   mode=mode, sigma_scale=sigma_scale, sw_device=device, device=device)
    return inferer(image[None], predictor)[0]


def argmax_channels(scores: Any) -> Any:
    """``argmax`` over the first axis of ``(K, ...)`` scores as uint8 (int16 above 256 classes), by K
    element-wise passes: far faster than ``torch.argmax(dim=0)`` on strided slabs and no int64 output.
    Ties go to the lowest index, as ``torch.argmax``."""
    import torch

    k = int(scores.shape[0])
    idx = torch.zeros(scores.shape[1:], dtype=torch.uint8 if k <= 256 else torch.int16, device=scores.device)
    best = scores[0].clone()
    for c in range(1, k):
        better = scores[c] > best
        idx[better] = c
        torch.maximum(best, scores[c], out=best)
    return idx


class LabelAssembler:
    """Slabs of scores -> a uint8/uint16 label map (argmax), optionally float16 softmax probabilities."""

    def __init__(self, spatial_shape: Sequence[int], probabilities: bool = False) -> None:
        self.spatial_shape = tuple(int(s) for s in spatial_shape)
        self.probabilities = probabilities
        self.labels: np.ndarray | None = None
        self.probs: np.ndarray | None = None

    def add(self, axis: int, a0: int, a1: int, scores: Any) -> None:
        import torch

        k = int(scores.shape[0])
        if self.labels is None:
            self.labels = np.zeros(self.spatial_shape, dtype=np.uint8 if k <= 256 else np.uint16)
            if self.probabilities:
                self.probs = np.zeros((k, *self.spatial_shape), dtype=np.float16)
        sel = [slice(None)] * len(self.spatial_shape)
        sel[axis] = slice(a0, a1)
        self.labels[tuple(sel)] = argmax_channels(scores).cpu().numpy().astype(self.labels.dtype, copy=False)
        if self.probs is not None:
            self.probs[(slice(None), *sel)] = torch.softmax(scores, dim=0).cpu().numpy().astype(np.float16)

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self.labels is None:
            raise ValueError("no slabs were produced")
        return self.labels, self.probs


def sliding_window_labels(slabs: Iterator[tuple[int, int, int, Any]], spatial_shape: Sequence[int], *,
                          probabilities: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Consume slabs of scores: argmax into a uint8/uint16 label map, optionally softmax into float16.

    Returns ``(labels (*spatial), probs (K, *spatial) float16 or None)``; the float32 scores of one slab
    are the only full-precision class scores alive at any time.
    """
    asm = LabelAssembler(spatial_shape, probabilities)
    for slab in slabs:
        asm.add(*slab)
    return asm.result()


def flip_tta(model: Callable[[Any], Any], spatial_dims: int) -> Callable[[Any], Any]:
    """Average ``model`` over every flip of the spatial axes (mirroring TTA of nnU-Net v2).

    ``2**spatial_dims`` forward passes per window; each output is flipped back before averaging.
    """
    axes = tuple(range(2, 2 + spatial_dims))
    combos = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]

    def run(x: Any) -> Any:
        total = None
        for c in combos:
            xi = x.flip(c) if c else x
            y = model(xi)
            y = y.flip(c) if c else y
            total = y if total is None else total + y
        return total / len(combos)

    return run
