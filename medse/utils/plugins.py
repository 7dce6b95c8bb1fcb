"""User plugins: modules that register their own attention blocks and networks, named in ``MEDSE_PLUGINS``.

``MEDSE_PLUGINS`` holds importable module names (``mylab.blocks``) or paths to ``.py`` files, separated by
``os.pathsep`` (``:`` on Linux and macOS, ``;`` on Windows). Each is imported once, on the first use of a
registry (:func:`medse.attention.list_attention`, :func:`~medse.attention.create_attention`,
:func:`medse.networks.list_models`, ...), so the blocks and models it registers with
:func:`medse.attention.register_attention` and :func:`medse.networks.register_model` work in every command::

    MEDSE_PLUGINS=$PWD/my_block.py medse blocks
    MEDSE_PLUGINS=$PWD/my_block.py medse train --config configs/demo.yaml --output run model.attention=my_gate

A plugin that cannot be found or fails while importing raises :class:`~medse.utils.errors.MedseError` naming it
(the next use of a registry tries it again rather than carrying on without it).

A run records the plugins it was trained with (``run_info.json``'s ``medse_plugins``, :func:`recorded_entries`:
module names, or absolute ``.py`` paths); loading that run's config without them (:func:`medse.attention.registry.check_run_blocks`) says
which block is unknown and which ``MEDSE_PLUGINS`` value brings it back.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from medse.utils.errors import MedseError

ENV_VAR = "MEDSE_PLUGINS"

#: Plugin entries already imported (or being imported), in order, and their modules.
_loaded: dict[str, ModuleType | None] = {}


def plugin_entries(value: str | None = None) -> list[str]:
    """The entries of ``value`` (default: the ``MEDSE_PLUGINS`` environment variable), blanks dropped."""
    raw = os.environ.get(ENV_VAR, "") if value is None else value
    return [e.strip() for e in raw.split(os.pathsep) if e.strip()]


def _is_path(entry: str) -> bool:
    return entry.endswith(".py") or "/" in entry or os.sep in entry


def _import_file(path: Path) -> ModuleType:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise MedseError(f"{ENV_VAR}: plugin file not found", path)
    # a stable module name per file, so that the registries see the same qualified class names on every load
    name = f"medse_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise MedseError(f"{ENV_VAR}: cannot load a Python module from this file", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except MedseError:
        del sys.modules[name]
        raise
    except Exception as e:
        del sys.modules[name]
        raise MedseError(f"{ENV_VAR}: plugin failed to import: {type(e).__name__}: {e}", path) from e
    return module


def _import_module(entry: str) -> ModuleType:
    try:
        return importlib.import_module(entry)
    except MedseError:
        raise
    except ModuleNotFoundError as e:
        raise MedseError(f"{ENV_VAR}: cannot import plugin module '{entry}' ({e})") from e
    except Exception as e:
        raise MedseError(f"{ENV_VAR}: plugin module '{entry}' failed to import: {type(e).__name__}: {e}") from e


def load_plugins(value: str | None = None) -> list[ModuleType]:
    """Import every plugin entry not imported yet; return the modules of all loaded entries, in order.

    Called by the registries on every use; it reads ``MEDSE_PLUGINS`` each time (so a variable set later in the
    process is honoured) but imports each entry once. A plugin may use the registries while it is imported.

    Args:
        value: entries separated by ``os.pathsep``. Defaults to the ``MEDSE_PLUGINS`` environment variable.

    Raises:
        MedseError: an entry that cannot be found or raises while importing (one line naming it).
    """
    for entry in plugin_entries(value):
        if entry in _loaded:
            continue
        _loaded[entry] = None  # re-entrant: a plugin that lists the registry does not import itself again
        try:
            _loaded[entry] = _import_file(Path(entry)) if _is_path(entry) else _import_module(entry)
        except BaseException:
            del _loaded[entry]
            raise
    return [m for m in _loaded.values() if m is not None]


def recorded_entries() -> list[str]:
    """The loaded plugin entries as a run records them: module names as given, ``.py`` files as absolute paths."""
    return [str(Path(e).expanduser().resolve()) if _is_path(e) else e for e, m in _loaded.items() if m is not None]
