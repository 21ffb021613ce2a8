"""The mock backend: real deterministic PNGs, honoured sizes and counts, simulated delay and failures."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from imagen.backends.base import ImageRequest
from imagen.backends.mock import MODEL, MockBackend, encode_png
from imagen.errors import InvalidRequest, PermanentError, TransientError


def generate(**fields: object) -> list[bytes]:
    request = ImageRequest(**{"prompt": "a lighthouse at dusk", "size": (64, 48), **fields})  # type: ignore[arg-type]
    return [image.data for image in MockBackend().generate(request).images]


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        img.load()
        return img.size


def test_same_prompt_and_seed_give_identical_bytes() -> None:
    assert generate(seed=7) == generate(seed=7)


def test_different_seed_gives_different_bytes() -> None:
    assert generate(seed=7) != generate(seed=8)


def test_different_prompt_gives_different_bytes() -> None:
    assert generate(seed=7) != generate(seed=7, prompt="a lighthouse at dawn")


def test_default_is_a_valid_1024_square_png_with_seed_0() -> None:
    result = MockBackend().generate(ImageRequest(prompt="a lighthouse at dusk"))

    (image,) = result.images
    assert (image.width, image.height, image.mime, image.seed) == (1024, 1024, "image/png", 0)
    assert size_of(image.data) == (1024, 1024)
    assert result.model == MODEL
    assert result.usage.backend == "mock"
    assert result.usage.images == 1
    assert result.usage.ok


# (1100, 1001): above LARGE, encoded in strips of 64 rows with a partial last strip.
@pytest.mark.parametrize("size", [(1, 1), (64, 48), (333, 101), (1100, 1001)])
def test_the_png_encoder_keeps_every_pixel(size: tuple[int, int]) -> None:
    # The mock writes its own PNGs (Pillow's writer costs three times as much at 64x64): a reader
    # must get back exactly the pixels drawn, at any width, odd ones included.
    width, height = size
    row = bytes((x * 7 + c * 101) % 256 for x in range(width) for c in range(3))
    drawn = Image.frombytes("RGB", size, b"".join(row[y % 3 :] + row[: y % 3] for y in range(height)))

    with Image.open(io.BytesIO(encode_png(drawn))) as decoded:
        assert decoded.format == "PNG" and decoded.mode == "RGB"
        assert decoded.tobytes() == drawn.tobytes()


@pytest.mark.parametrize(("size"), [(320, 200), (16, 16), (200, 320)])
def test_explicit_size_is_honoured_in_the_pixels_and_the_metadata(size: tuple[int, int]) -> None:
    (image,) = MockBackend().generate(ImageRequest(prompt="p", size=size)).images

    assert size_of(image.data) == size
    assert (image.width, image.height) == size


@pytest.mark.parametrize(
    ("aspect", "expected"), [("16:9", (1024, 576)), ("9:16", (576, 1024)), ("1:1", (1024, 1024))]
)
def test_aspect_ratio_is_fitted_to_the_long_side(aspect: str, expected: tuple[int, int]) -> None:
    (image,) = MockBackend().generate(ImageRequest(prompt="p", aspect_ratio=aspect)).images

    assert size_of(image.data) == expected
    assert (image.width, image.height) == expected


def test_n_images_use_seed_plus_index_and_match_single_draws() -> None:
    result = MockBackend().generate(ImageRequest(prompt="p", size=(64, 48), n=3, seed=5))

    assert [image.seed for image in result.images] == [5, 6, 7]
    assert [image.index for image in result.images] == [0, 1, 2]
    assert len({image.data for image in result.images}) == 3
    assert result.images[1].data == generate(prompt="p", seed=6)[0]
    assert result.usage.images == 3


def test_requested_model_is_reported() -> None:
    result = MockBackend().generate(ImageRequest(prompt="p", size=(16, 16), model="mock-custom"))

    assert result.model == "mock-custom"
    assert result.usage.model == "mock-custom"


def test_delay_ms_delays_the_answer_at_least_that_long() -> None:
    started = time.monotonic()
    result = MockBackend().generate(ImageRequest(prompt="p", size=(16, 16), options={"delay_ms": 150}))
    elapsed_ms = (time.monotonic() - started) * 1000

    assert elapsed_ms >= 150
    assert result.usage.latency_ms >= 150


def test_fail_transient_raises_a_transient_error() -> None:
    with pytest.raises(TransientError) as caught:
        MockBackend().generate(ImageRequest(prompt="p", options={"fail": "transient"}))

    assert caught.value.is_transient is True
    assert "transient" in str(caught.value)


def test_fail_permanent_raises_a_permanent_error() -> None:
    with pytest.raises(PermanentError) as caught:
        MockBackend().generate(ImageRequest(prompt="p", options={"fail": "permanent"}))

    assert not isinstance(caught.value, TransientError)
    assert caught.value.is_transient is False


def test_failure_comes_after_the_delay_like_a_slow_failing_provider() -> None:
    started = time.monotonic()
    with pytest.raises(TransientError):
        MockBackend().generate(ImageRequest(prompt="p", options={"delay_ms": 100, "fail": "transient"}))

    assert (time.monotonic() - started) * 1000 >= 100


def test_unknown_fail_value_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequest, match="sometimes"):
        MockBackend().generate(ImageRequest(prompt="p", options={"fail": "sometimes"}))


def test_a_large_background_is_the_composite_a_small_one_draws() -> None:
    """Above LARGE the gradient is built band by band, not composited: the same picture, within rounding."""
    from PIL import ImageChops

    from imagen.backends.mock import LARGE, _background, _gradient

    top, bottom, size = bytes((250, 3, 90)), bytes((10, 200, 91)), (1100, 1000)
    assert size[0] * size[1] > LARGE
    banded = _background(*size, top, bottom)
    composited = Image.composite(
        Image.new("RGB", size, tuple(bottom)), Image.new("RGB", size, tuple(top)), _gradient(*size)
    )
    assert banded.mode == "RGB" and banded.size == size
    assert max(high for _, high in ImageChops.difference(banded, composited).getextrema()) <= 1


def test_call_log_has_one_line_per_answered_call_failures_included(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    backend = MockBackend(call_log=log)
    backend.generate(ImageRequest(prompt="p", size=(8, 8), call_id="call-ok"))
    with pytest.raises(TransientError):
        backend.generate(ImageRequest(prompt="p", options={"fail": "transient"}, call_id="call-503"))
    lines = [line.split() for line in log.read_text().splitlines()]
    assert lines == [["call-ok", str(os.getpid()), "1"], ["call-503", str(os.getpid()), "0"]]


def test_without_a_call_log_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    MockBackend().generate(ImageRequest(prompt="p", size=(8, 8), call_id="c"))
    assert list(tmp_path.iterdir()) == []
