"""The mock backend: no network, a real deterministic PNG from (prompt, seed).

It is the default everywhere (CLI, demo, tests, benchmarks), so it must be fast
and exact: the same inputs give the same bytes within one environment. Options
`delay_ms` and `fail` ('transient' | 'permanent') let tests and demos simulate a
slow or failing provider without a provider.
"""

from __future__ import annotations

import hashlib
import io
import random
import time
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from imagen.backends.base import GeneratedImage, ImageRequest, ImageResult, Usage
from imagen.backends.sizes import resolve_size
from imagen.errors import ContentBlocked, InvalidRequest, TransientError

MODEL = "mock-1"


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


@lru_cache(maxsize=8)
def _gradient(width: int, height: int) -> Image.Image:
    # Read-only below (a composite mask), so one per size serves every thread.
    return Image.linear_gradient("L").resize((width, height))


def render_png(prompt: str, seed: int, width: int, height: int) -> bytes:
    """Draw the image for (prompt, seed) and encode it as PNG."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    rng = random.Random(digest)
    gradient = _gradient(width, height)
    img = Image.composite(
        Image.new("RGB", (width, height), tuple(digest[3:6])),
        Image.new("RGB", (width, height), tuple(digest[0:3])),
        gradient,
    )
    draw = ImageDraw.Draw(img)
    short = min(width, height)
    for _ in range(12):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(max(1, short // 16), max(2, short // 4))
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x - r, y - r, x + r, y + r], fill=colour)
    if short >= 128:
        size = max(10, short // 28)
        font = _font(size)
        draw.text((size, height - 3 * size), f"MOCK seed={seed}", fill="white", font=font)
        draw.text((size, height - 2 * size), prompt[:48], fill="white", font=font)
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


class MockBackend:
    """Deterministic local images; honours size/aspect, n, seed, delay and failure injection."""

    name = "mock"

    def default_model(self) -> str:
        return MODEL

    def generate(self, request: ImageRequest) -> ImageResult:
        started = time.monotonic()
        delay_ms = request.options.get("delay_ms", 0)
        if delay_ms:
            time.sleep(float(delay_ms) / 1000)
        fail = request.options.get("fail")
        if fail == "transient":
            raise TransientError("mock backend: simulated transient provider failure (503)")
        if fail == "permanent":
            raise ContentBlocked("mock backend: simulated permanent failure (prompt refused)")
        if fail not in (None, ""):
            raise InvalidRequest(f"mock backend: fail must be 'transient' or 'permanent', not {fail!r}")
        width, height = resolve_size(request.size, request.aspect_ratio, default=(1024, 1024))
        seed = request.seed if request.seed is not None else 0
        images = [
            GeneratedImage(
                data=render_png(request.prompt, seed + i, width, height),
                mime="image/png",
                width=width,
                height=height,
                seed=seed + i,
                index=i,
            )
            for i in range(request.n)
        ]
        latency = (time.monotonic() - started) * 1000
        model = request.model or MODEL
        usage = Usage(backend=self.name, model=model, images=len(images), latency_ms=latency)
        return ImageResult(images=images, usage=usage, model=model)
