"""Sizes and aspect ratios: parsing, and what each provider model accepts.

Parsing is shared by the CLI, job params and every backend. The per-model
rules (`size_rule`) let a backend refuse a size its model cannot make before
paying for a round trip, turn an aspect ratio into the size the model really
produces, and tell a caller (a pixel cap, a dashboard) what a request will
make (`planned_size`) without calling anyone. Rules come from the SDKs'
docstrings and the providers' model pages; docs/providers.md cites them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from imagen.errors import InvalidRequest

MAX_SIDE = 4096
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
_ASPECT = re.compile(r"^\s*(\d{1,3})\s*:\s*(\d{1,3})\s*$")

# Sizes every GPT image model accepts (openai/types/image_generate_params.py).
OPENAI_STANDARD_SIZES = ((1024, 1024), (1536, 1024), (1024, 1536))
# Models that take any WIDTHxHEIGHT within limits: the SDK docstring names gpt-image-2 and 2.5 (and their
# snapshots); 2.6 follows the same 16-pixel grid and 8,294,400-pixel budget by third-party measurement.
OPENAI_CUSTOM_SIZE_MODELS = ("gpt-image-2", "gpt-image-2.5-", "gpt-image-2.6-")
# Models known to take only the standard sizes.
OPENAI_STANDARD_ONLY_MODELS = ("gpt-image-1.5", "gpt-image-1-mini", "gpt-image-1", "chatgpt-image-latest")
# Aspect ratios of Gemini image models (ImageConfig.aspect_ratio; Google's model pages).
GEMINI_ASPECTS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
GEMINI_EXTENDED_ASPECTS = (*GEMINI_ASPECTS, "1:4", "4:1", "1:8", "8:1")
GEMINI_EXTENDED_MODELS = ("gemini-3.1-flash-image", "gemini-3.1-flash-lite-image")
# Gemini's default output ("1K") is about a megapixel whatever the ratio.
GEMINI_1K_PIXELS = 1024 * 1024
TARGET_PIXELS = 1024 * 1024


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


@dataclass(frozen=True)
class SizeRule:
    """What sizes one provider model accepts.

    kind is "custom" (any WxH on a `multiple` grid within the limits), "standard"
    (only `sizes`), "aspect" (only `aspects`; the model picks the pixels, about
    `pixels` of them) or "any" (a model we know nothing about: nothing is
    checked, the provider decides).
    """

    backend: str
    model: str
    kind: str
    sizes: tuple[tuple[int, int], ...] = ()
    aspects: tuple[str, ...] = ()
    multiple: int = 1
    max_side: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    max_ratio: float | None = None
    pixels: int | None = None

    def describe(self) -> str:
        """One line for an error message or the docs."""
        if self.kind == "custom":
            return (
                f"any WxH with both sides multiples of {self.multiple}, long side at most {self.max_side}, "
                f"{self.min_pixels:,}..{self.max_pixels:,} pixels, aspect ratio within 1:{self.max_ratio:g} "
                f"and {self.max_ratio:g}:1"
            )
        if self.kind == "standard":
            return "only " + ", ".join(f"{w}x{h}" for w, h in self.sizes)
        if self.kind == "aspect":
            return "aspect ratios " + ", ".join(self.aspects) + " (the model picks the pixel size)"
        return "not known here; the provider decides"


def size_rule(backend: str, model: str) -> SizeRule:
    """The size rule of `model` on `backend` ("mock" takes any size up to MAX_SIDE)."""
    key = model.strip().lower().removeprefix("models/")
    if backend == "openai":
        if key.startswith(OPENAI_CUSTOM_SIZE_MODELS):
            return SizeRule(
                backend,
                model,
                "custom",
                sizes=OPENAI_STANDARD_SIZES,
                multiple=16,
                max_side=3840,
                min_pixels=655_360,
                max_pixels=3840 * 2160,
                max_ratio=3.0,
            )
        if key.startswith(OPENAI_STANDARD_ONLY_MODELS):
            return SizeRule(backend, model, "standard", sizes=OPENAI_STANDARD_SIZES)
        return SizeRule(backend, model, "any", sizes=OPENAI_STANDARD_SIZES)
    if backend == "gemini":
        aspects = GEMINI_EXTENDED_ASPECTS if key.startswith(GEMINI_EXTENDED_MODELS) else GEMINI_ASPECTS
        return SizeRule(backend, model, "aspect", aspects=aspects, pixels=GEMINI_1K_PIXELS)
    return SizeRule(
        backend, model, "custom", multiple=1, max_side=MAX_SIDE, min_pixels=16 * 16,
        max_pixels=MAX_SIDE * MAX_SIDE, max_ratio=8.0,
    )  # fmt: skip


def _log_ratio(width: float, height: float) -> float:
    return math.log(width / height)


def nearest_aspect(width: int, height: int, aspects: tuple[str, ...]) -> str:
    """The ratio in `aspects` closest to width:height (on a log scale, so 2:1 and 1:2 are symmetric)."""
    target = _log_ratio(width, height)
    return min(aspects, key=lambda ratio: abs(_log_ratio(*parse_aspect(ratio)) - target))


def nearest_size(width: int, height: int, sizes: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The size in `sizes` whose ratio is closest to width:height."""
    target = _log_ratio(width, height)
    return min(sizes, key=lambda size: abs(_log_ratio(*size) - target))


