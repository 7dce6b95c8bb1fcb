"""Derived nnU-Net plans files that put medse attention blocks into nnU-Net's own networks.

:func:`derive_plans` reads ``$nnUNet_preprocessed/DatasetXXX_Name/<plans>.json`` (written by
``nnUNetv2_plan_and_preprocess``, default or ResEnc planners) and writes one plans file per block,
``<plans>_medse_<block>.json``, beside it. Each copy differs from the original only in

- ``plans_name`` (``<plans>_medse_<block>``), so nnU-Net's results go to their own folder
  ``<Trainer>__<plans>_medse_<block>__<cfg>``; ``data_identifier`` is kept, so the preprocessed data are reused;
- the ``architecture`` block of the chosen configurations, written in full (``inherits_from`` is a shallow
  update): ``network_class_name`` ``medse.integrations.nnunet.AttentionPlainConvUNet`` (for ``PlainConvUNet``)
  or ``...AttentionResidualEncoderUNet`` (for ``ResidualEncoderUNet``), the same ``arch_kwargs`` plus
  ``attention``, ``attention_positions`` and ``attention_kwargs``; the position ``residual`` (ResEnc plans only)
  puts the block inside every residual block of the encoder, before the addition (SE-ResNet's placement);
- a top-level ``medse`` key recording the source plans, the block and the configurations changed (nnU-Net
  ignores it).

The original plans file is never written. Names use one underscore (``_medse_``), not ``__``: nnU-Net splits its
result folder names ``Trainer__Plans__Configuration`` on ``__`` (``nnUNetv2_find_best_configuration``, model
export), so a plans name must not contain it.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medse.utils.atomic import atomic_write_text
from medse.utils.errors import MedseError, did_you_mean

__all__ = ["NETWORK_CLASSES", "DerivedPlans", "derive_plans", "find_dataset", "attention_tag", "resolve_configuration"]

#: nnU-Net network class -> the medse class that wraps it.
NETWORK_CLASSES: dict[str, str] = {
    "dynamic_network_architectures.architectures.unet.PlainConvUNet":
        "medse.integrations.nnunet.AttentionPlainConvUNet",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet":
        "medse.integrations.nnunet.AttentionResidualEncoderUNet",
}
#: Where a block can go; ``residual`` (inside each residual block) only in ``ResidualEncoderUNet`` configurations.
_POSITIONS = ("encoder", "bottleneck", "decoder", "residual")
_STAGE_POSITIONS = _POSITIONS[:3]
_RESIDUAL_NETWORK = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
_DATASET_RE = re.compile(r"^Dataset(\d{3})_(.+)$")


@dataclass
class DerivedPlans:
    """One plans file written by :func:`derive_plans`."""

    path: Path
    plans_name: str
    attention: str | dict[str, str]
    configurations: list[str]
    commands: list[str] = field(default_factory=list)


def _env_folder(env: str, given: str | os.PathLike | None) -> Path:
    if given is not None:
        return Path(given)
    value = os.environ.get(env)
    if not value:
        raise MedseError(f"environment variable {env} is not set (nnU-Net's folder; or pass the folder explicitly)")
    return Path(value)


def find_dataset(dataset: str | int, root: str | os.PathLike | None = None, env: str = "nnUNet_preprocessed") -> Path:
    """The folder ``DatasetXXX_Name`` under ``root`` (default ``$env``) for an id (``4``, ``"004"``) or a name."""
    base = _env_folder(env, root)
    if not base.is_dir():
        raise MedseError(f"{env} folder does not exist", base)
    text = str(dataset).strip()
    if text.isdigit() or re.fullmatch(r"Dataset\d{3}", text):
        num = int(text.removeprefix("Dataset"))
        hits = sorted(p for p in base.iterdir() if p.is_dir() and p.name.startswith(f"Dataset{num:03d}_"))
        if not hits:
            raise MedseError(f"no dataset with id {num} (no Dataset{num:03d}_* folder)", base)
        if len(hits) > 1:
            raise MedseError(f"several folders for dataset id {num}: {', '.join(p.name for p in hits)}", base)
        return hits[0]
    folder = base / text
    if not folder.is_dir():
        names = [p.name for p in base.iterdir() if p.is_dir()]
        raise MedseError(f"dataset '{text}' not found.{did_you_mean(text, names)}", base)
    return folder


def dataset_id(folder: Path) -> int:
    m = _DATASET_RE.match(folder.name)
    if m is None:
        raise MedseError("not an nnU-Net dataset folder name (DatasetXXX_Name)", folder)
    return int(m.group(1))


def resolve_configuration(plans: dict[str, Any], name: str, path: Path | str = "") -> dict[str, Any]:
    """A configuration with its ``inherits_from`` chain applied (nnU-Net's shallow update), as nnU-Net sees it."""
    configs = plans.get("configurations")
    if not isinstance(configs, dict):
        raise MedseError("plans file has no 'configurations'", path)
    if name not in configs:
        raise MedseError(f"unknown configuration '{name}'.{did_you_mean(name, configs)} "
                         f"Available: {', '.join(configs)}", path)
    chain: list[str] = []
    cur = name
    while cur is not None:
        if cur in chain:
            raise MedseError(f"configuration '{name}': circular inherits_from ({' -> '.join(chain + [cur])})", path)
        if cur not in configs:
            raise MedseError(f"configuration '{chain[-1]}' inherits from unknown '{cur}'", path)
        chain.append(cur)
        cur = configs[cur].get("inherits_from")
    out: dict[str, Any] = {}
    for c in reversed(chain):
        out.update(copy.deepcopy(configs[c]))
    out.pop("inherits_from", None)
    return out


def attention_tag(attention: str | dict[str, str]) -> str:
    """The plans-name tag of a block choice: ``scse``, ``eca+ca``, or ``enc-cse_dec-scse`` for a per-position dict."""
    if isinstance(attention, dict):
        return "_".join(f"{p[:3]}-{attention[p]}" for p in _POSITIONS if p in attention)
    return attention


def _check_block(name: object, spatial_dims: int, min_width: int, where: str, path: Path,
                 kwargs: dict[str, Any] | None = None) -> str:
    """The block name, checked: registered, defined in this dimension, fits the narrowest stage with the options
    shared by every position (``kwargs`` minus per-position dicts)."""
    from medse.attention import list_attention, min_channels

    blocks = list_attention()
    if not isinstance(name, str) or not name.strip():
        raise MedseError(f"{where}: attention must be a block name, got {name!r}", path)
    name = name.strip().lower()
    if name == "none":
        raise MedseError(f"{where}: 'none' needs no derived plans (the baseline is the original plans file)", path)
    for part in name.split("+"):
        part = part.strip()
        if part not in blocks or part == "none":
            options = sorted(set(blocks) - {"none"})
            raise MedseError(f"{where}: unknown attention block '{part}'.{did_you_mean(part, options)} "
                             f"Available: {', '.join(options)}", path)
        if spatial_dims not in blocks[part].spatial_dims:
            raise MedseError(f"{where}: block '{part}' supports {spatial_dims_text(blocks[part].spatial_dims)} "
                             f"only, the configuration is {spatial_dims}D", path)
    shared = {k: v for k, v in (kwargs or {}).items() if k not in _POSITIONS}
    try:
        need = min_channels(name, **shared)
    except ValueError as e:
        raise MedseError(f"{where}: {e}", path) from None
    if need > min_width:
        raise MedseError(f"{where}: block '{name}' needs at least {need} channels, the narrowest stage has "
                         f"{min_width}", path)
    return name


def spatial_dims_text(dims: Sequence[int]) -> str:
    return "/".join(f"{d}D" for d in dims)


def _spatial_dims(arch: dict[str, Any]) -> int:
    conv = str(arch.get("arch_kwargs", {}).get("conv_op", ""))
    for d in (1, 2, 3):
        if conv.endswith(f"Conv{d}d"):
            return d
    raise MedseError(f"cannot tell 2D/3D from conv_op '{conv}'")


def derive_plans(
    dataset: str | int,
    attention: Sequence[str | dict[str, str]],
    *,
    positions: Sequence[str] | None = None,
    configurations: Sequence[str] = ("3d_fullres",),
    plans: str = "nnUNetPlans",
    attention_kwargs: dict[str, Any] | None = None,
    preprocessed: str | os.PathLike | None = None,
) -> list[DerivedPlans]:
    """Write ``<plans>_medse_<block>.json`` for each block in ``attention`` (see the module docstring).

    Args:
        dataset: dataset id (``501``) or folder name (``Dataset501_Tiny``) under ``preprocessed``.
        attention: block names (``"scse"``, compositions ``"eca+ca"``) or per-position dicts
            (``{"encoder": "cse", "decoder": "scse"}``); one plans file each.
        positions: where to insert (``encoder``, ``bottleneck``, ``decoder``; ``residual``: inside every residual
            block of a ResEnc encoder). Defaults to: the three after-stage positions for a block name, the
            positions a per-position dict names.
        configurations: the configurations that get attention (others are copied unchanged).
            Defaults to ``("3d_fullres",)``.
        plans: the source plans identifier (``nnUNetPlans``, ``nnUNetResEncUNetMPlans``, ...). Defaults to
            ``"nnUNetPlans"``.
        attention_kwargs: block options written into the plans (e.g. ``{"reduction": 4}``). Defaults to none.
        preprocessed: the nnU-Net preprocessed folder. Defaults to ``$nnUNet_preprocessed``.

    Returns:
        One :class:`DerivedPlans` per block, with the commands to train and predict.

    Raises:
        MedseError: missing dataset or plans file, unknown block, position or configuration, a network class
            medse cannot wrap, ``residual`` for a configuration without residual blocks, or a plans file that is
            itself derived by medse. Nothing is written then.
    """
    folder = find_dataset(dataset, preprocessed)
    did = dataset_id(folder)
    src = folder / f"{plans}.json"
    if not src.is_file():
        have = sorted(p.stem for p in folder.glob("*Plans*.json"))
        raise MedseError(f"no plans file '{plans}.json'.{did_you_mean(plans, have)} "
                         f"Plans here: {', '.join(have) or 'none'}", src)
    try:
        source = json.loads(src.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MedseError(f"cannot read plans file: {e}", src) from e
    if "medse" in source:
        raise MedseError("is already a medse-derived plans file; derive from the original nnU-Net plans", src)
    if not attention:
        raise MedseError("no attention block given", src)
    if positions is not None:
        positions = [positions] if isinstance(positions, str) else list(positions)
    for p in positions or []:
        if p not in _POSITIONS:
            raise MedseError(f"unknown attention position '{p}'.{did_you_mean(p, _POSITIONS)} "
                             f"Available: {', '.join(_POSITIONS)}", src)
    if attention_kwargs is not None and not isinstance(attention_kwargs, dict):
        raise MedseError(f"attention_kwargs must be a dict, got {attention_kwargs!r}", src)
    configurations = list(configurations)
    if not configurations:
        raise MedseError("no configuration given", src)

    resolved: dict[str, dict[str, Any]] = {}
    for cfg in configurations:
        conf = resolve_configuration(source, cfg, src)
        arch = conf.get("architecture")
        if not isinstance(arch, dict) or "network_class_name" not in arch:
            raise MedseError(f"configuration '{cfg}' has no architecture.network_class_name", src)
        cls = arch["network_class_name"]
        if cls not in NETWORK_CLASSES:
            raise MedseError(f"configuration '{cfg}' uses network '{cls}', which medse cannot wrap "
                             f"(supported: {', '.join(c.rsplit('.', 1)[-1] for c in NETWORK_CLASSES)})", src)
        resolved[cfg] = conf

    # check every block against every configuration before writing anything
    choices: list[str | dict[str, str]] = []
    choice_positions: list[list[str]] = []
    for item in attention:
        if positions is not None:
            where_to = list(positions)
        elif isinstance(item, dict):
            where_to = [p for p in _POSITIONS if p in item]
        else:
            where_to = list(_STAGE_POSITIONS)
        for cfg, conf in resolved.items():
            arch = conf["architecture"]
            d = _spatial_dims(arch)
            widths = arch["arch_kwargs"].get("features_per_stage") or [1]
            widths = [widths] if isinstance(widths, int) else widths
            where = f"configuration '{cfg}'"
            if "residual" in where_to and arch["network_class_name"] != _RESIDUAL_NETWORK:
                raise MedseError(f"{where}: position 'residual' needs residual blocks (ResidualEncoderUNet, the "
                                 f"ResEnc plans such as nnUNetResEncUNetMPlans); this configuration uses "
                                 f"{arch['network_class_name'].rsplit('.', 1)[-1]}", src)
            if isinstance(item, dict):
                for pos in item:
                    if pos not in _POSITIONS:
                        raise MedseError(f"unknown attention position '{pos}'.{did_you_mean(pos, _POSITIONS)} "
                                         f"Available: {', '.join(_POSITIONS)}", src)
                checked: str | dict[str, str] = {
                    pos: _check_block(item[pos], d, min(widths), where, src, attention_kwargs)
                    for pos in _POSITIONS if pos in item
                }
            else:
                checked = _check_block(item, d, min(widths), where, src, attention_kwargs)
        choices.append(checked)
        choice_positions.append(where_to)

    out: list[DerivedPlans] = []
    for choice, where_to in zip(choices, choice_positions, strict=True):
        tag = attention_tag(choice)
        name = f"{plans}_medse_{tag}"
        derived = copy.deepcopy(source)
        derived["plans_name"] = name
        for cfg, conf in resolved.items():
            arch = copy.deepcopy(conf["architecture"])
            arch["network_class_name"] = NETWORK_CLASSES[arch["network_class_name"]]
            arch["arch_kwargs"]["attention"] = choice
            arch["arch_kwargs"]["attention_positions"] = list(where_to)
            arch["arch_kwargs"]["attention_kwargs"] = dict(attention_kwargs or {})
            derived["configurations"][cfg]["architecture"] = arch
        derived["medse"] = {
            "source_plans": plans,
            "attention": choice,
            "attention_positions": list(where_to),
            "attention_kwargs": dict(attention_kwargs or {}),
            "configurations": list(resolved),
        }
        path = folder / f"{name}.json"
        atomic_write_text(path, json.dumps(derived, indent=4) + "\n")
        cmds = []
        for cfg in resolved:
            cmds.append(f"nnUNetv2_train {did} {cfg} FOLD -p {plans}    # baseline, FOLD = 0..4")
            cmds.append(f"nnUNetv2_train {did} {cfg} FOLD -p {name}")
            cmds.append(f"nnUNetv2_predict -i INPUT_FOLDER -o OUTPUT_FOLDER -d {did} -c {cfg} -p {name} -f 0 1 2 3 4")
            cmds.append(f"medse nnunet compare {did} --configuration {cfg} --plans {plans},{name} --folds 0-4")
        out.append(DerivedPlans(path=path, plans_name=name, attention=choice, configurations=list(resolved),
                                commands=cmds))
    return out
