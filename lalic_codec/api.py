"""The Python API: encode images to ``.lic`` bytes and decode them back, from code.

Everything here is re-exported by the package, so ``lalic_codec.encode`` is
:func:`encode`.  Importing this module is cheap: torch and numpy are imported on
the first call that needs a network (``encode``, ``decode``, ``Codec``), never
by :func:`info`.

Example::

    import lalic_codec

    data = lalic_codec.encode("photo.png", quality=6)   # the bytes of a .lic file
    image = lalic_codec.decode(data)                    # a PIL.Image.Image, metadata in image.info
    print(lalic_codec.info(data)["bpp"])                # from the header: no model, no torch

Models are loaded once per process and device, and cached; a :class:`Codec`
holds one for repeated use.  Failures raise the :mod:`lalic_codec.errors`
classes (all subclasses of :class:`~lalic_codec.errors.CodecError`): bad inputs
:class:`~lalic_codec.errors.BadInputError`, damaged files
:class:`~lalic_codec.errors.CorruptFileError`, missing or mismatching weights
:class:`~lalic_codec.errors.ModelError`.  Arguments of an unsupported Python type
raise ``TypeError``.  What the command line prints as notes (a 16-bit image coded
at 8 bits, a quality that a fixed-rate model ignores...) is issued as a
:class:`CodecWarning`.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Union

from .errors import BadInputError, LimitExceededError

if TYPE_CHECKING:  # pragma: no cover - typing only, keeps the import cheap
    import numpy as np
    from PIL import Image

    from .loading import LoadedModel

__all__ = ["encode", "decode", "info", "Codec", "CodecWarning", "ImageInput", "DataInput"]

#: What :func:`encode` accepts: a Pillow image, a numpy array (H x W, H x W x 1..4; uint8 or
#: uint16), the path of an image file, the bytes of an image file, or a binary file object.
ImageInput = Union["Image.Image", "np.ndarray", str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes]]
#: What :func:`decode` and :func:`info` accept: the bytes of a ``.lic`` file, its path, or a
#: binary file object.
DataInput = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", IO[bytes]]

#: largest input read from a path or file object, as the command line
MAX_INPUT_BYTES = 2**31


class CodecWarning(UserWarning):
    """Something the caller should know about an encode: the notes ``codec encode`` prints."""


# ------------------------------------------------------------------------------------------------
# inputs


def _read_bytes(data: Any, what: str) -> bytes:
    """bytes of a bytes-like object, a path or a binary file object."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, (str, os.PathLike)):
        p = Path(data)
        if not p.is_file():
            raise BadInputError(f"{p}: {'is a folder' if p.is_dir() else 'no such file'}")
        try:
            if p.stat().st_size > MAX_INPUT_BYTES:
                raise LimitExceededError(f"{p}: larger than {MAX_INPUT_BYTES} bytes")
            return p.read_bytes()
        except OSError as e:
            raise BadInputError(f"{p}: cannot read ({e.strerror})") from None
    if hasattr(data, "read"):
        out = data.read(MAX_INPUT_BYTES + 1)
        if not isinstance(out, (bytes, bytearray)):
            raise TypeError(f"{what}: the file object must be opened in binary mode")
        if len(out) > MAX_INPUT_BYTES:
            raise LimitExceededError(f"{what}: larger than {MAX_INPUT_BYTES} bytes")
        return bytes(out)
    raise TypeError(f"{what} must be bytes, a path or a binary file object, not {type(data).__name__}")


def _from_array(a: "np.ndarray") -> tuple["Image.Image", list[str]]:
    """A numpy array as a Pillow image the pipeline codes as it should."""
    import numpy as np
    from PIL import Image

    notes: list[str] = []
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (2, 3, 4)):
        raise BadInputError(f"array of shape {a.shape}: expected H x W, or H x W x C with C in 1..4")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise BadInputError(f"array of shape {a.shape} has no pixels")
    if a.dtype.kind != "u" or a.dtype.itemsize not in (1, 2):
        raise BadInputError(
            f"array of dtype {a.dtype}: expected uint8 or uint16 (floats in [0, 1]: (a * 255).round().astype(np.uint8))"
        )
    if a.dtype.itemsize == 2:
        a = a.astype(np.uint16, copy=False)  # native byte order
        if a.ndim == 2:  # I;16: the pipeline codes it at 8 bits and records 16 (decoded as I;16)
            return Image.fromarray(np.ascontiguousarray(a)), notes
        # Pillow has no 16-bit colour modes: round to 8 bits here (the file records 8 bits)
        a = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
        notes.append("16-bit colour image coded (and decoded) at 8 bits per sample")
    return Image.fromarray(np.ascontiguousarray(a)), notes


