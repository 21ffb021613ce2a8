"""The typed rows: an image's description survives the hand-off between stages as JSON."""

from __future__ import annotations

from imagen.store import ImageMeta

META = ImageMeta(
    mime="image/webp", width=16, height=8, backend="mock", model="mock-1", prompt="a fox",
    params={"seed": 3}, preset="square",
)  # fmt: skip


def test_an_image_description_comes_back_from_its_json_as_it_was() -> None:
    assert ImageMeta.from_json(META.to_json()) == META
    assert META.to_json()["preset"] == "square" and META.pixels == 128


def test_keys_a_newer_version_added_to_the_hand_off_are_ignored() -> None:
    assert ImageMeta.from_json({**META.to_json(), "dpi": 300}) == META
