"""Presets: named styles that wrap a prompt and supply default params.

Built-ins live as data in `imagen/data/presets.toml`; a user's TOML file in the
same format adds presets or replaces built-ins by name. Applying a preset only
rewrites text and proposes defaults: it never overrides a param or negative
prompt the caller gave, and it never talks to a backend.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from imagen.backends.sizes import parse_aspect, parse_size
from imagen.errors import BadPresetsFile, InvalidRequest, UnknownName

PARAM_KEYS = ("aspect_ratio", "backend", "model", "seed", "size")
_TEXT_KEYS = ("description", "prefix", "suffix", "negative_prompt")
_PRESET_KEYS = (*_TEXT_KEYS, "params")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_BUILTIN_SOURCE = "built-in presets (imagen/data/presets.toml)"


@dataclass(frozen=True)
class Preset:
    """A named style: text around the prompt, a negative prompt and default params."""

    name: str
    description: str = ""
    prefix: str = ""
    suffix: str = ""
    negative_prompt: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AppliedPreset:
    """The outcome of applying a preset (or none) to a prompt.

    `defaults` are the preset's params; the caller merges them under its own
    explicit params, which always win.
    """

    name: str | None
    prompt: str
    negative_prompt: str | None
    defaults: dict[str, Any]


def load_presets(user_file: Path | None = None) -> dict[str, Preset]:
    """The built-in presets, then those in `user_file` replacing or adding by name.

    A user preset with a built-in's name replaces it whole (no key-by-key merge),
    so what the file says is exactly what runs. Raises `BadPresetsFile` (an
    InvalidRequest, and a configuration error: exit 78) naming the file when it
    is missing, unreadable or malformed.
    """
    text = resources.files("imagen").joinpath("data", "presets.toml").read_text(encoding="utf-8")
    presets = _parse(text, _BUILTIN_SOURCE)
    if user_file is not None:
        try:
            presets.update(_parse(_read_user_file(user_file), f"presets file {user_file}"))
        except InvalidRequest as exc:
            raise BadPresetsFile(exc.message) from None
    return presets


def apply_preset(
    presets: Mapping[str, Preset], name: str | None, prompt: str, negative_prompt: str | None = None
) -> AppliedPreset:
    """Wrap `prompt` in the named preset; `name` None or blank applies none.

    The prompt sent is prefix, prompt and suffix joined with ", ", each trimmed
    and empty parts skipped. A blank `negative_prompt` counts as not given, so a
    form's empty field does not erase the preset's.
    """
    if not prompt.strip():
        from imagen.params import BLANK_PROMPT

        raise InvalidRequest(BLANK_PROMPT)
    explicit_negative = _clean(negative_prompt)
    if name is None or not name.strip():
        return AppliedPreset(None, prompt.strip(), explicit_negative, {})
    key = name.strip()
    preset = presets.get(key)
    if preset is None:
        known = ", ".join(sorted(presets)) or "(none)"
        raise UnknownName(f"unknown preset {key!r}; known presets: {known}")
    parts = (preset.prefix.strip(" \t\r\n,"), prompt.strip(), preset.suffix.strip(" \t\r\n,"))
    return AppliedPreset(
        name=preset.name,
        prompt=", ".join(part for part in parts if part),
        negative_prompt=explicit_negative or _clean(preset.negative_prompt),
        defaults=dict(preset.params),
    )


def _clean(text: str | None) -> str | None:
    if text is None or not text.strip():
        return None
    return text.strip()


def _read_user_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidRequest(f"presets file {path} does not exist") from None
    except UnicodeDecodeError:
        raise InvalidRequest(f"presets file {path}: not UTF-8 text") from None
    except OSError as exc:
        raise InvalidRequest(f"presets file {path}: cannot read it: {exc.strerror or exc}") from None


def _parse(text: str, source: str) -> dict[str, Preset]:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequest(f"{source}: invalid TOML: {exc}") from None
    unknown = sorted(set(document) - {"presets"})
    if unknown:
        raise InvalidRequest(
            f"{source}: unknown top-level key {unknown[0]!r} (expected [presets.<name>] tables)"
        )
    tables = document.get("presets", {})
    if not isinstance(tables, dict):
        raise InvalidRequest(f"{source}: 'presets' must be a table of [presets.<name>] tables")
    return {name: _preset(name, table, source) for name, table in tables.items()}


def _preset(name: str, table: Any, source: str) -> Preset:
    where = f"{source}: preset {name!r}"
    if not _NAME.match(name):
        raise InvalidRequest(f"{where}: a name is letters, digits, '-' and '_' (at most 64)")
    if not isinstance(table, dict):
        raise InvalidRequest(f"{where}: must be a table, not {_type(table)}")
    unknown = sorted(set(table) - set(_PRESET_KEYS))
    if unknown:
        raise InvalidRequest(
            f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_PRESET_KEYS))})"
        )
    for key in _TEXT_KEYS:
        if key in table and not isinstance(table[key], str):
            raise InvalidRequest(f"{where}: {key!r} must be a string, not {_type(table[key])}")
    return Preset(
        name=name,
        description=table.get("description", "").strip(),
        prefix=table.get("prefix", "").strip(),
        suffix=table.get("suffix", "").strip(),
        negative_prompt=_clean(table.get("negative_prompt")),
        params=MappingProxyType(_params(table.get("params", {}), where)),
    )


def _params(params: Any, where: str) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise InvalidRequest(f"{where}: 'params' must be a table, not {_type(params)}")
    unknown = sorted(set(params) - set(PARAM_KEYS))
    if unknown:
        raise InvalidRequest(f"{where}: unknown param {unknown[0]!r} (allowed: {', '.join(PARAM_KEYS)})")
    if "size" in params and "aspect_ratio" in params:
        raise InvalidRequest(f"{where}: set size or aspect_ratio, not both")
    for key, value in params.items():
        expected = int if key == "seed" else str
        # bool is an int in Python; a seed of `true` is a typo, not a seed.
        if not isinstance(value, expected) or isinstance(value, bool):
            raise InvalidRequest(f"{where}: param {key!r} must be {_KIND[expected]}, not {_type(value)}")
        if isinstance(value, str) and not value.strip():
            raise InvalidRequest(f"{where}: param {key!r} must not be blank")
    try:
        if "size" in params:
            parse_size(params["size"])
        if "aspect_ratio" in params:
            parse_aspect(params["aspect_ratio"])
    except InvalidRequest as exc:
        raise InvalidRequest(f"{where}: {exc.message}") from None
    return dict(params)


_KIND: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    dict: "a table",
    list: "an array",
}


def _type(value: Any) -> str:
    return _KIND.get(type(value), f"a {type(value).__name__}")
