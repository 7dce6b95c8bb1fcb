"""Attention placement has one owner (``medse.networks.placement``): ``AttentionSpec`` is parsed once, written
canonically, read the same on every command line, and checked once on the way through ``create_model``."""

from __future__ import annotations

import dataclasses

import pytest

from medse.networks import AttentionSpec, create_model, format_assignment, parse_assignment, placement
from medse.networks.placement import cli_choices, position_blocks

UNET = {"channels": (8, 16, 16), "strides": (2, 2)}


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # tests/conftest.py


def test_spec_parses_names_mappings_and_text_alike_and_formats_canonically() -> None:
    text = AttentionSpec.parse(" Decoder=SCSE, encoder=cse ,encoder.1=sse")
    mapping = AttentionSpec.parse({"encoder": "cse", "decoder": "scse", "encoder.1": "sse"})
    assert text.choice == mapping.choice and text.is_mapping  # same mapping (in the order given)
    assert text.format() == "encoder=cse,encoder.1=sse,decoder=scse" == str(mapping)
    assert AttentionSpec.parse(text.format()).format() == text.format()  # the canonical text round-trips
    assert AttentionSpec.parse(text) is text  # idempotent: a spec is not parsed again
    assert text.blocks == ["scse", "cse", "sse"] and text.choice == {"decoder": "scse", "encoder": "cse",
                                                                      "encoder.1": "sse"}
    one = AttentionSpec.parse("ECA+CA")
    assert not one.is_mapping and one.format() == "eca+ca" == one.choice and one.blocks == ["eca+ca"]
    # the plain-data helpers are the spec's
    assert format_assignment({"decoder": "scse", "encoder": "cse"}) == "encoder=cse,decoder=scse"
    assert parse_assignment("encoder=cse") == {"encoder": "cse"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.block = "se"  # type: ignore[misc]


def test_block_for_a_site_or_a_position_and_stage() -> None:
    spec = AttentionSpec.parse("encoder=cse,encoder.1=sse,bottleneck=none")
    assert spec.block_for("encoder.0") == spec.block_for("encoder", 0) == "cse"
    assert spec.block_for("encoder.1") == spec.block_for("encoder", 1) == "sse"  # a stage key wins
    assert spec.block_for("bottleneck") == "none" and spec.block_for("decoder.0") == "none"
    placed = AttentionSpec.parse("scse").place("unet", ["encoder", "decoder.0"], ("encoder", "bottleneck", "decoder"))
    assert placed.positions == ("encoder", "decoder.0")
    assert [placed.block_for(s) for s in ("encoder.3", "bottleneck", "decoder.0", "decoder.1")] == [
        "scse", "none", "scse", "none"]


def test_keyword_arguments_go_to_the_blocks_that_take_them() -> None:
    spec = AttentionSpec.parse({"encoder": "eca", "decoder": "cse"})
    kwargs = {"reduction": 4, "eca": {"kernel_size": 5}}
    assert spec.kwargs_for("cse", kwargs) == {"reduction": 4}
    assert spec.kwargs_for("eca", kwargs) == {"eca": {"kernel_size": 5}}
    assert AttentionSpec.parse("cse").kwargs_for("cse", kwargs) == kwargs  # one block: every keyword
    with pytest.raises(ValueError, match="'levels' is accepted by none of the chosen blocks"):
        spec.check_kwargs("unet", {"levels": (1, 2)})


@pytest.mark.parametrize("attention,match", [
    ("encoder=cse,encoder=sse", "position 'encoder' is given twice"),
    ("encoder=cse,decoder", "expected position=block pairs"),
    ({"encoder": 3}, "must map position names to block names"),
    ({}, "attention mapping is empty"),
])
def test_malformed_choices_are_errors(attention, match) -> None:
    with pytest.raises(ValueError, match=match):
        AttentionSpec.parse(attention)


@pytest.mark.parametrize("attention,match", [
    ({"middle": "cse"}, "unknown attention position 'middle'; unet has positions encoder, bottleneck, decoder"),
    ("encodr=cse", "unknown attention position 'encodr'; Did you mean 'encoder'"),
    ({"encoder": "scsee"}, "Unknown attention block 'scsee'. Did you mean 'scse'"),
    ("encoder=cse,encoder=sse", "create_model\\('unet'\\): attention .* position 'encoder' is given twice"),
])
def test_create_model_reports_unknown_positions_and_blocks(attention, match) -> None:
    with pytest.raises(ValueError, match=match):
        create_model("unet", 2, 1, 2, attention=attention, **UNET)


def test_create_model_parses_and_checks_the_choice_once(monkeypatch) -> None:
    parsed: list[object] = []
    checked: list[str] = []
    parse, check = AttentionSpec.parse.__func__, placement.check_position_key

    def counting_parse(cls, attention):
        if not isinstance(attention, AttentionSpec):
            parsed.append(attention)
        return parse(cls, attention)

    def counting_check(owner, key, allowed):
        checked.append(key)
        return check(owner, key, allowed)

    monkeypatch.setattr(AttentionSpec, "parse", classmethod(counting_parse))
    monkeypatch.setattr(placement, "check_position_key", counting_check)
    m = create_model("unet", 2, 1, 2, attention="encoder=cse,decoder=scse", **UNET)
    assert parsed == ["encoder=cse,decoder=scse"]  # once, where the choice entered
    assert checked == ["encoder", "decoder"]  # every key once
    assert m.attention == {"encoder": "cse", "decoder": "scse"} and m.attention_positions == ()
    assert m.attention_sites == {"encoder.0": "cse", "encoder.1": "cse", "bottleneck": "none", "decoder.0": "scse"}


def test_plugin_builders_get_the_plain_choice() -> None:
    spec = AttentionSpec.parse("encoder=cse")

    def plugin(**kwargs):  # a builder written against names and dicts
        return kwargs

    assert spec.argument_for(plugin) == {"encoder": "cse"}
    assert spec.argument_for(placement.takes_spec(plugin)) is spec


def test_one_grammar_on_every_command_line(monkeypatch) -> None:
    from medse.cli import main
    from medse.integrations.nnunet import plans

    assert [c.choice for c in cli_choices(["scse,eca+ca", "encoder=cse,decoder=scse"])] == [
        "scse", "eca+ca", {"encoder": "cse", "decoder": "scse"}]
    # the nnU-Net command's older form is still read, and means the same
    assert cli_choices(["cse,residual=cbam/decoder=cse"]) == cli_choices(["cse", "residual=cbam,decoder=cse"])

    seen: list[object] = []
    monkeypatch.setattr(plans, "derive_plans", lambda dataset, attention, **kw: seen.extend(attention) or [])
    assert main(["nnunet", "plans", "501", "-a", "encoder=cse,decoder=scse", "-a", "sse"]) == 0
    assert seen == [{"encoder": "cse", "decoder": "scse"}, "sse"]


def test_position_blocks_resolves_flat_positions_as_nnunet_did() -> None:
    offered = ("encoder", "bottleneck", "decoder", "residual")
    spec = position_blocks("Net", "cse", ["decoder", "encoder"], offered)
    assert spec.choice == {"decoder": "cse", "encoder": "cse"}
    spec = position_blocks("Net", {"residual": "cbam", "decoder": "ema", "encoder": "none"}, None, offered)
    assert spec.choice == {"decoder": "ema", "residual": "cbam"}
    assert position_blocks("Net", "none", None, offered).choice == {}
    with pytest.raises(ValueError, match="Unknown attention position for Net 'skip'"):
        position_blocks("Net", "cse", ["skip"], offered)


def test_resnet_takes_one_block_only() -> None:
    with pytest.raises(ValueError, match="resnet50v2 has no attention positions"):
        create_model("resnet50v2", 2, 3, 2, attention="encoder=cse", width=0.125)