def _to_pil(image: Any) -> tuple["Image.Image", list[str]]:
    from PIL import Image

    from . import imaging

    if isinstance(image, Image.Image):
        im, notes = image, []
    elif "numpy" in sys.modules and isinstance(image, sys.modules["numpy"].ndarray):
        im, notes = _from_array(image)
    elif isinstance(image, (str, os.PathLike)):
        p = Path(image)
        if not p.is_file():
            raise BadInputError(f"{p}: {'is a folder' if p.is_dir() else 'no such file'}")
        im, notes = imaging.open_image(p), []
    elif isinstance(image, (bytes, bytearray, memoryview)) or hasattr(image, "read"):
        im, notes = imaging.open_image(_read_bytes(image, "image")), []
    else:
        raise TypeError(
            f"image must be a PIL image, a numpy array, a path, or the bytes of an image file, not {type(image).__name__}"
        )
    if im.width * im.height > imaging.MAX_PIXELS:
        raise LimitExceededError(f"image is {im.width}x{im.height}, more than the limit of {imaging.MAX_PIXELS} pixels")
    return im, notes


def _warn(notes: list[str], stacklevel: int) -> None:
    for note in notes:
        warnings.warn(note, CodecWarning, stacklevel=stacklevel + 1)


# ------------------------------------------------------------------------------------------------
# the API