def check_size(rule: SizeRule, size: tuple[int, int]) -> None:
    """Raise InvalidRequest naming the model's limits when it cannot make `size` exactly."""
    width, height = size
    problem = None
    if rule.kind == "standard" and size not in rule.sizes:
        problem = "is not one of its sizes"
    elif rule.kind == "custom":
        assert rule.max_side and rule.min_pixels and rule.max_pixels and rule.max_ratio
        if width % rule.multiple or height % rule.multiple:
            problem = f"has a side that is not a multiple of {rule.multiple}"
        elif max(width, height) > rule.max_side:
            problem = f"has a side over {rule.max_side}"
        elif not rule.min_pixels <= width * height <= rule.max_pixels:
            problem = f"has {width * height:,} pixels"
        elif max(width / height, height / width) > rule.max_ratio:
            problem = "is too narrow"
    if problem:
        raise InvalidRequest(
            f"{rule.backend} model {rule.model} cannot make {width}x{height}: it {problem}; "
            f"it takes {rule.describe()}"
        )


def _custom_size_for(rule: SizeRule, w: int, h: int) -> tuple[int, int] | None:
    """The exact w:h size on the rule's grid, within its limits, nearest a megapixel (None if none)."""
    assert rule.min_pixels and rule.max_pixels and rule.max_side
    g = math.gcd(w, h)
    w, h = w // g, h // g
    # w*k and h*k must both be multiples of the grid.
    step = math.lcm(rule.multiple // math.gcd(w, rule.multiple), rule.multiple // math.gcd(h, rule.multiple))
    candidates = []
    k = step
    while w * k <= rule.max_side and h * k <= rule.max_side:
        if rule.min_pixels <= w * k * h * k <= rule.max_pixels:
            candidates.append((w * k, h * k))
        k += step
    if not candidates:
        return None
    return min(candidates, key=lambda s: abs(math.log(s[0] * s[1] / TARGET_PIXELS)))


def size_for_aspect(rule: SizeRule, aspect: str) -> tuple[tuple[int, int], list[str]]:
    """The WxH to ask `rule`'s model for an aspect ratio, plus a warning when it is only approximate."""
    w, h = parse_aspect(aspect)
    if rule.kind == "custom":
        assert rule.max_ratio
        if max(w / h, h / w) > rule.max_ratio:
            raise InvalidRequest(
                f"{rule.backend} model {rule.model} cannot make aspect ratio {aspect}: "
                f"it takes {rule.describe()}"
            )
        standard = [size for size in rule.sizes if size[0] * h == size[1] * w]
        exact = standard[0] if standard else _custom_size_for(rule, w, h)
        if exact:
            return exact, []
    sizes = rule.sizes or OPENAI_STANDARD_SIZES
    width, height = nearest_size(w, h, sizes)
    warnings = []
    if width * h != height * w:
        warnings.append(
            f"{rule.backend}: aspect ratio {aspect} approximated by {width}x{height}, "
            f"the nearest size model {rule.model} takes"
        )
    return (width, height), warnings


def planned_size(
    backend: str, model: str, size: tuple[int, int] | None, aspect: str | None
) -> tuple[int, int]:
    """About the WxH a request will produce, without calling anyone (for pixel caps and estimates).

    Raises InvalidRequest when the model cannot make it. Gemini picks its own
    pixels: the answer is its ~1 megapixel default at the nearest supported ratio.
    """
    if backend == "mock":
        return resolve_size(size, aspect, default=(1024, 1024))
    rule = size_rule(backend, model)
    if rule.kind == "aspect":
        if size:
            ratio = nearest_aspect(size[0], size[1], rule.aspects)
        else:
            ratio = nearest_aspect(*parse_aspect(aspect or "1:1"), rule.aspects)
        w, h = parse_aspect(ratio)
        pixels = rule.pixels or GEMINI_1K_PIXELS
        width = round(math.sqrt(pixels * w / h))
        return width, round(width * h / w)
    if size:
        check_size(rule, size)
        return size
    if aspect:
        return size_for_aspect(rule, aspect)[0]
    return (1024, 1024)
