"""Contract test classes, one per registry (after segmentation_models_pytorch's ``tests/models/base.py``).

A contract class holds the tests every entry of a registry must pass; its ``pytest_generate_tests`` reads the
cases from the registry's metadata when the tests are collected, so a new block or network (built-in, or a
``MEDSE_PLUGINS`` one) is tested without naming it anywhere, and there is no list of names to keep up to date.
The test modules subclass the contracts (``tests/test_contract_blocks.py``, ``tests/test_contract_networks.py``);
a subclass may narrow the cases by overriding :meth:`BlockContract.cases` / :meth:`NetworkContract.cases`.

- :class:`BlockContract`: every block x each spatial dimension it supports: shape, dtype and finite output; a
  gradient for every parameter; the parameter count of ``params_fn``; ``min_channels`` is the smallest width
  that builds; unsupported dimensions refused; the recorded gate; fused and unfused forward/backward agree.
- :class:`NetworkContract`: every network x each spatial dimension it supports, built on the meta device (no
  memory, no arithmetic): its metadata agrees with its builder, and attention lands where it is recorded.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from medse.attention import create_attention, list_attention, min_channels
from medse.networks import attention_modules, create_model, list_models, run_context_kwargs
from medse.networks.registry import RUN_CONTEXT_ARGS, TASKS
from medse.utils.complexity import count_params
from medse.utils.registry import keyword_arguments

C = 16
SIZES = {1: (7,), 2: (7, 5), 3: (7, 5, 3)}  # odd sizes, the smallest axis last


def only_blocks_with(flag: str) -> Any:
    """Mark a contract test as applying only to the blocks whose ``AttentionInfo.<flag>`` is true (``fused``,
    ``spatial_gate``): the others are not generated rather than skipped."""
    def mark(test: Any) -> Any:
        test.contract_flag = flag
        return test
    return mark


def _build(name: str, d: int, c: int = C, **kw: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_attention(name, d, c, **kw)


def _x(d: int, b: int = 2, c: int = C, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, c, *SIZES[d], generator=torch.Generator().manual_seed(seed))


class BlockContract:
    """What every registered attention block (``"none"`` aside) keeps. Cases: ``(name, d)`` for each spatial
    dimension the block registers, or ``name`` alone for the tests that take no ``d``."""

    @staticmethod
    def cases() -> list[tuple[str, int]]:
        """``(name, spatial_dims)`` of every registered block."""
        return [(n, d) for n, info in list_attention().items() if n != "none" for d in info.spatial_dims]

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        flag = getattr(metafunc.function, "contract_flag", None)
        infos = list_attention()
        cases = [(n, d) for n, d in self.cases() if flag is None or getattr(infos[n], flag)]
        if "d" in metafunc.fixturenames:
            metafunc.parametrize(("name", "d"), cases, ids=[f"{n}-{d}d" for n, d in cases])
        elif "name" in metafunc.fixturenames:
            metafunc.parametrize("name", list(dict.fromkeys(n for n, _ in cases)))

    def test_shape_dtype_finite(self, name: str, d: int) -> None:
        block = _build(name, d)
        x = _x(d)
        y = block(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.isfinite(y).all()
        if getattr(block, "identity_at_init", False):  # GRN: gamma = beta = 0 at construction (the authors')
            assert torch.equal(y, x)
            with torch.no_grad():
                for p in block.parameters():
                    p.add_(0.5)
            assert not torch.allclose(block(x), x), "trained parameters must change the input"
        else:
            assert not torch.allclose(y, x), "a gate in (0, 1) must change the input"

    def test_every_parameter_gets_a_gradient(self, name: str, d: int) -> None:
        block = _build(name, d).train()
        x = _x(d).requires_grad_(True)
        w = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
        (block(x) * w).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        total = 0.0
        for pname, p in block.named_parameters():
            assert p.grad is not None, f"{name} {d}D: {pname} received no gradient"
            assert torch.isfinite(p.grad).all(), pname
            total += float(p.grad.abs().sum())
        if count_params(block):
            assert total > 0

    @only_blocks_with("params_fn")
    def test_parameter_count_matches_registry_formula(self, name: str, d: int) -> None:
        info = list_attention()[name]
        for c in (min_channels(name), 32, 64):
            block = create_attention(name, d, c)
            assert count_params(block) == info.params_fn(c, d, **info.defaults), (name, d, c)

    def test_min_channels_is_the_smallest_width(self, name: str, d: int) -> None:
        low = min_channels(name)
        y = _build(name, d, low)(_x(d, c=low))
        assert y.shape == (2, low, *SIZES[d])
        if low > 1:
            with pytest.raises(ValueError):
                _build(name, d, low - 1)

    def test_unsupported_spatial_dims_are_refused(self, name: str) -> None:
        for d in sorted({1, 2, 3} - set(list_attention()[name].spatial_dims)):
            with pytest.raises(ValueError, match="spatial_dims"):
                create_attention(name, d, C)

    @only_blocks_with("spatial_gate")
    def test_recorded_gate(self, name: str, d: int) -> None:
        block = _build(name, d)
        assert block.record_gate is False
        block(_x(d))
        assert block.last_gate is None
        block.record_gate = True
        x = _x(d).requires_grad_(True)
        block(x)
        assert block.last_gate is not None and not block.last_gate.requires_grad
        assert torch.broadcast_shapes(block.last_gate.shape, x.shape) == x.shape

    @only_blocks_with("fused")
    def test_fused_and_unfused_agree(self, name: str, d: int) -> None:
        outs = []
        for fused in (True, False):
            block = _build(name, d, fused=fused).train()
            x = _x(d).requires_grad_(True)
            y = block(x)
            (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
            outs.append((y.detach(), x.grad, [p.grad for p in block.parameters()]))
        (y1, gx1, gp1), (y0, gx0, gp0) = outs
        torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
        for a, b in zip(gp1, gp0, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _site_block(d: int) -> str:
    """A registered block that fits every width in ``d`` dimensions (so in any network): from the metadata."""
    return next(n for n, i in list_attention().items() if n != "none" and d in i.spatial_dims and min_channels(n) == 1)


def _build_meta(name: str, d: int, attention: str) -> torch.nn.Module:
    """``create_model`` on the meta device at the registered defaults (and a 32^d patch for run-context arguments);
    on the CPU for a network that computes while it is built (SwinUNETR)."""
    kw = run_context_kwargs(name, (32,) * d)
    try:
        with torch.device("meta"):
            return create_model(name, d, 1, 2, attention=attention, **kw)
    except (NotImplementedError, RuntimeError):
        return create_model(name, d, 1, 2, attention=attention, **kw)


class NetworkContract:
    """What every registered network keeps. Cases: ``(name, d)`` for each spatial dimension it registers, or
    ``name`` alone."""

    @staticmethod
    def cases() -> list[tuple[str, int]]:
        """``(name, spatial_dims)`` of every registered network."""
        return [(n, d) for n, info in list_models().items() for d in info.spatial_dims]

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        cases = self.cases()
        if "d" in metafunc.fixturenames:
            metafunc.parametrize(("name", "d"), cases, ids=[f"{n}-{d}d" for n, d in cases])
        elif "name" in metafunc.fixturenames:
            metafunc.parametrize("name", list(dict.fromkeys(n for n, _ in cases)))

    def test_metadata_agrees_with_the_builder(self, name: str) -> None:
        info = list_models()[name]
        assert info.name == name and info.task in TASKS and info.description
        assert info.spatial_dims and set(info.spatial_dims) <= {1, 2, 3}
        assert set(info.run_context) <= set(RUN_CONTEXT_ARGS)
        names, var_kw = keyword_arguments(info.builder)
        assert var_kw or set(info.defaults) <= names, f"{name}: defaults the builder does not take"

    def test_builds_and_records_its_attention_sites(self, name: str, d: int) -> None:
        info = list_models()[name]
        plain = _build_meta(name, d, "none")
        assert attention_modules(plain) == []
        if info.task == "segmentation":
            assert isinstance(plain.size_divisor, int) and plain.size_divisor >= 1
        block = _site_block(d)
        model = _build_meta(name, d, block)
        sites = attention_modules(model)
        assert sites, f"{name} {d}D: attention='{block}' inserted no tagged module"
        assert all(isinstance(m, list_attention()[block].cls) for m in sites)
        assert len({id(m) for m in sites}) == len(sites)  # every site has its own module
        extra = count_params(model) - count_params(plain)
        assert extra == sum(count_params(m) for m in sites), "the tagged modules are all the attention added"
