"""Live first calls against the real providers: one cheap image each, run by the operator on mRiver.

Skipped unless IMAGEN_LIVE_PROVIDERS=1 and the provider's key are set (docs/providers.md,
"Live tests"). Each test makes ONE real call and costs money: about $0.006 (OpenAI, quality
low) and $0.04 (Gemini). They prove what the loopback contract tests cannot: the API version,
the model ids, the account's verification and quota, and that the recorded cost matches the
provider's usage page.
"""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

from imagen.backends import get_backend
from imagen.backends.base import ImageRequest
from imagen.config import load_settings
from imagen.prices import price_usage

LIVE = os.environ.get("IMAGEN_LIVE_PROVIDERS") == "1"
pytestmark = [pytest.mark.live, pytest.mark.skipif(not LIVE, reason="set IMAGEN_LIVE_PROVIDERS=1 and a key")]
PROMPT = "a small red lighthouse on a rock at dusk, simple flat illustration"


def _one_image(backend_name: str, **request: object) -> None:
    settings = load_settings()
    backend = get_backend(backend_name, settings)
    result = backend.generate(ImageRequest(prompt=PROMPT, timeout_s=settings.provider_timeout, **request))  # type: ignore[arg-type]

    (image,) = result.images
    with Image.open(io.BytesIO(image.data)) as img:
        assert img.size == (image.width, image.height)
    usage = result.usage
    estimate = price_usage(usage)
    print(f"\n{backend_name}: {result.model} {image.width}x{image.height} {usage} -> {estimate}")
    assert usage.ok and usage.images == 1
    assert usage.image_output_tokens, "the provider reported no image-output tokens"
    assert estimate.usd is not None, estimate.basis
    assert 0.001 < estimate.usd < 0.5, estimate


@pytest.mark.skipif(not os.environ.get("OPENAI_API_KEY"), reason="OPENAI_API_KEY is not set")
def test_live_openai_default_model_makes_one_low_quality_image_and_prices_it() -> None:
    _one_image("openai", quality="low", aspect_ratio="16:9")


@pytest.mark.skipif(
    not (os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")),
    reason="GEMINI_API_KEY or GOOGLE_API_KEY is not set",
)
def test_live_gemini_default_model_makes_one_image_and_prices_it() -> None:
    _one_image("gemini", aspect_ratio="4:5", seed=7)
