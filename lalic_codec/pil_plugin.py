"""Pillow plugin for ``.lic`` files, registered by ``import lalic_codec``.

Example::

    from PIL import Image
    import lalic_codec                                   # registers the LIC format

    Image.open("photo.png").save("photo.lic", quality=6)   # or target_bpp=0.5; model=, weights=
    with Image.open("photo.lic") as im:                  # size and mode from the header
        print(im.size, im.mode)                          # nothing decoded, no torch imported
        im.save("photo-decoded.png")                     # decodes (im.load()) on first use

Format id ``LIC``, extension ``.lic``, MIME type ``image/x-lic`` (the format is not registered
with IANA; ``x-`` marks an unregistered type, and files are recognised by their magic bytes,
never by the extension alone: ``.lic`` is also common for software licence files).

Opening reads and checks the whole container (CRCs, metadata) but runs no network: ``size``,
``mode`` (``RGB``, ``L``, ``P``, ``RGBA``, ``LA``, or ``I;16`` for a 16-bit grayscale original)
and ``info`` (``icc_profile``, ``exif``, ``xmp``) are there at once, and ``im.lic_header`` holds
the header.  ``load()`` decodes.  Files made with other weights than the bundled model's need
:func:`configure` (``weights=``) before they are loaded; errors are the
:mod:`lalic_codec.errors` classes.

Saving takes any Pillow mode (RGB, RGBA, L, LA, P, I;16, CMYK...; see ``lalic_codec.encode``)
and these options: ``quality`` (1..8, default 4) or ``target_bpp``, ``model``, ``weights``,
``device``, and ``icc_profile``, ``exif``, ``xmp`` to replace the image's own metadata (by
default everything in ``im.info`` is kept; ``b""`` drops one).

This module imports Pillow only: torch and the pipeline are imported when a file is decoded or
encoded, so that ``import lalic_codec`` and ``Image.open(...).size`` stay light.
"""

from __future__ import annotations

import threading
from typing import IO, Any

from PIL import Image, ImageFile, ImagePalette

__all__ = ["FORMAT", "EXTENSION", "MIME_TYPE", "LicImageFile", "configure", "register"]

FORMAT = "LIC"
EXTENSION = ".lic"
MIME_TYPE = "image/x-lic"
#: the container's magic bytes (formats/container.py MAGIC; kept here so that registering needs
#: no import of the container)
_MAGIC = b"\x89LIC\r\n\x1a\n"

_Tile = getattr(ImageFile, "_Tile", lambda *t: t)  # a named tuple from Pillow 11, a tuple before

_options: dict[str, Any] = {"model": "default", "weights": None, "device": "auto"}
_options_lock = threading.Lock()
_UNSET: Any = object()


def configure(*, model: str | None = None, weights: Any = _UNSET, device: str | None = None) -> dict[str, Any]:
    """Set the model, weights and device that ``Image.open(...).load()`` and ``save()`` use when
    the call itself names none (the defaults: the bundled model on ``"auto"``).  ``weights`` is
    needed to decode files made with other weights; ``weights=None`` goes back to the bundled
    model, and an argument left out is left as it is.  Returns the previous settings, so that
    ``configure(**previous)`` restores them.

    Example::

        lalic_codec.pil_plugin.configure(weights="my-run.safetensors", device="cpu")
        Image.open("made-with-my-run.lic").save("out.png")
    """
    with _options_lock:
        previous = dict(_options)
        if model is not None:
            _options["model"] = model
        if weights is not _UNSET:
            _options["weights"] = weights
        if device is not None:
            _options["device"] = device
        return previous


def _current_options() -> dict[str, Any]:
    with _options_lock:
        return dict(_options)


def _accept(prefix: bytes) -> bool:
    return prefix[: len(_MAGIC)] == _MAGIC


def _pil_mode(header: Any) -> str:
    """The Pillow mode a file decodes to (as :func:`lalic_codec.decode` returns it)."""
    mode = header.colour_mode.name
    if mode == "L" and header.bit_depth == 16:
        return "I;16"
    return mode


class LicImageFile(ImageFile.ImageFile):
    """A ``.lic`` file opened by Pillow: header and metadata at open, pixels on ``load()``."""

    format = FORMAT
    format_description = "lalic-codec learned image"

    def _open(self) -> None:
        from .formats import container
        from .imaging import metadata_info

        assert self.fp is not None
        data = self.fp.read()
        lic = container.read(data)  # validates every CRC; raises CodecError subclasses
        h = lic.header
        self.lic_header = h
        self._size = (h.width, h.height)
        self._mode = _pil_mode(h)
        md = lic.metadata
        self.info.update(metadata_info(md))
        if self._mode == "P":
            self.palette = ImagePalette.raw("RGB", md.palette)
        # one tile, decoded by _LicDecoder from the bytes already read
        self.tile = [_Tile("lic", (0, 0) + self.size, 0, (data,))]


class _LicDecoder(ImageFile.PyDecoder):
    """Runs the network: the whole file is one tile, decoded in one call."""

    _pulls_fd = True

    def decode(self, buffer: bytes | Image.SupportsArrayInterface) -> tuple[int, int]:
        from . import pipeline

        (data,) = self.args
        opts = _current_options()
        im = pipeline.decode_bytes(data, opts["weights"], opts["device"], high_bit_depth=True).image
        if im.mode != self.mode or im.size != (self.state.xsize, self.state.ysize):
            raise ValueError(f"decoded a {im.size} {im.mode} image for a {self.mode} tile")  # a bug
        self.set_as_raw(im.tobytes(), im.mode)
        return -1, 0


def _save(im: Image.Image, fp: IO[bytes], filename: str | bytes) -> None:
    from . import api

    given = getattr(im, "encoderinfo", {}) or {}
    opts = _current_options()
    for key in ("model", "weights", "device"):
        if given.get(key) is not None:
            opts[key] = given[key]
    overrides = {k: given[k] for k in ("icc_profile", "exif", "xmp") if k in given}
    if overrides:
        im = im.copy()  # the caller's image keeps its info
        for key, value in overrides.items():
            if isinstance(value, Image.Exif):
                value = value.tobytes()
            if value:
                im.info[key] = value
            else:
                im.info.pop(key, None)
                if key == "exif":
                    im.getexif().clear()
                if key == "xmp":
                    im.info.pop("XML:com.adobe.xmp", None)
    codec = api.Codec(opts["model"], opts["weights"], opts["device"])
    # notes are warned at the user's im.save(...) line: _encode <- _save <- Image.save <- user
    fp.write(codec._encode(im, given.get("quality"), given.get("target_bpp"), stacklevel=4))


def register() -> None:
    """Register the LIC format with Pillow (done by ``import lalic_codec``; idempotent)."""
    Image.register_open(FORMAT, LicImageFile, _accept)
    Image.register_save(FORMAT, _save)
    Image.register_extension(FORMAT, EXTENSION)
    Image.register_mime(FORMAT, MIME_TYPE)
    Image.register_decoder("lic", _LicDecoder)
