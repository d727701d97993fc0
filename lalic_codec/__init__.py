"""lalic-codec: a learned image codec with its own .lic file format.

The Python API (:mod:`lalic_codec.api`) is available here, loaded on first use::

    import lalic_codec

    data = lalic_codec.encode("photo.png", quality=6)    # bytes of a .lic file
    image = lalic_codec.decode(data)                     # a PIL.Image.Image
    lalic_codec.info(data)                               # header facts, without decoding

Importing the package is cheap (no torch, no numpy) and registers the ``.lic`` format with
Pillow (:mod:`lalic_codec.pil_plugin`), so that ``Image.open("x.lic")`` and
``im.save("x.lic", quality=6)`` work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: names served lazily from .api (importing it does not import torch either, but keeps this light)
_API = ("encode", "decode", "info", "Codec", "CodecWarning")

__all__ = ["__version__", *_API]

if TYPE_CHECKING:  # pragma: no cover
    from .api import Codec, CodecWarning, decode, encode, info


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        value = getattr(api, name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


from . import pil_plugin as _pil_plugin  # noqa: E402  (Pillow only: registers the LIC format)

_pil_plugin.register()
