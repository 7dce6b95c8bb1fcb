"""Run an exported network (``model.onnx`` through onnxruntime, ``model.ts`` through ``torch.jit.load``) as a torch
callable: tensors in, tensors out, so that it takes the network's place in the predictor's sliding window
(``medse predict --model``) and in :func:`medse.export.export_run`'s parity check."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from medse.utils.errors import MedseError

__all__ = ["OnnxNetwork", "check_window", "load_network", "network_format"]


def network_format(path: str | os.PathLike) -> str:
    """``"onnx"`` for a ``.onnx`` file, ``"torchscript"`` for ``.ts`` / ``.pt`` / ``.pth`` (a one-line error
    naming the file otherwise)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".ts", ".pt", ".pth"):
        return "torchscript"
    raise MedseError(f"unknown model file type '{suffix or 'no suffix'}': expected .onnx (onnxruntime) or .ts "
                     "(TorchScript), as medse export writes", path)


class OnnxNetwork(nn.Module):
    """An onnxruntime session (CPU) behind ``forward(x: Tensor) -> Tensor``.

    The session uses ``torch.get_num_threads()`` threads, so ``OMP_NUM_THREADS`` / ``--threads`` bound it as they
    bound torch. The input is sent as float32; the output comes back on the input's device. An ``nn.Module`` without
    parameters, so that ``.to(device)`` and ``.eval()`` work where a torch network is expected.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        import onnxruntime as ort
        import torch

        self.path = Path(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, torch.get_num_threads())
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # not an ONNX file, truncated, unsupported opset
            first = str(e).strip().splitlines()
            raise MedseError(f"onnxruntime cannot load the model ({first[0] if first else type(e).__name__})",
                             self.path) from e
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise MedseError(f"expected a network with one input and an output, got {len(inputs)} input(s) and "
                             f"{len(outputs)} output(s)", self.path)
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.input_shape, self.output_shape = list(inputs[0].shape), list(outputs[0].shape)

    def forward(self, x: Any) -> Any:
        import numpy as np
        import torch

        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        y = self.session.run([self.output_name], {self.input_name: arr})[0]
        return torch.from_numpy(y).to(x.device)


def _static(dim: Any) -> int | None:
    return dim if isinstance(dim, int) else None


def load_network(path: str | os.PathLike, fmt: str | None = None, *, in_channels: int | None = None,
                 num_classes: int | None = None) -> Any:
    """The exported network at ``path`` as a torch callable in eval mode on the CPU.

    ``in_channels`` / ``num_classes``: when given, an ONNX file whose static channel axes differ is refused with
    a one-line error naming it (a model exported from another run).
    """
    path = Path(path)
    if not path.is_file():
        raise MedseError("model file not found", path)
    fmt = fmt or network_format(path)
    if fmt == "onnx":
        net = OnnxNetwork(path)
        for what, want, shape in (("input channels", in_channels, net.input_shape),
                                  ("output classes", num_classes, net.output_shape)):
            got = _static(shape[1]) if len(shape) > 1 else None
            if want is not None and got is not None and got != int(want):
                raise MedseError(f"the model has {got} {what}, the run {want}: it was exported from another run",
                                 path)
        return net.eval()
    import torch

    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:
        first = str(e).strip().splitlines()
        raise MedseError(f"torch.jit.load cannot load the model ({first[0] if first else type(e).__name__})",
                         path) from e


def check_window(path: str | os.PathLike, roi_size: Any) -> None:
    """Refuse a sliding window the exported network at ``path`` was not made for, as its ``export.json`` (beside
    it, when there) records: a trace froze the network's padding to the size divisor, so a file takes only
    multiples of that divisor, or only the exported patch size (``spatial_sizes``)."""
    import json

    meta = Path(path).with_name("export.json")
    if roi_size is None or not meta.is_file():
        return
    try:
        info = json.loads(meta.read_text())
        sizes = info.get("spatial_sizes") or {}
        if info.get("file") != Path(path).name or not isinstance(sizes, dict):
            return  # another file's metadata, or an older layout: nothing to check against
    except (OSError, ValueError, AttributeError):
        return
    roi = [int(v) for v in roi_size]
    fixed, multiple = sizes.get("fixed"), sizes.get("multiple_of")
    if fixed is not None and roi != [int(v) for v in fixed]:
        want = ",".join(str(int(v)) for v in fixed)
        raise MedseError(f"the exported network takes windows of exactly {want} ({sizes.get('why')}; see {meta}), "
                         f"not {','.join(map(str, roi))}: use --roi-size {want}", path)
    if multiple and any(v % int(multiple) for v in roi):
        raise MedseError(f"the exported network takes windows whose sides are multiples of {multiple} "
                         f"({sizes.get('why')}; see {meta}), not {','.join(map(str, roi))}", path)
