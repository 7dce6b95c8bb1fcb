"""One registry type for everything medse builds or looks up by name: blocks, networks, metrics.

A :class:`Registry` maps names to entries (an ``AttentionInfo``, a ``ModelInfo``, a ``Metric``) in registration
order and owns what every registry needs alike, so that the attention, network and metric registries say only
what is theirs:

* the name rule (lower case letters, digits and ``_``, starting with a letter; reserved names refused);
* duplicates: a name may be registered again by the same object (a module imported twice, a plugin re-loaded:
  compared by qualified name), never by another;
* look-up with a suggestion (``Unknown model 'unte'. Did you mean 'unet'? Available: ...``,
  :func:`medse.utils.errors.unknown_option_error`);
* the plugin hook: a callable run before every read (the attention and network registries pass
  :func:`medse.utils.plugins.load_plugins`, so ``MEDSE_PLUGINS`` modules are imported on first use);
* signature inspection for keyword checks (:func:`keyword_arguments`, :func:`keyword_defaults`).

After timm's ``models/_registry.py``: the bookkeeping in one small type, the factories (``create_attention``,
``create_model``) thin and in the registry modules that use it. This module imports nothing of medse above
:mod:`medse.utils`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from medse.utils.errors import unknown_option_error

__all__ = ["NAME_RULE", "Registry", "keyword_arguments", "keyword_defaults", "qualname"]

T = TypeVar("T")

#: Registry names: lower case letters, digits and ``_``, starting with a letter.
NAME_RULE = re.compile(r"[a-z][a-z0-9_]*")


def qualname(obj: object) -> str:
    """``module.QualName`` of a class or function: what makes two registrations "the same object" across
    re-imports (a plugin file loaded twice gives new objects with the same qualified name)."""
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def keyword_arguments(fn: Callable[..., Any], *, keyword_only: bool = False) -> tuple[set[str], bool]:
    """The names ``fn`` accepts as keywords, and whether it also takes ``**kwargs``.

    Args:
        fn: a function, or a class's ``__init__``.
        keyword_only: only the keyword-only parameters (a block's options after ``*``). Defaults to False
            (positional-or-keyword ones too; ``self`` left out).

    Returns:
        ``(names, var_keyword)``; ``(set(), True)`` when the signature cannot be read (accept anything).
    """
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    kinds = (inspect.Parameter.KEYWORD_ONLY,) if keyword_only else (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = {p.name for p in params if p.kind in kinds and p.name != "self"}
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def keyword_defaults(fn: Callable[..., Any], exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{name: default}`` of the parameters of ``fn`` that have a default, ``self`` and ``exclude`` left out
    (``{}`` when the signature cannot be read)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    return {k: p.default for k, p in params.items()
            if k not in exclude and k != "self" and p.default is not inspect.Parameter.empty}


class Registry(Mapping[str, T]):
    """Names -> entries of one kind, in registration order (a read-only ``Mapping``; write with :meth:`add`).

    Args:
        kind: what an entry is, for messages (``"attention block"``, ``"model"``, ``"metric"``).
        decorator: the public function that registers, named in registration errors (``"register_model"``).
        owner: the object an entry stands for (its class or builder), compared by :func:`qualname` to tell a
            re-registration of the same object from a clash. Defaults to the entry itself.
        reserved: names :meth:`check_name` refuses (``("none",)`` for blocks). Defaults to none.
        load: called before every read (:meth:`__getitem__`, :meth:`__iter__`, :meth:`get_or_raise`, ...): the
            plugin hook. Defaults to None.
        hint: appended in parentheses to the unknown-name error (where entries of your own come from).
            Defaults to "".
    """

    def __init__(
        self,
        kind: str,
        *,
        decorator: str,
        owner: Callable[[T], object] | None = None,
        reserved: tuple[str, ...] = (),
        load: Callable[[], object] | None = None,
        hint: str = "",
    ) -> None:
        self.kind = kind
        self.decorator = decorator
        self._owner = owner or (lambda entry: entry)
        self.reserved = reserved
        self._load = load
        self.hint = hint
        self._entries: dict[str, T] = {}

    # --- writing ------------------------------------------------------------------------------------------

    def check_name(self, name: object) -> str:
        """``name`` if it follows :data:`NAME_RULE` and is not reserved; else ``ValueError`` naming the rule."""
        if not isinstance(name, str) or not NAME_RULE.fullmatch(name) or name in self.reserved:
            extra = f" (not {', '.join(repr(r) for r in self.reserved)})" if self.reserved else ""
            raise ValueError(f"{self.decorator}: name must be lower case letters, digits and '_'{extra}, got {name!r}.")
        return name

    def check_free(self, name: str, owner: object) -> None:
        """``ValueError`` if ``name`` is registered for another object than ``owner`` (by qualified name)."""
        old = self._entries.get(name)
        if old is not None and qualname(self._owner(old)) != qualname(owner):
            raise ValueError(f"{self.decorator}: '{name}' is already registered by {qualname(self._owner(old))}.")

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name`` (no name check: :meth:`check_name` first for user-chosen names);
        registering the same object again replaces the entry in place (its position is kept)."""
        self.check_free(name, self._owner(entry))
        self._entries[name] = entry
        return entry

    def copy(self) -> Registry[T]:
        """A registry of the same kind holding the same entries; tests swap it in to undo what they register."""
        other: Registry[T] = Registry(self.kind, decorator=self.decorator, owner=self._owner,
                                      reserved=self.reserved, load=self._load, hint=self.hint)
        other._entries = dict(self._entries)
        return other

    # --- reading ------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Run the plugin hook (each plugin is imported once; cheap after the first call)."""
        if self._load is not None:
            self._load()

    def unknown(self, name: str) -> ValueError:
        """The ``ValueError`` for an unknown ``name``: the options, the closest one, and :attr:`hint`."""
        err = unknown_option_error(self.kind, name, self._entries)
        return ValueError(f"{err} ({self.hint})") if self.hint else err

    def get_or_raise(self, name: str) -> T:
        """The entry of ``name``; :meth:`unknown`'s ``ValueError`` if there is none."""
        self.load()
        if name not in self._entries:
            raise self.unknown(name)
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        self.load()
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self.load()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self.load()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"
