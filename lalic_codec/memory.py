"""How much memory coding an image takes, and how much there is: the budget behind ``--max-memory``.

The encoder picks its tiles from a budget (the largest tiles that fit: fewer seams, fewer pixels
coded twice); the decoder, which has no choice (the tiles are in the file), refuses a file whose
tiles would need more than its budget before it allocates anything.  Import-light (no torch, no
numpy): the command line parses ``--max-memory`` with it.
"""

from __future__ import annotations

import math
import os
import re

# Peak resident memory of a coding process ~ MEMORY_BASE + MEMORY_PER_TILE_PIXEL * padded pixels of
# its largest tile + MEMORY_PER_IMAGE_PIXEL * image pixels.  Measured with the bundled model on CPU
# (ru_maxrss of a fresh process per measurement): 322 MiB with the model loaded; the network adds
# 512-565 bytes per padded tile pixel, encode and decode alike, linear from 256x256 to 2048x2048
# and the same for 1024x2048 as for 2048x1024; the image-sized buffers (the image and its RGB
# copies; the decoder's weighted sums and the decoded image) and the heap's fragmentation over many
# tiles add 8-55 bytes per image pixel.  Peaks of the same run vary by up to 0.6 GiB (24 MP in 35
# tiles of 960x896: 0.96-1.59 GiB to encode; in 6 tiles of 2048x2048: 3.05-3.39 GiB to encode,
# 3.18-3.59 to decode, benchmarks/bench_large.py).  The constants cover the largest peaks seen with
# some 10 % to spare: an estimate should not be below the real peak.
MEMORY_BASE = 400 * 2**20
MEMORY_PER_TILE_PIXEL = 640
MEMORY_PER_IMAGE_PIXEL = {"encode": 48, "decode": 48}
#: what the encoder's post-filter (postfilter.py) adds per image pixel: its float32 reconstruction
#: and weights (16 bytes), one filtered candidate at a time (3), each pixel's activity, direction
#: and class (6) and the copy of the activities that their quartiles take (4); its other buffers go
#: by bands of rows.  The encoder fits one only where the budget has this room besides the tiles.
POSTFILTER_PER_IMAGE_PIXEL = 29
#: the smallest tile side the encoder's planner uses (tiling.plan_tiles)
MIN_TILE = 128
#: the smallest budget accepted: the model and one smallest tile
MIN_BUDGET = MEMORY_BASE + MEMORY_PER_TILE_PIXEL * MIN_TILE**2
#: an encoder's default budget is this part of the memory available (the rest stays the machine's:
#: other processes, the page cache); a decoder's is all of it, as it has no choice of tiles
ENCODE_FRACTION = 0.5
#: an encoder's budget when the available memory cannot be read
FALLBACK_BUDGET = 2 * 2**30


def memory_needed(tile_pixels: int, image_pixels: int, op: str = "encode") -> int:
    """Estimated peak memory (bytes) of coding (``op``: "encode" or "decode") an image of
    ``image_pixels`` pixels whose largest padded tile has ``tile_pixels``."""
    return MEMORY_BASE + MEMORY_PER_TILE_PIXEL * tile_pixels + MEMORY_PER_IMAGE_PIXEL[op] * image_pixels


_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(?:i?b)?|b)?\s*", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """A ``--max-memory`` value in bytes: a number of bytes, or a number with K, M, G or T (powers of
    1024, case and a trailing B or iB ignored: "2G", "1.5GiB", "800MB", "512m").  Raises ValueError
    with a message for anything else, zero included."""
    m = _SIZE.fullmatch(str(text))
    value = float(m[1]) * 1024 ** " kmgt".index(m[2].lower() if m[2] else " ") if m else math.nan
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"{text!r} is not a memory size (e.g. 2G, 1.5G, 800M or a number of bytes)")
    return int(value)


def format_memory(n: int) -> str:
    """Bytes as people read them: "1.5 GiB", "640 MiB"."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{max(1, round(n / 2**20))} MiB"


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())  # cgroup v2 writes "max" for no limit: ValueError
    except (OSError, ValueError):
        return None


#: where the kernel says how much memory is available, and the cgroup (container) limit and usage
MEMINFO = "/proc/meminfo"
CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
)


def available_memory(cuda_device=None) -> int | None:
    """Bytes this process can still use: the kernel's MemAvailable (free memory and the cache it can
    drop; free pages where there is no /proc), less where a cgroup (container) limit leaves less,
    and no more than the free memory of ``cuda_device`` (a torch device) when the network runs
    there.  None when none of these can be read."""
    found = []
    try:
        with open(MEMINFO) as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    for limit, usage in CGROUP_FILES:
        cap = _read_int(limit)
        if cap is not None and cap < 2**60:  # v1 says "no limit" with a huge number
            found.append(max(0, cap - (_read_int(usage) or 0)))
            break
    if cuda_device is not None and getattr(cuda_device, "type", None) == "cuda":
        try:
            import torch

            found.append(int(torch.cuda.mem_get_info(cuda_device)[0]))
        except Exception:
            pass
    return min(found) if found else None


def default_budget(op: str = "encode", cuda_device=None) -> int | None:
    """``--max-memory``'s default: half the memory available for an encoder, all of it for a decoder.
    Where the available memory cannot be read: FALLBACK_BUDGET for an encoder, and None (no limit)
    for a decoder, which is not to refuse files that the machine may well decode."""
    avail = available_memory(cuda_device)
    if avail is None:
        return FALLBACK_BUDGET if op == "encode" else None
    return int(avail * ENCODE_FRACTION) if op == "encode" else avail
