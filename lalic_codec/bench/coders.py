"""The coders ``codec bench`` measures: our models (one point per quality or per weights file) and
the conventional codecs through Pillow (JPEG, WebP, AVIF, JPEG XL), with their versions."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BadInputError

CODECS = ("jpeg", "webp", "avif", "jxl")


DEFAULT_LADDERS = {
    "jpeg": (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95),
    "webp": (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95),
    "avif": (10, 20, 30, 40, 50, 60, 70, 80, 90),
    "jxl": (10, 20, 30, 40, 50, 60, 70, 80, 90, 95),
}


CODEC_LABELS = {"jpeg": "JPEG", "webp": "WebP", "avif": "AVIF", "jxl": "JPEG XL"}


@dataclass
class Source:
    name: str
    image: object  # the opened PIL image, as the CLI would open it
    rgb: np.ndarray  # the RGB input as the pipeline prepares it


class Coder:
    """One curve: ``points`` are its rate points, ``encode``/``decode`` one image at one point."""

    name: str
    key: str
    description: str
    points: list
    rate_key = "quality"

    def encode(self, src: Source, point) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes, point) -> np.ndarray:
        raise NotImplementedError

    def meta(self) -> dict:
        return {}

    def point_label(self, point):
        return point


class PillowCoder(Coder):
    FORMATS = {"jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF", "jxl": "JXL"}

    def __init__(self, codec: str, qualities):
        self.key, self.name, self.points = codec, CODEC_LABELS[codec], list(qualities)
        self.format = self.FORMATS[codec]
        self.description = f"{self.name} through Pillow defaults with quality set ({codec_version(codec)})"

    def encode(self, src: Source, q) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(src.rgb, "RGB").save(buf, format=self.format, quality=int(q))
        return buf.getvalue()

    def decode(self, data: bytes, q) -> np.ndarray:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)


def codec_version(codec: str) -> str:
    import PIL
    from PIL import features

    if codec == "jxl":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"pillow-jxl-plugin {version('pillow-jxl-plugin')}"
        except PackageNotFoundError:
            return "JPEG XL plugin"
    lib = {"jpeg": "jpg", "webp": "webp", "avif": "avif"}[codec]
    v = features.version(lib)
    libname = {"jpeg": "libjpeg", "webp": "libwebp", "avif": "libavif"}[codec]
    if codec == "jpeg" and features.check_feature("libjpeg_turbo"):
        libname = "libjpeg-turbo"
        v = features.version_feature("libjpeg_turbo") or v
    return f"Pillow {PIL.__version__}, {libname} {v}"


def codec_available(codec: str) -> str | None:
    """None if the codec can be used here, else why not."""
    from PIL import Image, features

    if codec == "jxl":
        try:
            import pillow_jxl  # noqa: F401  (registers the JXL format with Pillow)
        except ImportError:
            return "JPEG XL skipped: pillow-jxl-plugin is not installed"
        return None if "JXL" in Image.SAVE else "JPEG XL skipped: the Pillow plugin did not register an encoder"
    feature = {"jpeg": "jpg", "webp": "webp", "avif": "avif"}[codec]
    if not features.check(feature):
        return f"{CODEC_LABELS[codec]} skipped: this Pillow ({Image.__version__}) was built without it"
    return None


class ModelCoder(Coder):
    """A model of ours: one point per quality (variable-rate) or per weights file (fixed-rate)."""

    def __init__(self, model: str, weights: list[str], qualities, device: str):
        from .. import loading

        self.key = self.name = model
        self.device = device
        self.notes: list[str] = []
        if len(weights) > 1:
            loaded = [loading.load_model(model, w, device) for w in weights]
            if any(lm.variable_rate for lm in loaded):
                raise BadInputError(f"model {model}: give one weights file for a variable-rate model (its points are --quality)")
            self.points = [(w, None) for w in weights]
            self.rate_key = "weights"
            lm = loaded[0]
        else:
            w = weights[0] if weights else None
            lm = loading.load_model(model, w, device)
            if lm.variable_rate:
                L = lm.model.num_levels
                qs = list(qualities) if qualities else [float(q) for q in range(1, L + 1)]
                bad = [q for q in qs if not 1 <= q <= L]
                if bad:
                    raise BadInputError(f"model {model}: quality must be between 1 and {L}, got {bad[0]:g}")
                self.points = [(w, q) for q in qs]
            else:
                self.points = [(w, None)]
                self.rate_key = "weights"
        if self.rate_key == "weights" and qualities:
            self.notes.append(f"{model} has a fixed rate: --quality does not apply, its points are its weights files")
        from .. import __version__

        src = ", ".join(str(w) for w in weights) if weights else "bundled weights"
        fps = ", ".join(loading.load_model(model, w, device).fingerprint.hex() for w in dict.fromkeys(w for w, _ in self.points))
        self.lm = lm
        self.description = f"lalic-codec {__version__}, model {lm.model_id} ({src}; fingerprint {fps}), device {lm.device}"

    def encode(self, src: Source, point) -> bytes:
        from .. import loading, pipeline

        w, q = point
        lm = loading.load_model(self.name, w, self.device)  # cached: a dictionary look-up
        return pipeline.encode_image(src.image, lm, q).data

    def decode(self, data: bytes, point) -> np.ndarray:
        from .. import pipeline

        return np.asarray(pipeline.decode_bytes(data, point[0], self.device).image.convert("RGB"), dtype=np.uint8)

    def point_label(self, point):
        w, q = point
        return q if self.rate_key == "quality" else (Path(w).name if w else self.name)
