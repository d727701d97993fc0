"""Where the project's shared material (../shared: data, anchors, reference vectors) lives."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the checkout, for editable installs


def shared_dir() -> Path:
    """``$LALIC_SHARED``, else the first ``shared`` folder inside or beside the current folder or
    the checkout; ``../shared`` if none exists."""
    env = os.environ.get("LALIC_SHARED")
    if env:
        return Path(env)
    for base in (Path.cwd(), _PACKAGE_ROOT):
        for cand in (base / "shared", base.parent / "shared"):
            if (cand / "data").is_dir() or (cand / "refvec").is_dir() or (cand / "anchors").is_dir():
                return cand
    return Path("..") / "shared"
