"""Per-position attention: ``attention`` as a mapping position -> block (or ``"encoder=cse,decoder=scse"``).

Every network (the papers' and MONAI's) takes a mapping; stage keys pick one stage in data-flow order; unknown
positions are a one-line error listing the network's positions; keyword arguments go to the blocks that take
them; configs, ``medse models`` and the compare grid name an assignment readably.
"""

from __future__ import annotations

import pytest
import torch

from medse.networks import attention_modules, create_model, format_assignment, list_models, parse_assignment

TINY: dict[str, dict] = {
    "unet": {"channels": (16, 32, 32), "strides": (2, 2)},
    "fc_densenet": {"first_channels": 16, "growth_rate": 8, "down_layers": (2, 2), "bottleneck_layers": 2},
    "sdnet": {"num_filters": 16, "kernel_size": 3, "depth": 2},
    "quicknat": {"num_filters": 16, "kernel_size": 3, "depth": 2},
    "dynunet": {"patch_size": (16, 16), "filters": (16, 32, 32)},
    "segresnet": {"init_filters": 16, "blocks_down": (1, 1, 1), "blocks_up": (1, 1)},
    "unetr": {"img_size": 32, "feature_size": 16, "hidden_size": 32, "mlp_dim": 32, "num_heads": 2},
    "swinunetr": {"feature_size": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "window_size": 4,
                  "norm_name": "batch"},
}
#: Sites per network for TINY (2D): encoder stages, bottleneck, decoder stages.
SITES = {
    "unet": (["encoder.0", "encoder.1"], ["decoder.0"]),  # the top decoder level makes the logits: no attention
    "fc_densenet": (["encoder.0", "encoder.1"], ["decoder.0", "decoder.1"]),
    "sdnet": (["encoder.0", "encoder.1"], ["decoder.0", "decoder.1"]),
    "quicknat": (["encoder.0", "encoder.1"], ["decoder.0", "decoder.1"]),
    "dynunet": (["encoder.0", "encoder.1"], ["decoder.0", "decoder.1"]),
    "segresnet": (["encoder.0", "encoder.1"], ["decoder.0", "decoder.1"]),
    "unetr": ([f"encoder.{i}" for i in range(4)], [f"decoder.{i}" for i in range(4)]),
    "swinunetr": ([f"encoder.{i}" for i in range(4)], [f"decoder.{i}" for i in range(5)]),
}


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # tests/conftest.py


def test_every_segmentation_network_is_covered() -> None:
    assert set(list_models("segmentation")) == set(TINY)


def _kinds(model) -> list[str]:
    return sorted(type(m).__name__ for m in attention_modules(model))


@pytest.mark.parametrize("name", sorted(TINY))
def test_mapping_places_blocks_per_position_and_stage(name: str) -> None:
    enc, dec = SITES[name]
    torch.manual_seed(0)
    m = create_model(name, 2, 1, 2, attention={"encoder": "cse", "encoder.1": "sse", "decoder.0": "scse"},
                     **TINY[name])
    expected = {s: "cse" for s in enc} | {"encoder.1": "sse", "bottleneck": "none"} | {s: "none" for s in dec}
    expected["decoder.0"] = "scse"
    sites = {k: v for k, v in m.attention_sites.items() if not k.startswith("tokens")}
    assert sites == expected
    assert _kinds(m) == sorted(["ChannelSE"] * (len(enc) - 1) + ["SpatialSE", "SCSE"])
    y = m(torch.randn(2, 1, 32, 32))  # batch 2: SwinUNETR's tiny batch-norm bottleneck has one voxel
    assert y.shape == (2, 2, 32, 32)
    y.sum().backward()
    assert all(p.grad is not None for a in attention_modules(m) for p in a.parameters())


def test_stage_order_is_data_flow_order() -> None:
    """encoder.0 is the first (widest-resolution) encoder stage, decoder.0 the first decoder stage (deepest)."""
    m = create_model("unet", 2, 1, 2, channels=(16, 32, 64, 128), attention={"encoder.0": "cse", "decoder.0": "sse"})
    cse, sse = attention_modules(m)[0], [a for a in attention_modules(m) if type(a).__name__ == "SpatialSE"][0]
    assert cse.in_channels == 16  # top encoder level
    assert sse.conv.in_channels == 32  # deepest decoder stage with attention (MONAI: outputs c(L-2) = 32)
    f = create_model("fc_densenet", 2, 1, 2, attention={"decoder.1": "sse"}, **TINY["fc_densenet"])
    assert [a.conv.in_channels for a in attention_modules(f)] == [16 + 32 + 16]  # last up block keeps its input
    d = create_model("dynunet", 2, 1, 2, attention={"encoder.0": "sse", "decoder.1": "sse"}, **TINY["dynunet"])
    assert [a.conv.in_channels for a in attention_modules(d)] == [16, 16]