class Codec:
    """One model on one device, loaded once, for encoding and decoding many images.

    ``model`` is ``"default"`` (the bundled variable-rate model) when ``weights`` is ``None``;
    with ``weights`` (a ``.safetensors`` file or an official checkpoint) the architecture is read
    from the weights.  ``device`` is ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.

    Example::

        codec = Codec(weights="lalic_0.0483.pth.tar", device="cpu")
        print(codec.model_id, codec.fingerprint)      # lalic 3f0c...
        files = [codec.encode(path) for path in ("a.png", "b.png")]
        images = [codec.decode(data) for data in files]

    Models are cached per process: two ``Codec`` objects for the same weights and device share
    one network.
    """

    def __init__(self, model: str = "default", weights: str | os.PathLike[str] | None = None, device: str = "auto"):
        from . import loading

        self._weights = None if weights is None else Path(weights)
        self._lm: LoadedModel = loading.load_model(model, self._weights, device)

    @property
    def model_id(self) -> str:
        """The model id written in every file this codec makes (``default-v10``, ``lalic``...)."""
        return self._lm.model_id

    @property
    def fingerprint(self) -> str:
        """The weights' fingerprint (hex), as ``codec info`` shows it: decoding needs the same weights."""
        return self._lm.fingerprint.hex()

    @property
    def device(self) -> str:
        """The device the network runs on: ``"cpu"`` or ``"cuda"``."""
        return self._lm.device.type

    @property
    def variable_rate(self) -> bool:
        """True when ``quality`` chooses the rate (the default model); False for a fixed-rate model."""
        return self._lm.variable_rate

    def __repr__(self) -> str:
        return f"Codec(model_id={self.model_id!r}, fingerprint={self.fingerprint!r}, device={self.device!r})"

    def encode(self, image: ImageInput, quality: float | None = None, *, target_bpp: float | None = None) -> bytes:
        """Compress ``image`` and return the bytes of a ``.lic`` file.

        ``quality`` runs from 1 (smallest) to 8 (best), fractions allowed, default 4; or
        ``target_bpp``: the highest quality whose file is at most that many bits per pixel.
        A fixed-rate model ignores ``quality`` (with a :class:`CodecWarning`).

        The image keeps its colour mode (RGB, grayscale, palette, with alpha kept losslessly),
        its ICC profile, EXIF and XMP; EXIF orientation is applied first.  Numpy arrays: H x W
        (grayscale), H x W x 2 (gray + alpha), H x W x 3 (RGB), H x W x 4 (RGBA), uint8 or uint16.
        16-bit samples are coded at 8 bits (16-bit grayscale decodes as ``I;16``).
        """
        return self._encode(image, quality, target_bpp, stacklevel=3)

    def _encode(self, image: ImageInput, quality: float | None, target_bpp: float | None, stacklevel: int) -> bytes:
        """:meth:`encode`, warning its notes at ``stacklevel`` as :func:`warnings.warn` counts it
        from this frame (3: the code that called ``Codec.encode`` or ``encode``)."""
        from . import pipeline

        if quality is not None and target_bpp is not None:
            raise BadInputError("give quality or target_bpp, not both")
        for name, value in (("quality", quality), ("target_bpp", target_bpp)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TypeError(f"{name} must be a number, not {type(value).__name__}")
        if target_bpp is not None and not target_bpp > 0:
            raise BadInputError(f"target_bpp must be positive, got {target_bpp}")
        im, notes = _to_pil(image)
        if target_bpp is not None:
            res = pipeline.encode_to_target(im, self._lm, float(target_bpp))
        else:
            res = pipeline.encode_image(im, self._lm, None if quality is None else float(quality))
        _warn(notes + res.notes, stacklevel)
        return res.data

    def decode(self, data: DataInput) -> "Image.Image":
        """Decode ``.lic`` bytes (or a path, or a binary file object) to a Pillow image.

        The image has its original mode (``RGB``, ``L``, ``P``, ``RGBA``, ``LA``; a 16-bit
        grayscale original comes back as ``I;16`` at 8-bit precision, samples v * 257) and its
        metadata in ``image.info`` (``icc_profile``, ``exif``, ``xmp``).  A file made with other
        weights than this codec's is decoded with the bundled model it names, or refused
        (:class:`~lalic_codec.errors.WeightsMismatchError`).
        """
        from . import loading, pipeline
        from .formats import container

        raw = _read_bytes(data, "data")
        weights = self._weights
        if weights is not None:
            header = container.read_header_from_file(io.BytesIO(raw))
            if header.weights_fingerprint != self._lm.fingerprint and header.model_id in loading.BUNDLED:
                weights = None  # made with a bundled model: decode with it, as decode() would
        return pipeline.decode_bytes(raw, weights, self.device, high_bit_depth=True).image


def encode(
    image: ImageInput,
    quality: float | None = None,
    *,
    model: str = "default",
    weights: str | os.PathLike[str] | None = None,
    device: str = "auto",
    target_bpp: float | None = None,
) -> bytes:
    """Compress an image into the bytes of a ``.lic`` file.

    ``image``: a Pillow image, a numpy array (H x W, H x W x 3, H x W x 4...; uint8 or uint16), a
    path, or the bytes of an image file.  ``quality`` 1..8 (default 4) or ``target_bpp``;
    ``model``/``weights``/``device`` as for :class:`Codec` (the model is loaded once and cached).

    Example::

        data = encode("photo.png", quality=6)
        data = encode(np.zeros((64, 64, 3), np.uint8), target_bpp=0.25)
        Path("photo.lic").write_bytes(data)
    """
    return Codec(model, weights, device)._encode(image, quality, target_bpp, stacklevel=3)


def decode(
    data: DataInput,
    *,
    weights: str | os.PathLike[str] | None = None,
    device: str = "auto",
) -> "Image.Image":
    """Decode a ``.lic`` file (bytes, a path, or a binary file object) to a Pillow image.

    Files made with the bundled model need no ``weights``; others need the weights they were
    made with (checked against the fingerprint in the file).  Mode and metadata as in
    :meth:`Codec.decode`.

    Example::

        image = decode("photo.lic")
        image.save("photo.png", icc_profile=image.info.get("icc_profile"), exif=image.info.get("exif", b""))
    """
    from . import pipeline

    raw = _read_bytes(data, "data")
    return pipeline.decode_bytes(raw, None if weights is None else Path(weights), device, high_bit_depth=True).image


def info(data: DataInput) -> dict:
    """Describe a ``.lic`` file without decoding it (no model, no torch): what ``codec info --json``
    prints.  Keys include ``width``, ``height``, ``colour_mode``, ``bit_depth``, ``model_id``,
    ``weights_fingerprint``, ``quality``, ``file_bytes``, ``bpp``, ``tile_count`` and ``crc_ok``.

    Example::

        d = info("photo.lic")
        print(d["width"], d["height"], d["colour_mode"], d["bpp"])
    """
    from .formats import container

    raw = _read_bytes(data, "data")
    d = container.read_info(raw)
    d["bpp"] = 8.0 * d["file_bytes"] / (d["width"] * d["height"])
    return d
