"""Size and aspect-ratio parsing shared by the CLI, job params and every backend."""

from __future__ import annotations

import re

from imagen.errors import InvalidRequest

MAX_SIDE = 4096
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
_ASPECT = re.compile(r"^\s*(\d{1,3})\s*:\s*(\d{1,3})\s*$")


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (W, H), each side 16..4096."""
    match = _SIZE.match(text)
    if not match:
        raise InvalidRequest(f"size must look like 1024x768, not {text!r}")
    width, height = int(match[1]), int(match[2])
    if not (16 <= width <= MAX_SIDE and 16 <= height <= MAX_SIDE):
        raise InvalidRequest(f"size {width}x{height} is out of range: each side must be 16..{MAX_SIDE}")
    return width, height


def parse_aspect(text: str) -> tuple[int, int]:
    """'16:9' -> (16, 9), with both parts positive and the ratio within 1:8..8:1."""
    match = _ASPECT.match(text)
    if not match:
        raise InvalidRequest(f"aspect_ratio must look like 16:9, not {text!r}")
    w, h = int(match[1]), int(match[2])
    if w == 0 or h == 0 or max(w / h, h / w) > 8:
        raise InvalidRequest(f"aspect_ratio {text!r} is out of range (1:8 to 8:1)")
    return w, h


def resolve_size(
    size: tuple[int, int] | None, aspect_ratio: str | None, *, default: tuple[int, int]
) -> tuple[int, int]:
    """Explicit size wins; otherwise fit the aspect ratio to the default's long side."""
    if size:
        return size
    if aspect_ratio:
        w, h = parse_aspect(aspect_ratio)
        long_side = max(default)
        if w >= h:
            return long_side, max(16, round(long_side * h / w))
        return max(16, round(long_side * w / h)), long_side
    return default