def test_string_form_equals_the_mapping() -> None:
    torch.manual_seed(0)
    a = create_model("sdnet", 2, 1, 2, attention={"encoder": "cse", "decoder": "scse"}, **TINY["sdnet"])
    torch.manual_seed(0)
    b = create_model("sdnet", 2, 1, 2, attention="decoder=scse, encoder=cse", **TINY["sdnet"])
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.manual_seed(0)
    c = create_model("sdnet", 2, 1, 2, attention="cse", attention_positions=["encoder"], **TINY["sdnet"])
    assert _kinds(c) == ["ChannelSE", "ChannelSE"]


def test_single_block_with_stage_positions() -> None:
    m = create_model("quicknat", 2, 1, 2, attention="sse", attention_positions=["encoder.1", "bottleneck"],
                     **TINY["quicknat"])
    assert [k for k, v in m.attention_sites.items() if v != "none"] == ["encoder.1", "bottleneck"]


def test_format_and_parse_assignment() -> None:
    label = format_assignment({"decoder": "scse", "encoder": "cse", "decoder.0": "none", "tokens": "se"})
    assert label == "encoder=cse,decoder=scse,decoder.0=none,tokens=se"
    assert parse_assignment(label) == {"encoder": "cse", "decoder": "scse", "decoder.0": "none", "tokens": "se"}
    assert format_assignment("SCSE") == "scse" and parse_assignment("eca+ca") == "eca+ca"
    with pytest.raises(ValueError, match="position=block pairs"):
        parse_assignment("encoder=cse,decoder")
    with pytest.raises(ValueError, match="given twice"):
        parse_assignment("encoder=cse,encoder=sse")


@pytest.mark.parametrize(
    "name,attention,match",
    [
        ("unet", {"encoder.5": "cse"}, "unknown attention position 'encoder.5'; this unet has positions encoder, "
         "encoder.0, encoder.1, bottleneck, decoder, decoder.0."),
        ("unet", {"tokens": "cse"}, "unknown attention position 'tokens'; unet has positions encoder, bottleneck, "
         "decoder, encoder.N, decoder.N"),
        ("sdnet", "encodr=cse", "unknown attention position 'encodr'; Did you mean 'encoder'"),
        ("dynunet", {"bottleneck.0": "cse"}, "unknown attention position 'bottleneck.0'"),
        ("unetr", {"tokens.12": "cse"}, "this unetr has positions .*tokens.0, tokens.1, .*tokens.11"),
        ("segresnet", {"encoder": "cse", "decoder": "scsee"}, "Did you mean 'scse'"),
    ],
)
def test_unknown_positions_are_one_line_errors_listing_the_positions(name, attention, match) -> None:
    with pytest.raises(ValueError, match=match) as e:
        create_model(name, 2, 1, 2, attention=attention, **TINY[name])
    assert "\n" not in str(e.value)


def test_mapping_and_changed_positions_conflict() -> None:
    with pytest.raises(ValueError, match="attention_positions must be left at its default"):
        create_model("unet", 2, 1, 2, attention={"encoder": "cse"}, attention_positions=["decoder"], **TINY["unet"])


def test_attention_kwargs_go_to_the_blocks_that_take_them() -> None:
    m = create_model("unet", 2, 1, 2, attention={"encoder": "eca", "decoder": "cse", "bottleneck": "cse"},
                     attention_kwargs={"reduction": 4, "eca": {"kernel_size": 5}}, **TINY["unet"])
    eca = [a for a in attention_modules(m) if type(a).__name__ == "ECA"]
    cse = [a for a in attention_modules(m) if type(a).__name__ == "ChannelSE"]
    assert len(eca) == 2 and len(cse) == 2
    assert all(a.reduction == 4 for a in cse)
    assert all(sum(p.numel() for p in a.parameters()) == 5 for a in eca)
    with pytest.raises(ValueError, match="'levels' is accepted by none of the chosen blocks"):
        create_model("unet", 2, 1, 2, attention={"encoder": "eca", "decoder": "cse"},
                     attention_kwargs={"levels": (1, 2)}, **TINY["unet"])


