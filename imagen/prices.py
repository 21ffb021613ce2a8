"""The price table (data in `imagen/data/prices.toml`) and a cost estimate for one usage record.

Prices change monthly, so they are data with a source, a date and the source's
quality, never constants in code; the raw usage is stored beside the estimate
so a ledger can be re-priced later. An unknown model gives no estimate (None)
rather than a guess, and says so in the estimate's basis, which the usage row
keeps (cost_basis) so an unpriced call is visible, not a silent null. Nothing
here ever calls a provider.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from functools import cache
from importlib import resources
from typing import Any

from imagen.backends.base import Usage
from imagen.errors import ConfigError

RATE_FIELDS = ("text_in", "image_in", "text_out", "image_out", "per_image")
SOURCE_QUALITIES = ("vendor", "secondary")
_ENTRY_FIELDS = frozenset({*RATE_FIELDS, "source", "as_of", "aliases", "quality"})
_SOURCE = "imagen/data/prices.toml"
PER_MILLION = 1_000_000


@dataclass(frozen=True)
class Price:
    """One model's published rates: USD per million tokens, or USD per image."""

    model: str
    source: str
    as_of: date
    quality: str = "secondary"
    text_in: float | None = None
    image_in: float | None = None
    text_out: float | None = None
    image_out: float | None = None
    per_image: float | None = None
    aliases: tuple[str, ...] = ()

    @property
    def has_token_rates(self) -> bool:
        return any(r is not None for r in (self.text_in, self.image_in, self.text_out, self.image_out))


def _parse_entry(model: str, entry: Any) -> Price:
    where = f"{_SOURCE}: models.{model!r}"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(entry) - _ENTRY_FIELDS)
    if unknown:
        raise ConfigError(f"{where} has unknown keys {unknown}; known: {sorted(_ENTRY_FIELDS)}")
    source, as_of = entry.get("source"), entry.get("as_of")
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"{where} needs a source (where the price was read)")
    if not isinstance(as_of, date):
        raise ConfigError(f"{where} needs as_of as a TOML date (when the price was read)")
    rates: dict[str, float] = {}
    for name in RATE_FIELDS:
        value = entry.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{where}: {name} must be a non-negative number, not {value!r}")
        rates[name] = float(value)
    if not rates:
        raise ConfigError(f"{where} has no rate (one of {', '.join(RATE_FIELDS)})")
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise ConfigError(f"{where}: aliases must be a list of model ids")
    quality = entry.get("quality")
    if quality not in SOURCE_QUALITIES:
        raise ConfigError(f"{where} needs quality, one of {', '.join(SOURCE_QUALITIES)}, not {quality!r}")
    return Price(model=model, source=source, as_of=as_of, quality=quality, aliases=tuple(aliases), **rates)


def parse_prices(document: Mapping[str, Any]) -> dict[str, Price]:
    """A parsed prices TOML document -> {model id or alias: Price}."""
    models = document.get("models")
    if not isinstance(models, Mapping):
        raise ConfigError(f"{_SOURCE} needs a [models] table")
    table: dict[str, Price] = {}
    for model, entry in models.items():
        price = _parse_entry(model, entry)
        for key in (model, *price.aliases):
            if key in table:
                raise ConfigError(f"{_SOURCE}: model {key!r} is priced twice")
            table[key] = price
    return table


@cache
def load_prices() -> dict[str, Price]:
    """The packaged price table, read once."""
    text = resources.files("imagen").joinpath("data", "prices.toml").read_text(encoding="utf-8")
    try:
        return parse_prices(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{_SOURCE} is not valid TOML: {exc}") from None


def price_for(model: str) -> Price | None:
    """The price entry for a model id or one of its aliases ('models/' prefix ignored)."""
    key = model.strip().removeprefix("models/")
    return load_prices().get(key)


def _image_input_tokens(raw: Mapping[str, Any]) -> int:
    """Image-input tokens from OpenAI usage blocks (`input_tokens_details.image_tokens`) in raw['calls']."""
    total = 0
    for call in raw.get("calls") or []:
        details = call.get("input_tokens_details") if isinstance(call, Mapping) else None
        if isinstance(details, Mapping):
            total += int(details.get("image_tokens") or 0)
    return total


@dataclass(frozen=True)
class CostEstimate:
    """USD for one usage record (None when unknown) and how it was reached, or why it could not be."""

    usd: float | None
    basis: str


def price_usage(usage: Usage) -> CostEstimate:
    """Price one usage record.

    Input tokens are priced at text_in, except image-input tokens the provider
    itemised (OpenAI) at image_in; image output tokens at image_out; the remaining
    output tokens plus thought tokens at text_out (Google bills thinking as text
    output). A missing rate prices its component at 0, and the basis says so.
    per_image is added per returned image. The mock backend costs 0. Images with
    no image-output tokens to price are unknown (None), never a near-zero guess.
    """
    if usage.backend == "mock":
        return CostEstimate(0.0, "mock backend: free")
    price = price_for(usage.model)
    if price is None:
        return CostEstimate(None, f"unpriced: no price for model {usage.model!r} in {_SOURCE}")
    basis = f"{_SOURCE} {price.model} as of {price.as_of.isoformat()} ({price.quality} source)"
    cost = (price.per_image or 0.0) * usage.images
    counts = (usage.input_tokens, usage.output_tokens, usage.image_output_tokens, usage.thought_tokens)
    if not price.has_token_rates:
        return CostEstimate(cost, basis)
    if all(c is None for c in counts):
        # No token report: nothing was consumed (a refused call) or we cannot tell what was.
        if price.per_image is not None or usage.images == 0:
            return CostEstimate(cost, basis)
        return CostEstimate(
            None, f"unpriced: {price.model} reported no token usage for {usage.images} image(s)"
        )
    image_out_tokens = usage.image_output_tokens or 0
    if usage.images and not image_out_tokens and price.image_out and price.per_image is None:
        return CostEstimate(
            None, f"unpriced: {price.model} reported no image-output tokens for {usage.images} image(s)"
        )
    input_tokens = usage.input_tokens or 0
    image_in_tokens = min(input_tokens, _image_input_tokens(usage.raw))
    text_out_tokens = max(0, (usage.output_tokens or 0) - image_out_tokens) + (usage.thought_tokens or 0)
    text_in = price.text_in or 0.0
    image_in = price.image_in if price.image_in is not None else text_in
    tokens_cost = (
        (input_tokens - image_in_tokens) * text_in
        + image_in_tokens * image_in
        + image_out_tokens * (price.image_out or 0.0)
        + text_out_tokens * (price.text_out or 0.0)
    )
    if text_out_tokens and price.text_out is None:
        basis += f"; {text_out_tokens} text-output tokens have no published rate and count as $0"
    return CostEstimate(cost + tokens_cost / PER_MILLION, basis)


def estimate_cost(usage: Usage) -> float | None:
    """USD for one usage record, or None when the model has no price or the usage says too little."""
    return price_usage(usage).usd
