"""The model registry: every coding network registers here under the name ``--weights`` files get.

A model is one module that defines a :class:`~.base.CodingModel` subclass decorated with
``@register("name")``, plus its module name in :data:`BUILTIN_MODULES`.  The class says which
state dicts are its own (``matches``) and builds itself from one (``from_state_dict``); the
pipeline finds it with :func:`detect` and knows it only through the base class.

Importing this module is cheap (no torch): the model modules are imported on the first look-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .base import CodingModel

#: modules (in this package) that define and register the built-in models
BUILTIN_MODULES = ("lalic", "mambaic")

_models: dict[str, type] = {}
_loaded = False


def register(name: str):
    """Class decorator: register a :class:`~.base.CodingModel` subclass under ``name``."""

    def deco(cls):
        other = _models.get(name)
        if other is not None and other.__qualname__ != cls.__qualname__:
            raise ValueError(f"model name {name!r} is already registered by {other.__qualname__}")
        cls.registry_name = name
        _models[name] = cls
        return cls

    return deco


def unregister(name: str) -> None:
    """Forget the model registered under ``name`` (a test's model, once the test is done)."""
    _models.pop(name, None)


def _load() -> None:
    global _loaded
    if not _loaded:
        for mod in BUILTIN_MODULES:
            importlib.import_module(f"{__package__}.{mod}")
        _loaded = True


def names() -> list[str]:
    """The registered model names, in registration order."""
    _load()
    return list(_models)


def get(name: str) -> type[CodingModel]:
    """The class registered under ``name`` (KeyError if none)."""
    _load()
    return _models[name]


def detect(sd: dict) -> type[CodingModel] | None:
    """The one registered class whose ``matches`` accepts the state dict (None if none does)."""
    _load()
    hits = [cls for cls in _models.values() if cls.matches(sd)]
    if len(hits) > 1:
        raise ValueError(f"weights match several architectures: {', '.join(c.registry_name for c in hits)}")
    return hits[0] if hits else None