def test_config_models_table_and_compare_grid_name_the_assignment(tmp_path, capsys) -> None:
    from medse.cli import main
    from medse.compare.pipeline import cell_overrides, grid_cells, load_pipeline
    from medse.config import load_config
    from medse.networks.report import complexity_table, format_complexity_table

    cfg = load_config({"model": {"name": "unet", "attention": {"encoder": "cse", "decoder": "scse"}},
                       "train": {"patch_size": [16, 16, 16]}})
    assert cfg.model.attention == {"encoder": "cse", "decoder": "scse"}
    cfg = load_config({"train": {"patch_size": [16, 16, 16]}}, ["model.attention=encoder=cse,decoder=scse"])
    assert create_model("unet", 3, 1, 2, attention=cfg.model.attention, **TINY["unet"]).attention_sites == {
        "encoder.0": "cse", "encoder.1": "cse", "bottleneck": "none", "decoder.0": "scse"}

    rows = complexity_table(size=16, dims=(2,), networks=["unet"], attention=["decoder=scse,encoder=cse"],
                            arch_kwargs={"unet": dict(TINY["unet"])})
    assert [r["attention"] for r in rows] == ["none", "encoder=cse,decoder=scse"]
    assert rows[1]["params_overhead"] > 0
    assert "| unet | 2D | encoder=cse,decoder=scse |" in format_complexity_table(rows, markdown=True)
    assert main(["models", "--size", "16", "--dims", "2", "--networks", "unet", "--attention", "encoder=cse,decoder=scse",
                 "--arch", "unet.channels=[16,32,32]", "--arch", "unet.strides=[2,2]"]) == 0
    assert "encoder=cse,decoder=scse" in capsys.readouterr().out

    (tmp_path / "train.yaml").write_text("model: {name: unet}\ntrain: {patch_size: [16, 16, 16]}\n")
    (tmp_path / "p.yaml").write_text("name: p\ntrain_config: train.yaml\narchitectures: [unet]\n"
                                     "blocks: [none, {decoder: scse, encoder: cse}]\n"
                                     "block_overrides: {'decoder=scse,encoder=cse': [train.lr=0.01]}\n")
    pipe = load_pipeline(tmp_path / "p.yaml")
    assert pipe.blocks == ["none", "encoder=cse,decoder=scse"]
    cell = grid_cells(pipe)[1]
    assert cell.cell_id == "unet-encoder=cse,decoder=scse-holdout-seed0"
    ov = cell_overrides(pipe, cell)
    assert "model.attention=encoder=cse,decoder=scse" in ov and "train.lr=0.01" in ov
    assert load_config(tmp_path / "train.yaml", ov).model.attention == "encoder=cse,decoder=scse"


def test_trainer_passes_patch_size_and_spacing_to_the_networks_that_take_them() -> None:
    from medse.config import load_config
    from medse.networks.dynunet import get_kernels_strides
    from medse.training import build_model

    cfg = load_config({"model": {"name": "dynunet", "kwargs": {"filters": [8, 16, 32, 32]}},
                       "data": {"preprocess": {"target_spacing": [1.0, 1.0, 3.0]}},
                       "train": {"patch_size": [32, 32, 16]}})
    m = build_model(cfg, 1, 2)
    assert m.strides == get_kernels_strides((32, 32, 16), (1.0, 1.0, 3.0))[1]
    cfg = load_config({"model": {"name": "unetr", "kwargs": {"hidden_size": 32, "mlp_dim": 32, "num_heads": 2}},
                       "train": {"patch_size": [32, 48, 16]}})
    assert build_model(cfg, 1, 2).img_size == (32, 48, 16)
    cfg = load_config({"model": {"name": "unetr", "spatial_dims": 2,
                                 "kwargs": {"img_size": [64, 64], "hidden_size": 32, "mlp_dim": 32, "num_heads": 2}},
                       "train": {"patch_size": [32, 32]}})
    assert build_model(cfg, 1, 2).img_size == (64, 64)  # model.kwargs wins


@pytest.mark.parametrize("config", ["dynunet_3d", "segresnet_3d", "unetr_3d", "swinunetr_3d", "unet_3d_per_position"])
def test_shipped_configs_build(config: str) -> None:
    """The example configs load and build (on the meta device where the network allows: no memory, no compute)."""
    from pathlib import Path

    from medse.config import load_config
    from medse.training import build_model

    cfg = load_config(Path(__file__).parent.parent / "configs" / f"{config}.yaml")
    try:
        with torch.device("meta"):
            m = build_model(cfg, 1, 4)
    except RuntimeError:  # SwinUNETR calls .item() while building
        m = build_model(cfg, 1, 4)
    used = {k: v for k, v in m.attention_sites.items() if v != "none"}
    assert used and set(used.values()) <= {"cse", "scse", "simam"}
    if config == "unet_3d_per_position":
        assert m.attention_sites["encoder.0"] == "none" and used["encoder.1"] == "cse"
        assert used["bottleneck"] == "simam" and used["decoder.0"] == "scse"
    if config == "swinunetr_3d":
        assert used["tokens.1"] == "cse" and "tokens.2" not in used
