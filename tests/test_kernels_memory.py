"""Full-size buffers the fused backward passes allocate (issue 14): on CPU each fresh buffer costs page faults
worth several in-place passes, so the backward of SimAM and scSE-max allocates one (the gradient) plus a
cache-sized scratch (its blocks). Measured as the CPU allocator's peak during ``backward`` (torch profiler), as a
multiple of the input's bytes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from _benchload import load_benchmark
from torch.profiler import ProfilerActivity, profile

from medse.attention import create_attention
from medse.attention.kernels import core as F

SHAPE = (2, 8, 16, 16, 16)  # 65536 elements: the fast path's default threshold


def peak_allocated(fn, tmp_path: Path) -> int:
    """Most bytes allocated at once during ``fn()`` above the level before it: the CPU allocator's running total
    ("Total Allocated") on the profiler's ``[memory]`` events (exact, unlike summing per-operator memory)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    mem = sorted((e for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"),
                 key=lambda e: e["ts"])
    assert mem, "the profiler recorded no allocation"
    before = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in mem) - before


WIDE = (2, 32, 16, 16, 8)  # as many elements, with per-position vectors 1/32 of the input as in a real network


def _backward_peak(block: torch.nn.Module, tmp_path: Path) -> float:
    x = torch.randn(WIDE, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    y = block(x)
    gy = torch.randn_like(y)
    return peak_allocated(lambda: y.backward(gy), tmp_path) / (x.numel() * x.element_size())


@pytest.mark.parametrize(("name", "kw", "most"), [
    ("simam", {}, 1.0),
    ("scse", {"aggregation": "max"}, 1.0),
    ("scse", {"aggregation": "add"}, 1.0),
])
def test_backward_allocates_few_full_size_buffers(name, kw, most, monkeypatch, tmp_path):
    monkeypatch.setattr(F, "CHUNK_ELEMENTS", 0)
    monkeypatch.setattr(F, "SCRATCH_ELEMENTS", 4096)  # a cache-sized scratch is 1/16 of the input here
    block = create_attention(name, 3, WIDE[1], **kw)
    assert block.takes_fast_path(torch.empty(WIDE))
    peak = _backward_peak(block, tmp_path)
    # the gradient, plus a block's scratch and per-(B, C) / per-position vectors (under 0.5 of the input here)
    assert most <= peak < most + 0.5, f"{name}: backward peak {peak:.2f} x the input's bytes"


def _load(name: str):
    return load_benchmark(name)


@pytest.mark.slow
def test_bench_step_and_memory_smoke(tmp_path):
    step = _load("bench_step")
    out = tmp_path / "step.md"
    assert step.main(["--quick", "--networks", "demo", "--blocks", "cse", "simam", "--rounds", "2",
                      "--output", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("<!-- medse:result\ncommand: python benchmarks/bench_step.py --quick")
    assert "\ncommit: " in text and "\nenvironment: " in text and "\nsource_files: " in text
    assert "| simam | fused (default) | 2 |" in text and "| none |" in text
    mem = _load("bench_memory")
    out = tmp_path / "mem.md"
    assert mem.main(["--quick", "--networks", "demo", "--blocks", "scse", "--output", str(out)]) == 0
    rows = [r for r in out.read_text().splitlines() if r.startswith("| scse (max)")]
    assert len(rows) == 1 and re.search(r"% \| (met|missed) \(<= \+5\.0%\) \|$", rows[0])


@pytest.mark.parametrize("block", ["simam", "scse", "sse", "cse", "ca"])
def test_fast_paths_take_non_contiguous_inputs(block):
    """A permuted (channels-last-like) input, as transformer networks hand to their convolutional stages: the fast
    path equals the plain formula in value and gradient (SimAM's backward once used .view on such strides)."""
    from medse.attention import create_attention

    torch.manual_seed(0)
    x0 = torch.randn(2, 20, 20, 20, 8).permute(0, 4, 1, 2, 3)  # (B, C, X, Y, Z), not contiguous
    assert not x0.is_contiguous() and x0.numel() >= 65536
    fused = create_attention(block, 3, 8)
    plain = create_attention(block, 3, 8, fused=False)
    plain.load_state_dict(fused.state_dict())
    assert fused.takes_fast_path(x0)
    outs, grads = [], []
    for m in (fused, plain):
        x = x0.detach().clone().requires_grad_()
        y = m(x)
        y.backward(torch.ones_like(y))
        outs.append(y.detach())
        grads.append(x.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,kw", [("cse", {}), ("eca", {}), ("se", {"reduction": 4}), ("sse", {}),
                                     ("scse", {"aggregation": "max", "reduction": 2})])
def test_channel_gates_keep_their_output_not_their_input(name, kw):
    """The channel family's backward needs only the output and the (B, C) gate (sum dy x = sum(dy y) / c), sSE's
    only the output and the (B, N) gate (sum_c dy x = sum_c(dy y) / q), so their Functions save y, which the next
    layer saves anyway: the block's input is not kept alive for backward (a
    training step of a U-Net then holds no extra activation per block). scSE-max too: ``y = x c`` or ``x q`` with
    the branch given by ``sign(y (q - c))``. Gradients equal the plain formula's."""
    torch.manual_seed(0)
    block = create_attention(name, 3, 8, **kw)
    a = torch.randn(*SHAPE, requires_grad=True)
    x = a * 1.0  # a non-leaf input, as inside a network
    y = block(x)
    saved = y.grad_fn.saved_tensors
    ptr = x.untyped_storage().data_ptr()
    assert saved and all(t.untyped_storage().data_ptr() != ptr for t in saved if t.numel() == x.numel())
    assert any(t.untyped_storage().data_ptr() == y.untyped_storage().data_ptr() for t in saved)
    dy = torch.randn_like(y)
    (ga,) = torch.autograd.grad(y, a, dy)
    block.fused = False
    (gp,) = torch.autograd.grad(block(a * 1.0), a, dy)
    torch.testing.assert_close(ga, gp, rtol=1e-4, atol=1e-6)


def test_channel_gate_survives_a_saturated_gate():
    """A gate of exactly 0 (sigmoid underflow) gives finite gradients equal to the plain formula's."""
    from medse.attention.kernels.channel import channel_attention

    x = torch.randn(*SHAPE, dtype=torch.float64, requires_grad=True)
    w = torch.ones(8, dtype=torch.float64, requires_grad=True)

    def gate(z):
        return torch.sigmoid(w * z * 0 + torch.tensor([-800.0] + [0.5] * 7, dtype=z.dtype))

    dy = torch.randn(*SHAPE, dtype=torch.float64)
    g_fast = torch.autograd.grad(channel_attention(x, gate, [w]), (x, w), dy)
    g_plain = torch.autograd.grad(x * gate(x.flatten(2).mean(-1)).view(2, 8, 1, 1, 1), (x, w), dy)
    for f, p in zip(g_fast, g_plain, strict=True):
        assert torch.isfinite(f).all()
        torch.testing.assert_close(f, p)


def test_spatial_gate_survives_a_saturated_gate():
    """sSE with gates of exactly 0 at some positions (sigmoid underflow): finite gradients equal to the plain
    formula's, the conv weight's included."""
    from medse.attention.kernels.spatial import spatial_attention

    torch.manual_seed(0)
    x = torch.randn(*SHAPE, dtype=torch.float64)
    x[:, :, :4] = 100.0  # w . x = -800 there: sigmoid(-800) == 0 in float64
    x.requires_grad_(True)
    w = torch.full((8,), -1.0, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(*SHAPE, dtype=torch.float64)
    y, q = spatial_attention(x, w, b)
    assert (q == 0).any()
    g_fast = torch.autograd.grad(y, (x, w, b), dy)
    qp = torch.sigmoid((x * w.view(1, -1, 1, 1, 1)).sum(1, keepdim=True) + b)
    g_plain = torch.autograd.grad(x * qp, (x, w, b), dy)
    for f, p in zip(g_fast, g_plain, strict=True):
        assert torch.isfinite(f).all()
        torch.testing.assert_close(f, p)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("blocks", ["one", "several"])
def test_scse_max_from_its_output_matches_the_plain_formula(dtype, blocks, monkeypatch):
    """scSE-max's output-saving backward against autograd through ``torch.maximum``, gate parameters included,
    with many positions on each branch and some exact ties (a channel gate equal to the spatial one); in one
    cache block and in several (the last one shorter)."""
    from medse.attention.kernels.spatial import scse_attention

    if blocks == "several":
        monkeypatch.setattr(F, "SCRATCH_ELEMENTS", 3000)  # 16 rows: blocks of 187 positions
    torch.manual_seed(0)
    x = torch.randn(*SHAPE, dtype=dtype, requires_grad=True)
    lin = torch.nn.Linear(8, 8, dtype=dtype)
    w = (torch.randn(8, dtype=dtype) * 0.5).requires_grad_()
    b = torch.zeros(1, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        x[:, :, 0] = 0.0  # w . x = 0 there: q = 1/2 ...
        lin.weight.zero_()
        lin.bias[:2] = 0.0  # ... = c for channels 0 and 1: ties

    def gate(z):
        return torch.sigmoid(lin(z))

    y, q = scse_attention(x, gate, list(lin.parameters()), w, b, "max")
    assert y.grad_fn.saves_output
    c = gate(x.flatten(2).mean(-1)).view(2, 8, 1, 1, 1)
    qp = torch.sigmoid((x * w.view(1, -1, 1, 1, 1)).sum(1, keepdim=True) + b)
    yp = torch.maximum(x * c, x * qp)
    torch.testing.assert_close(y, yp)
    dy = torch.randn_like(y)
    leaves = (x, w, b, *lin.parameters())
    g_fast = torch.autograd.grad(y, leaves, dy)
    g_plain = torch.autograd.grad(yp, leaves, dy)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
    for f, p in zip(g_fast, g_plain, strict=True):
        torch.testing.assert_close(f, p, **tol)


def test_scse_max_keeps_its_input_when_a_channel_gate_saturates():
    """A channel gate of exactly 0 hides x where that branch wins (y = 0 there), and the spatial weight's gradient
    needs x everywhere: the Function keeps x then, and the gradients equal the plain formula's."""
    from medse.attention.kernels.spatial import scse_attention

    torch.manual_seed(0)
    x = torch.randn(*SHAPE, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([-800.0] + [0.3] * 7, dtype=torch.float64)
    p = torch.ones(8, dtype=torch.float64, requires_grad=True)

    def gate(z):
        return torch.sigmoid(p * z + bias)  # channel 0: sigmoid(-800) == 0

    y, _ = scse_attention(x, gate, [p], w, None, "max")
    assert not y.grad_fn.saves_output
    c = gate(x.flatten(2).mean(-1)).view(2, 8, 1, 1, 1)
    assert (c == 0).any()
    yp = torch.maximum(x * c, x * torch.sigmoid((x * w.view(1, -1, 1, 1, 1)).sum(1, keepdim=True)))
    dy = torch.randn_like(y)
    for f, g in zip(torch.autograd.grad(y, (x, w, p), dy), torch.autograd.grad(yp, (x, w, p), dy), strict=True):
        torch.testing.assert_close(f, g)


# ---------------------------------------------------------------- blocks writing into the skip concatenation

CAT_BLOCKS = [("cse", {}), ("eca", {}), ("se", {"reduction": 4}), ("sse", {}),
              ("scse", {"aggregation": "max"}), ("scse", {"aggregation": "add"}), ("scse", {"aggregation": "mul"})]


@pytest.mark.parametrize("name,kw", CAT_BLOCKS)
def test_forward_cat_writes_the_concatenation_with_the_same_numbers(name, kw):
    """``block.forward_cat(skip, x)`` is ``torch.cat([skip, block(x)], 1)`` bit for bit, gradients included, and
    the fused Function returns (and, where it keeps its output, saves) the concatenation itself."""
    torch.manual_seed(0)
    block = create_attention(name, 3, 8, **kw)
    a = torch.randn(*SHAPE, requires_grad=True)
    s = torch.randn(2, 4, *SHAPE[2:], requires_grad=True)
    x, skip = a * 1.0, s * 1.0
    ref = torch.cat([skip, block(x)], 1)
    out = block.forward_cat(skip, x)
    assert type(out.grad_fn).__name__ in ("_ChannelFnBackward", "_SpatialFnBackward", "_SCSEFnBackward")
    assert torch.equal(out, ref)
    if name != "scse" or kw["aggregation"] == "max":
        ptr = out.untyped_storage().data_ptr()
        assert any(t.untyped_storage().data_ptr() == ptr for t in out.grad_fn.saved_tensors)
    dy = torch.randn_like(ref)
    wrt = (a, s, *block.parameters())
    grads = torch.autograd.grad(ref, wrt, dy, retain_graph=True), torch.autograd.grad(out, wrt, dy)
    for g_ref, g in zip(*grads, strict=True):
        assert torch.equal(g_ref, g)
    with torch.no_grad():
        assert torch.equal(block.forward_cat(skip, x), ref)


def test_forward_cat_falls_back_to_torch_cat_where_the_skip_does_not_fit():
    block = create_attention("cse", 3, 8)
    x = torch.randn(*SHAPE, requires_grad=True)
    skip = torch.randn(2, 4, *SHAPE[2:], dtype=torch.float64)
    out = block.forward_cat(skip, x)  # torch.cat's type promotion, through the block's own forward
    assert out.dtype == torch.float64 and type(out.grad_fn).__name__ == "CatBackward0"
    assert torch.equal(out, torch.cat([skip, block(x)], 1))
    from medse.attention.kernels import channel_attention

    with pytest.raises(ValueError, match=r"skip \(2, 4, 8, 16, 16\).*does not fit x \(2, 8, 16, 16, 16\)"):
        channel_attention(x, block.excite, tuple(block.parameters()), skip=torch.randn(2, 4, 8, 16, 16))


def _saved_bytes(net: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of ``net(x)``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)
    return sum(seen.values())


@pytest.mark.parametrize("name", ["cse", "sse", "scse"])
def test_unet_blocks_before_a_concatenation_keep_no_activation_of_their_own(name, monkeypatch):
    """MONAI's U-Net concatenates the bottleneck's and each decoder stage's output with the skip connection; the
    blocks there write into that concatenation (which the next convolution saves), so a U-Net with blocks keeps
    for its backward pass about what the U-Net without them keeps (issue 14, target 3). Outputs and gradients are
    those of the plain ``SkipConnection``."""
    from monai.networks.layers.simplelayers import SkipConnection

    from medse.networks.unet import UNetWithAttention, _ConcatSkipConnection

    monkeypatch.setattr(F, "MIN_ELEMENTS", 1)  # every block on the fast path at this small size
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))

    def make(attention: str) -> torch.nn.Module:
        torch.manual_seed(0)
        return UNetWithAttention(3, 1, 3, channels=(8, 16, 32), num_res_units=1, attention=attention)

    none, net = _saved_bytes(make("none"), x), make(name)
    with_blocks = _saved_bytes(net, x)
    assert with_blocks - none < 0.02 * none, (name, with_blocks, none)

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        net.zero_grad()
        y = net(x)
        y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
        return y.detach(), [p.grad.clone() for p in net.parameters()]

    y_cat, g_cat = step()
    monkeypatch.setattr(_ConcatSkipConnection, "forward", SkipConnection.forward)
    # each block before a concatenation then keeps its own output: decoder 8 x 16^3 and bottleneck 32 x 8^3
    assert _saved_bytes(net, x) - with_blocks >= 4 * 2 * (8 * 16**3 + 32 * 8**3)
    y_plain, g_plain = step()
    assert torch.equal(y_cat, y_plain)
    assert all(torch.equal(a, b) for a, b in zip(g_cat, g_plain, strict=True))


def test_forward_then_cat_runs_hooked_blocks_through_their_hooks():
    """A forward hook on a block before a concatenation (``medse.compare.explain`` records gates this way) still
    sees the block's output: hooked modules are called, not bypassed."""
    from medse.networks.layers import forward_then_cat

    block = create_attention("cse", 3, 8)
    conv = torch.nn.Conv3d(8, 8, 1)
    seen = []
    block.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    x, skip = torch.randn(*SHAPE), torch.randn(2, 4, *SHAPE[2:])
    out = forward_then_cat(torch.nn.Sequential(conv, block), skip, x)
    assert seen == [torch.Size(SHAPE)]
    assert torch.equal(out, torch.cat([skip, block(conv(x))], 1))
