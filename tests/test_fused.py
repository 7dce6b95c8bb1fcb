"""Fused fast paths (medse/attention/kernels/): same outputs and gradients as the plain blocks.

Every fast block is compared with its ``fused=False`` twin (values, input and parameter gradients, 1e-5 relative)
with the cache blocking forced to many chunks and with the default, checked with ``torch.autograd.gradcheck`` in
float64 (input and parameters), and checked to save no more bytes for backward than the plain code.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _benchload import load_benchmark
from torch.func import functional_call

import medse.attention.kernels as K
from medse.attention import create_attention
from medse.attention.kernels import coord as kernels_coord
from medse.attention.kernels import core as F
from medse.attention.kernels import simam as kernels_simam

# (registry name, kwargs, spatial dims to test)
CASES = [
    ("cse", {}, (1, 2, 3)),
    ("se", {}, (2, 3)),
    ("eca", {}, (1, 2, 3)),
    ("sse", {}, (1, 2, 3)),
    ("scse", {"aggregation": "max"}, (1, 2, 3)),
    ("scse", {"aggregation": "add"}, (2, 3)),
    ("scse", {"aggregation": "mul"}, (2, 3)),
    ("simam", {}, (1, 2, 3)),
    ("ca", {}, (2, 3)),
]
FN_NAMES = {"cse": "_ChannelFn", "se": "_ChannelFn", "eca": "_ChannelFn", "sse": "_SpatialFn",
            "scse": "_SCSEFn", "simam": "_SimAMFn", "ca": "_CoordFn"}
SHAPES = {1: (2, 16, 37), 2: (2, 16, 9, 11), 3: (2, 16, 5, 6, 7)}


def _pair(name: str, sd: int, c: int, **kw):
    torch.manual_seed(0)
    fused = create_attention(name, sd, c, **kw)
    plain = copy.deepcopy(fused)
    for m in plain.modules():
        if hasattr(m, "fused"):
            m.fused = False
    return fused, plain


def _input(shape, seed=1, zeros=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.3
    if zeros:  # exact zeros (as after a ReLU) exercise the tie rule of the maximum
        x[x < -0.5] = 0.0
    return x.to(dtype)


def _run(module, x, gy):
    xi = x.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(xi)
    y.backward(gy)
    return y.detach(), xi.grad, [p.grad for p in module.parameters()], y


def _close(a, b, rtol=1e-5):
    scale = b.abs().max().item() + 1e-12
    assert torch.isfinite(a).all()
    err = (a - b).abs().max().item() / scale
    assert err <= rtol, f"relative error {err:.3e} > {rtol}"


@pytest.fixture(autouse=True)
def _fast_path_on_tiny_inputs(monkeypatch):
    """The tests use tiny tensors: take the fast path at every size (blocks skip it below MIN_ELEMENTS)."""
    monkeypatch.setattr(F, "MIN_ELEMENTS", 0)


def test_small_inputs_use_the_plain_code(monkeypatch):
    monkeypatch.setattr(F, "MIN_ELEMENTS", 1000)
    fused, plain = _pair("scse", 2, 8)
    small, large = _input((1, 8, 5, 5)), _input((1, 8, 12, 12))
    assert not fused.takes_fast_path(small) and fused.takes_fast_path(large)
    y = fused(small.requires_grad_(True))
    assert type(y.grad_fn).__name__ != "_SCSEFnBackward"
    _close(y.detach(), plain(small).detach())
    assert type(fused(large.requires_grad_(True)).grad_fn).__name__ == "_SCSEFnBackward"


@pytest.fixture(params=[16, None], ids=["many-chunks", "default-chunks"])
def chunking(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setattr(F, "CHUNK_ELEMENTS", request.param)
        monkeypatch.setattr(F, "SCRATCH_ELEMENTS", request.param)  # the kernels that always work in blocks
    return request.param


@pytest.mark.parametrize(("name", "kw", "dims"), CASES, ids=[f"{c[0]}-{c[1].get('aggregation', '')}" for c in CASES])
def test_fused_matches_plain(name, kw, dims, chunking):
    for sd in dims:
        shape = SHAPES[sd]
        fused, plain = _pair(name, sd, shape[1], **kw)
        x = _input(shape)
        gy = _input(shape, seed=2, zeros=False)
        yf, gxf, gpf, yraw = _run(fused, x, gy)
        yp, gxp, gpp, _ = _run(plain, x, gy)
        assert type(yraw.grad_fn).__name__ == FN_NAMES[name] + "Backward", f"{name} {sd}D did not take the fast path"
        assert yf.shape == x.shape
        _close(yf, yp)
        _close(gxf, gxp)
        if gpp:
            scale = max(g.abs().max().item() for g in gpp)  # BN-cancelled grads (CA conv1.bias) are ~0: global scale
            for a, b in zip(gpf, gpp, strict=True):
                assert a is not None and a.shape == b.shape
                assert (a - b).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize(("name", "kw", "dims"), CASES, ids=[f"{c[0]}-{c[1].get('aggregation', '')}" for c in CASES])
def test_gradcheck_float64(name, kw, dims, monkeypatch):
    monkeypatch.setattr(F, "CHUNK_ELEMENTS", 24)  # several chunks even on tiny inputs
    monkeypatch.setattr(F, "SCRATCH_ELEMENTS", 24)
    sd = dims[-1]
    c = 16 if name == "se" else 8  # se: reduction 16
    shape = {1: (2, c, 7), 2: (2, c, 4, 5), 3: (2, c, 3, 4, 3)}[sd]
    fused, _ = _pair(name, sd, shape[1], **kw)
    fused = fused.double()
    names = [n for n, _ in fused.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in fused.parameters()]
    x = _input(shape, zeros=False, dtype=torch.float64).requires_grad_(True)

    def f(xx, *ps):
        return functional_call(fused, dict(zip(names, ps, strict=True)), (xx,))

    assert type(f(x, *params).grad_fn).__name__ == FN_NAMES[name] + "Backward"
    # fast_mode: random projections of the Jacobian (v^T J u) instead of every column, analytic vs numerical
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)
    # and the full Jacobian wrt the input on an even smaller case
    xs = x[:1, :, :2, :2, :2] if sd == 3 else x[:1, :, :2, :3] if sd == 2 else x[:1, :, :5]
    xs = xs.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda xx: f(xx, *params), (xs,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_scse_max_ties_split_like_torch_maximum():
    # x == 0 everywhere on one channel: both branches tie; torch.maximum gives each half of the gradient
    fused, plain = _pair("scse", 2, 8, aggregation="max")
    x = _input((1, 8, 6, 6))
    x[:, 3] = 0.0
    gy = _input((1, 8, 6, 6), seed=3, zeros=False)
    _, gxf, gpf, _ = _run(fused, x, gy)
    _, gxp, gpp, _ = _run(plain, x, gy)
    _close(gxf, gxp)
    # the other tie rule (gate max(c, q) where x == 0) would differ visibly: the test can tell them apart
    q = torch.sigmoid(plain.sse.conv(x))[:, 0]
    c = plain.cse.channel_gate(x)[:, 3]
    other_rule = gxp[:, 3] + gy[:, 3] * (torch.maximum(c, q) - (c + q) / 2)
    assert (other_rule - gxf[:, 3]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["cse", "eca", "sse", "scse", "simam", "ca"])
def test_no_grad_and_inference_mode(name, monkeypatch):
    monkeypatch.setattr(F, "CHUNK_ELEMENTS", 32)
    monkeypatch.setattr(F, "SCRATCH_ELEMENTS", 32)
    fused, plain = _pair(name, 3, 16)
    fused.eval()
    plain.eval()
    x = _input((2, 16, 4, 5, 6))
    with torch.no_grad():
        yp = plain(x)
        yf = fused(x)
    _close(yf, yp)
    with torch.inference_mode():
        yi = fused(x)
    _close(yi, yp)


@pytest.mark.parametrize("name", ["sse", "scse"])
def test_record_gate_matches_plain(name):
    fused, plain = _pair(name, 2, 8, record_gate=True)
    x = _input((2, 8, 5, 7)).requires_grad_(True)
    fused(x)
    plain(x)
    assert fused.last_gate.shape == (2, 1, 5, 7)
    assert not fused.last_gate.requires_grad
    _close(fused.last_gate, plain.last_gate)


@pytest.mark.parametrize("name", ["simam", "ca"])
def test_record_gate_falls_back_to_plain(name):
    fused, plain = _pair(name, 2, 8, record_gate=True)
    x = _input((2, 8, 5, 7)).requires_grad_(True)
    y = fused(x)
    plain(x)
    assert "Backward" in type(y.grad_fn).__name__ and FN_NAMES[name] not in type(y.grad_fn).__name__
    _close(fused.last_gate, plain.last_gate)


def test_half_precision_simam_uses_plain_code():
    fused, plain = _pair("simam", 2, 4)
    x = _input((1, 4, 6, 6)).to(torch.bfloat16)
    assert not fused.takes_fast_path(x)
    torch.testing.assert_close(fused(x), plain(x))


@pytest.mark.parametrize("name", ["scse", "sse", "cse", "simam", "ca"])
def test_channels_last_input(name, monkeypatch):
    monkeypatch.setattr(F, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(F, "SCRATCH_ELEMENTS", 64)
    fused, plain = _pair(name, 3, 16)
    x = _input((2, 16, 4, 5, 6)).contiguous(memory_format=torch.channels_last_3d)
    gy = _input((2, 16, 4, 5, 6), seed=5, zeros=False)
    yf, gxf, _, _ = _run(fused, x, gy)
    yp, gxp, _, _ = _run(plain, x, gy)
    _close(yf, yp)
    _close(gxf, gxp)


def _saved_nbytes(module, x):
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x.clone().requires_grad_(True))
    return sum(seen.values())


@pytest.mark.parametrize(("name", "kw"), [(c[0], c[1]) for c in CASES])
def test_saves_no_more_than_plain(name, kw):
    fused, plain = _pair(name, 3, 16, **kw)
    x = _input((2, 16, 8, 8, 8))
    nf, npl = _saved_nbytes(fused, x), _saved_nbytes(plain, x)
    full = x.numel() * x.element_size()
    assert nf <= npl
    assert nf < 1.5 * full  # the input plus vectors, never a second full-size tensor


def test_functional_api_errors_and_shapes():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="aggregation"):
        K.scse_attention(x, lambda z: torch.sigmoid(z), (), torch.ones(4), None, aggregation="avg")
    with pytest.raises(ValueError, match="coord_attention"):
        K.coord_attention(torch.randn(2, 4, 5), lambda *s: list(s), ())
    y, q = K.spatial_attention(x, torch.zeros(1, 4, 1, 1), torch.zeros(1))
    torch.testing.assert_close(y, x * 0.5)
    assert q.shape == (2, 1, 9)
    assert not create_attention("cse", 2, 4).takes_fast_path(torch.zeros(2, 4, 3, 3, dtype=torch.int64))


def test_spans_cover_axis(monkeypatch):
    monkeypatch.setattr(F, "CHUNK_ELEMENTS", 10)
    spans = F.chunk_spans(23, 3, torch.device("cpu"))
    assert spans[0] == (0, 3) and spans[-1] == (21, 23)
    assert sum(b - a for a, b in spans) == 23
    monkeypatch.setattr(F, "CHUNK_ELEMENTS", 0)
    assert F.chunk_spans(23, 3, torch.device("cpu")) == [(0, 23)]
    monkeypatch.setattr(F, "SCRATCH_ELEMENTS", 12)  # blocks of a scratch buffer's size whatever CHUNK_ELEMENTS
    assert F.chunk_spans(23, 3, torch.device("cpu"), scratch=True)[:2] == [(0, 4), (4, 8)]


def test_bench_blocks_smoke(tmp_path):
    bench = load_benchmark("bench_blocks")
    rows = bench.bench_shape(2, (1, 8, 8, 8), [("scse (max)", "scse", {"aggregation": "max"})], 1,
                             torch.device("cpu"), torch.float32, False, lambda m: None)
    assert [r["block"] for r in rows] == ["floor", "conv", "scse (max)", "scse (max)"]
    assert [r["variant"] for r in rows] == ["", "", "plain", "fused"]
    assert rows[0]["x_floor"] == pytest.approx(1.0)
    assert all(r["fwdbwd"] > 0 and r["saved"] >= 0 for r in rows)
    md = bench.to_markdown("2D", (1, 8, 8, 8), rows, 1)
    assert md.count("\n| scse (max) |") == 2


def test_backend_switch_validates_and_falls_back(monkeypatch):
    assert K.get_backend() in ("eager", "compile")
    with pytest.raises(ValueError, match="backend must be one of"):
        K.set_backend("triton")

    def broken_compile(fn, **kw):
        def run(*a):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(F, "_compiled", {})
    monkeypatch.setattr(F, "_compile_failed", False)
    monkeypatch.setattr(F, "_backend", "compile")
    monkeypatch.setattr(F, "COMPILE_MIN_ELEMENTS", 0)
    fused, plain = _pair("simam", 2, 4)
    x = _input((2, 4, 5, 6))
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        yf, gxf, _, _ = _run(fused, x, torch.ones_like(x))
    yp, gxp, _, _ = _run(plain, x, torch.ones_like(x))
    _close(yf, yp)
    _close(gxf, gxp)
    assert F._compile_failed and F.compiled_kernel(kernels_simam._ck_simam_fwd) is None


def test_compile_backend_skips_small_tensors(monkeypatch):
    calls = []
    monkeypatch.setattr(F, "_backend", "compile")
    monkeypatch.setattr(F, "COMPILE_MIN_ELEMENTS", 1000)
    monkeypatch.setattr(F, "compiled_kernel", lambda fn: calls.append(fn.__name__) or fn)
    apply = kernels_coord._ck_ca_apply
    assert F.compiled_call(apply, torch.ones(2, 4, 5, 5), torch.ones(2, 4, 5, 1), torch.ones(2, 4, 1, 5)) is None
    assert calls == []
    out = F.compiled_call(apply, torch.ones(2, 4, 25, 25), torch.ones(2, 4, 25, 1), torch.ones(2, 4, 1, 25))
    assert calls == ["_ck_ca_apply"] and out.shape == (2, 4, 25, 25)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "kw"), [("scse", {"aggregation": "max"}), ("scse", {"aggregation": "add"}),
                                          ("scse", {"aggregation": "mul"}), ("simam", {}), ("ca", {})])
def test_compile_backend_matches_plain(name, kw, monkeypatch):
    monkeypatch.setattr(F, "_backend", "compile")
    monkeypatch.setattr(F, "COMPILE_MIN_ELEMENTS", 0)
    for sd in (2, 3):
        shape = SHAPES[sd]
        fused, plain = _pair(name, sd, shape[1], **kw)
        x, gy = _input(shape), _input(shape, seed=2, zeros=False)
        yf, gxf, gpf, _ = _run(fused, x, gy)
        yp, gxp, gpp, _ = _run(plain, x, gy)
        _close(yf, yp)
        _close(gxf, gxp)
        scale = max(g.abs().max().item() for g in gpp) if gpp else 0.0
        for a, b in zip(gpf, gpp, strict=True):
            assert (a - b).abs().max().item() <= 1e-5 * scale
    assert not F._compile_failed


@pytest.mark.slow
def test_bench_networks_smoke(tmp_path):
    bench = load_benchmark("bench_networks")
    out = tmp_path / "net.md"
    assert bench.main(["--quick", "--repeats", "1", "--blocks", "scse", "--networks", "unet", "--output",
                       str(out)]) == 0
    text = out.read_text()
    assert "U-Net 3D" in text and text.count("| scse (max) |") == 2 and "| none |" in text


def test_whole_model_compile_traces_the_plain_formula(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    fused, _ = _pair("scse", 2, 8)
    assert not fused.takes_fast_path(torch.randn(1, 8, 4, 4))
    assert not create_attention("simam", 2, 8).takes_fast_path(torch.randn(1, 8, 4, 4))
