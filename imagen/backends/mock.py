"""The mock backend: no network, a real deterministic PNG from (prompt, seed).

It is the default everywhere (CLI, demo, tests, benchmarks), so it must be fast
and exact: the same inputs give the same bytes within one environment. Options
`delay_ms` and `fail` ('transient' | 'permanent') let tests and demos simulate a
slow or failing provider without a provider; jobs may use them only where the
operator turned them on (IMAGEN_JOB_TEST_OPTIONS). The delay is an interruptible
wait (imagen.interrupts), so a stage still ends at its time limit, on a cancel,
or when the worker stops. With a call log
(`IMAGEN_MOCK_CALL_LOG`) it appends one line per call it answers, as a provider's
own bill would list it, so the reliability tests can hold imagen.usage to it.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
import zlib
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from imagen import interrupts
from imagen.backends.base import GeneratedImage, ImageRequest, ImageResult, Usage
from imagen.backends.sizes import resolve_size
from imagen.errors import ContentBlocked, ImagenError, InvalidRequest, TransientError

MODEL = "mock-1"


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


# Above this many pixels an image is drawn and encoded for memory, not speed: no cached
# gradient, no full-size temporaries (issue 14: a 4096x4096 render peaked near 280 MB).
LARGE = 1024 * 1024
# Rows encoded at a time for a large image.
STRIP = 64


@lru_cache(maxsize=8)
def _cached_gradient(width: int, height: int) -> Image.Image:
    # Read-only below (a composite mask), so one per size serves every thread.
    return Image.linear_gradient("L").resize((width, height))


def _gradient(width: int, height: int) -> Image.Image:
    if width * height > LARGE:
        return Image.linear_gradient("L").resize((width, height))
    return _cached_gradient(width, height)


def _background(width: int, height: int, top: bytes, bottom: bytes) -> Image.Image:
    """A vertical gradient from `top` to `bottom` (RGB)."""
    gradient = _gradient(width, height)
    if width * height <= LARGE:
        return Image.composite(
            Image.new("RGB", (width, height), tuple(bottom)),
            Image.new("RGB", (width, height), tuple(top)),
            gradient,
        )
    # The same picture from one 8-bit band per colour through a lookup table: a third of the
    # memory of two full RGB images and their composite.
    bands = [
        gradient.point([a + (b - a) * m // 255 for m in range(256)]) for a, b in zip(top, bottom, strict=True)
    ]
    return Image.merge("RGB", bands)


def render_png(prompt: str, seed: int, width: int, height: int) -> bytes:
    """Draw the image for (prompt, seed) and encode it as PNG."""
    key = f"{seed}\x00{prompt}".encode()
    digest = hashlib.sha256(key).digest()
    # Twelve shapes of eight bytes each (x, y, radius, colour, kind) from one hash: a seeded
    # random.Random costs six calls a shape, a third of the whole render at 64x64.
    shapes = hashlib.shake_256(key).digest(12 * 8)
    img = _background(width, height, digest[0:3], digest[3:6])
    draw = ImageDraw.Draw(img)
    short = min(width, height)
    low, high = max(1, short // 16), max(2, short // 4)
    for i in range(0, len(shapes), 8):
        x = int.from_bytes(shapes[i : i + 2], "big") % width
        y = int.from_bytes(shapes[i + 2 : i + 4], "big") % height
        r = low + shapes[i + 4] % (high - low)
        shape = draw.ellipse if shapes[i + 7] & 1 else draw.rectangle
        shape(
            [x - r, y - r, x + r, y + r], fill=(shapes[i + 5], shapes[i + 6], shapes[i + 4] ^ shapes[i + 7])
        )
    if short >= 128:
        size = max(10, short // 28)
        font = _font(size)
        draw.text((size, height - 3 * size), f"MOCK seed={seed}", fill="white", font=font)
        draw.text((size, height - 2 * size), prompt[:48], fill="white", font=font)
    return encode_png(img)


def encode_png(img: Image.Image) -> bytes:
    """An RGB image as PNG: one IDAT chunk, no row filters, fast deflate.

    Not Pillow's PNG writer: at the 64x64 the benchmarks use it costs about 100 us an
    image, three times this, mostly fixed setup (buffers and a full-window deflate), and
    the benchmark is meant to measure the pipeline rather than the mock's encoder. The
    result is a plain PNG that Pillow and every browser read; tests decode it back.
    """
    width, height = img.size
    if img.mode != "RGB":
        img = img.convert("RGB")
    stride = width * 3
    # A deflate window no larger than the data: the same output, less memory to set up.
    deflate = zlib.compressobj(1, zlib.DEFLATED, max(9, min(15, ((stride + 1) * height - 1).bit_length())))
    # A large image goes through in strips of rows, never as one raw copy (or two).
    step = height if width * height <= LARGE else STRIP
    parts = []
    for top in range(0, height, step):
        rows = min(step, height - top)
        raw = (img if step == height else img.crop((0, top, width, top + rows))).tobytes()
        # Each scanline starts with its filter type: 0, none.
        parts.append(
            deflate.compress(b"".join(b"\0" + raw[y * stride : (y + 1) * stride] for y in range(rows)))
        )
    parts.append(deflate.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", b"".join(parts)),
            _chunk(b"IEND", b""),
        )
    )


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


class MockBackend:
    """Deterministic local images; honours size/aspect, n, seed, delay and failure injection."""

    name = "mock"
    # Its only wait (delay_ms) checks the stage's stop itself: no helper thread needed per call.
    interruptible = True

    def __init__(self, call_log: Path | None = None) -> None:
        self.call_log = call_log

    def default_model(self) -> str:
        return MODEL

    def generate(self, request: ImageRequest) -> ImageResult:
        # Logged when the call answers, with images or with an error a provider would bill as a
        # call (ImagenError); not when it was interrupted (a time limit), which answers nothing.
        try:
            result = self._generate(request)
        except ImagenError:
            if self.call_log is not None:
                _log_call(self.call_log, request.call_id, False)
            raise
        if self.call_log is not None:
            _log_call(self.call_log, request.call_id, True)
        return result

    def _generate(self, request: ImageRequest) -> ImageResult:
        started = time.monotonic()
        delay_ms = request.options.get("delay_ms", 0)
        if delay_ms:
            interrupts.sleep(float(delay_ms) / 1000)
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


def _log_call(path: Path, call_id: str | None, ok: bool) -> None:
    """One line per answered call, `call_id pid ok`: one write with O_APPEND, so lines of
    concurrent threads and processes never interleave, and a SIGKILL after it keeps it."""
    line = f"{call_id or '-'} {os.getpid()} {int(ok)}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
