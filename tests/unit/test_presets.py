"""Presets: built-ins as data, a user's file on top, and how a preset wraps a prompt."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagen.errors import InvalidRequest
from imagen.presets import PARAM_KEYS, AppliedPreset, Preset, apply_preset, load_presets

BUILT_INS = {"photo", "cinematic", "watercolor", "pixel-art", "line-art", "product"}


def write_user_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "presets.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_built_in_presets_load_each_with_description_text_and_negative() -> None:
    presets = load_presets()

    assert set(presets) >= BUILT_INS
    for name, preset in presets.items():
        assert preset.name == name
        assert preset.description, name
        assert preset.prefix or preset.suffix, name
        assert preset.negative_prompt, name
        assert set(preset.params) <= set(PARAM_KEYS), name


def test_cinematic_defaults_to_a_wide_aspect_ratio() -> None:
    assert load_presets()["cinematic"].params == {"aspect_ratio": "16:9"}


def test_built_in_params_cannot_be_mutated_through_a_loaded_preset() -> None:
    preset = load_presets()["cinematic"]

    with pytest.raises(TypeError):
        preset.params["aspect_ratio"] = "1:1"  # type: ignore[index]


def test_apply_joins_prefix_prompt_and_suffix_and_uses_preset_negative() -> None:
    presets = {
        "s": Preset("s", prefix="  oil painting ", suffix=" thick impasto ", negative_prompt="blurry"),
    }

    applied = apply_preset(presets, "s", "  a lighthouse at dusk  ")

    assert applied == AppliedPreset(
        name="s",
        prompt="oil painting, a lighthouse at dusk, thick impasto",
        negative_prompt="blurry",
        defaults={},
    )


def test_apply_skips_empty_prefix_or_suffix_and_stray_commas() -> None:
    presets = {
        "only-suffix": Preset("only-suffix", suffix="in the rain"),
        "commas": Preset("commas", prefix="sketch,", suffix=", grainy"),
    }

    assert apply_preset(presets, "only-suffix", "a fox").prompt == "a fox, in the rain"
    assert apply_preset(presets, "commas", "a fox").prompt == "sketch, a fox, grainy"


def test_explicit_negative_prompt_wins_over_the_presets() -> None:
    presets = {"s": Preset("s", negative_prompt="blurry")}

    assert apply_preset(presets, "s", "a fox", negative_prompt="people").negative_prompt == "people"


def test_blank_explicit_negative_prompt_keeps_the_presets() -> None:
    presets = {"s": Preset("s", negative_prompt="blurry")}

    assert apply_preset(presets, "s", "a fox", negative_prompt="   ").negative_prompt == "blurry"


def test_negative_prompt_is_none_when_neither_gives_one() -> None:
    assert apply_preset({"s": Preset("s")}, "s", "a fox").negative_prompt is None


def test_apply_returns_preset_params_as_a_fresh_defaults_dict() -> None:
    presets = load_presets()

    applied = apply_preset(presets, "cinematic", "a heist")
    applied.defaults["aspect_ratio"] = "1:1"

    assert apply_preset(presets, "cinematic", "a heist").defaults == {"aspect_ratio": "16:9"}


@pytest.mark.parametrize("name", [None, "", "  "])
def test_no_preset_passes_prompt_and_negative_through_trimmed(name: str | None) -> None:
    applied = apply_preset(load_presets(), name, "  a fox ", negative_prompt=" people ")

    assert applied == AppliedPreset(name=None, prompt="a fox", negative_prompt="people", defaults={})


def test_blank_prompt_is_refused_even_with_a_preset() -> None:
    with pytest.raises(InvalidRequest, match="prompt must not be blank"):
        apply_preset(load_presets(), "photo", "   ")


def test_unknown_preset_error_lists_known_presets_sorted() -> None:
    presets = {"b": Preset("b"), "a": Preset("a"), "c": Preset("c")}

    with pytest.raises(InvalidRequest) as info:
        apply_preset(presets, "x", "a fox")

    assert str(info.value) == "unknown preset 'x'; known presets: a, b, c"


def test_user_file_adds_a_preset_and_replaces_a_built_in(tmp_path: Path) -> None:
    user_file = write_user_file(
        tmp_path,
        """
[presets.mystyle]
description = "Mine"
prefix = "tintype"
suffix = "scratched plate"
negative_prompt = "colour"
[presets.mystyle.params]
aspect_ratio = "3:2"
seed = 7

[presets.cinematic]
description = "Square cinema"
prefix = "noir still"
""",
    )

    presets = load_presets(user_file)

    assert presets["mystyle"] == Preset(
        name="mystyle",
        description="Mine",
        prefix="tintype",
        suffix="scratched plate",
        negative_prompt="colour",
        params={"aspect_ratio": "3:2", "seed": 7},
    )
    # A user preset replaces the built-in whole: nothing of the old one leaks through.
    assert presets["cinematic"] == Preset(name="cinematic", description="Square cinema", prefix="noir still")
    assert BUILT_INS - {"cinematic"} <= set(presets)
    applied = apply_preset(presets, "mystyle", "a sailor")
    assert applied.prompt == "tintype, a sailor, scratched plate"
    assert applied.defaults == {"aspect_ratio": "3:2", "seed": 7}


def test_empty_user_file_leaves_the_built_ins(tmp_path: Path) -> None:
    assert set(load_presets(write_user_file(tmp_path, ""))) == set(load_presets())


def test_missing_user_file_error_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"

    with pytest.raises(InvalidRequest, match="does not exist") as info:
        load_presets(missing)

    assert str(missing) in str(info.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[presets.a\nprefix = 'x'", "invalid TOML"),
        ("[presets.a]\nprefx = 'x'", "unknown key 'prefx'"),
        ("[presets.a]\nprefix = 3", "'prefix' must be a string, not an integer"),
        ("[presets.a]\nnegative_prompt = ['x']", "'negative_prompt' must be a string, not an array"),
        ("[presets.a.params]\nsteps = 30", "unknown param 'steps'"),
        ("[presets.a.params]\nseed = '7'", "param 'seed' must be an integer, not a string"),
        ("[presets.a.params]\nseed = true", "param 'seed' must be an integer, not a boolean"),
        ("[presets.a.params]\nsize = 'big'", "size must look like 1024x768"),
        ("[presets.a.params]\naspect_ratio = '16-9'", "aspect_ratio must look like 16:9"),
        ("[presets.a.params]\nsize = '512x512'\naspect_ratio = '1:1'", "not both"),
        ("[presets.a]\nparams = 'x'", "'params' must be a table"),
        ("presets = 3", "'presets' must be a table"),
        ("[presets]\na = 'x'", "preset 'a': must be a table, not a string"),
        ("[styles.a]\nprefix = 'x'", "unknown top-level key 'styles'"),
        ('[presets."a/b"]\nprefix = "x"', "a name is letters, digits"),
    ],
)
def test_malformed_user_file_error_names_the_file_and_the_problem(
    tmp_path: Path, text: str, problem: str
) -> None:
    user_file = write_user_file(tmp_path, text)

    with pytest.raises(InvalidRequest) as info:
        load_presets(user_file)

    message = str(info.value)
    assert message.startswith(f"presets file {user_file}: ")
    assert problem in message
    assert "\n" not in message


def test_user_file_that_is_not_utf8_is_refused_with_its_name(tmp_path: Path) -> None:
    user_file = tmp_path / "presets.toml"
    user_file.write_bytes(b"[presets.a]\nprefix = '\xff'\n")

    with pytest.raises(InvalidRequest, match="not UTF-8") as info:
        load_presets(user_file)

    assert str(user_file) in str(info.value)
