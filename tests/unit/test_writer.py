"""The local writer: readable unique names, deterministic job names, sidecars, safe slugs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imagen.backends.base import GeneratedImage
from imagen.errors import PermanentError, StorageError
from imagen.writer import WrittenImage, slugify, write_images

CREATED_AT = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
JOB_ID = "3f2b6c1e-8a4d-4c2e-9b1a-0d5e6f7a8b9c"


def png(width: int = 24, height: int = 16, colour: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "PNG")
    return buf.getvalue()


def image(
    *, seed: int | None = 42, index: int = 0, colour: str = "red", width: int = 24, height: int = 16
) -> GeneratedImage:
    return GeneratedImage(
        data=png(width, height, colour), mime="image/png", width=width, height=height, seed=seed, index=index
    )


def write(out_dir: Path, images: list[GeneratedImage], **overrides: Any) -> list[WrittenImage]:
    kwargs: dict[str, Any] = {
        "prompt": "A Red Fox, in the snow!",
        "preset": None,
        "params": {"seed": 42},
        "backend": "mock",
        "model": "mock-1",
        "usage": None,
        "created_at": CREATED_AT,
    }
    kwargs.update(overrides)
    return write_images(out_dir, images, **kwargs)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_name_is_timestamp_slug_seed_and_index(tmp_path: Path) -> None:
    written = write(tmp_path, [image(seed=42, index=0), image(seed=42, index=1, colour="blue")])

    assert [w.path.name for w in written] == [
        "20240506-070809-a-red-fox-in-the-snow-s42-0.png",
        "20240506-070809-a-red-fox-in-the-snow-s42-1.png",
    ]
    assert [w.sidecar.name for w in written] == [
        "20240506-070809-a-red-fox-in-the-snow-s42-0.json",
        "20240506-070809-a-red-fox-in-the-snow-s42-1.json",
    ]


def test_name_timestamp_is_utc_whatever_the_given_zone(tmp_path: Path) -> None:
    in_paris = CREATED_AT.astimezone(timezone(timedelta(hours=2)))

    (written,) = write(tmp_path, [image()], created_at=in_paris)

    assert written.path.name.startswith("20240506-070809-")
    assert json.loads(written.sidecar.read_text())["created_at"] == "2024-05-06T07:08:09+00:00"


def test_name_hint_replaces_the_prompt_as_slug_source(tmp_path: Path) -> None:
    (written,) = write(tmp_path, [image()], prompt="cinematic film still, a heist", name_hint="a heist")

    assert written.path.name == "20240506-070809-a-heist-s42-0.png"


def test_name_leaves_out_seed_when_none_is_known(tmp_path: Path) -> None:
    (written,) = write(tmp_path, [image(seed=None)], params={})

    assert written.path.name == "20240506-070809-a-red-fox-in-the-snow-0.png"


def test_name_takes_seed_from_params_when_image_has_none(tmp_path: Path) -> None:
    (written,) = write(tmp_path, [image(seed=None)], params={"seed": 9})

    assert written.path.name == "20240506-070809-a-red-fox-in-the-snow-s9-0.png"


def test_jpeg_and_webp_get_their_extensions(tmp_path: Path) -> None:
    jpeg = GeneratedImage(data=b"jpeg", mime="image/jpeg", width=1, height=1, seed=1)
    webp = GeneratedImage(data=b"webp", mime="image/webp", width=1, height=1, seed=1, index=1)

    written = write(tmp_path, [jpeg, webp])

    assert [w.path.suffix for w in written] == [".jpg", ".webp"]


def test_unsupported_mime_is_a_permanent_error(tmp_path: Path) -> None:
    gif = GeneratedImage(data=b"GIF89a", mime="image/gif", width=1, height=1)

    with pytest.raises(PermanentError, match="image/gif"):
        write(tmp_path, [gif])


def test_name_collision_yields_suffix_2_and_keeps_the_first_file(tmp_path: Path) -> None:
    (first,) = write(tmp_path, [image(colour="red")])
    (second,) = write(tmp_path, [image(colour="blue")])
    (third,) = write(tmp_path, [image(colour="green")])

    assert second.path.name == "20240506-070809-a-red-fox-in-the-snow-s42-0-2.png"
    assert second.sidecar.name == "20240506-070809-a-red-fox-in-the-snow-s42-0-2.json"
    assert third.path.name == "20240506-070809-a-red-fox-in-the-snow-s42-0-3.png"
    assert first.path.read_bytes() == png(colour="red")
    assert second.path.read_bytes() == png(colour="blue")
    assert json.loads(first.sidecar.read_text())["file"] == first.path.name


def test_image_of_another_type_never_takes_over_an_existing_sidecar(tmp_path: Path) -> None:
    (first,) = write(tmp_path, [image()])
    jpeg = GeneratedImage(data=b"jpeg", mime="image/jpeg", width=1, height=1, seed=42)

    (second,) = write(tmp_path, [jpeg])

    assert second.path.name == "20240506-070809-a-red-fox-in-the-snow-s42-0-2.jpg"
    assert json.loads(first.sidecar.read_text())["mime"] == "image/png"


def test_concurrent_writers_of_the_same_name_get_distinct_files(tmp_path: Path) -> None:
    results: list[Path] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        (written,) = write(tmp_path, [image(colour=("red", "blue", "green", "white")[n % 4])])
        with lock:
            results.append(written.path)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(set(results)) == 16
    assert len([name for name in files_in(tmp_path) if name.endswith(".png")]) == 16
    assert len([name for name in files_in(tmp_path) if name.endswith(".json")]) == 16


def test_job_id_naming_overwrites_so_two_writes_leave_one_image(tmp_path: Path) -> None:
    write(tmp_path, [image(colour="red")], job_id=JOB_ID)
    (again,) = write(tmp_path, [image(colour="blue")], job_id=JOB_ID)

    assert files_in(tmp_path) == [f"{JOB_ID}.json", f"{JOB_ID}.png"]
    assert again.path == tmp_path / f"{JOB_ID}.png"
    assert again.path.read_bytes() == png(colour="blue")
    assert json.loads(again.sidecar.read_text())["sha256"] == hashlib.sha256(png(colour="blue")).hexdigest()


def test_job_id_naming_numbers_further_images(tmp_path: Path) -> None:
    written = write(tmp_path, [image(index=0), image(index=1)], job_id=JOB_ID)

    assert [w.path.name for w in written] == [f"{JOB_ID}.png", f"{JOB_ID}-1.png"]


def test_job_id_that_is_not_a_plain_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="job_id"):
        write(tmp_path / "out", [image()], job_id="../escape")

    assert not (tmp_path / "escape.png").exists()


def test_written_files_keep_the_usual_permissions_not_temp_file_ones(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)

    (named,) = write(tmp_path / "a", [image()])
    (job,) = write(tmp_path / "b", [image()], job_id=JOB_ID)

    for path in (named.path, named.sidecar, job.path, job.sidecar):
        assert path.stat().st_mode & 0o777 == 0o644 & ~umask, path


def test_no_temporary_files_are_left_behind(tmp_path: Path) -> None:
    write(tmp_path, [image()], job_id=JOB_ID)
    write(tmp_path, [image()])

    assert not [name for name in files_in(tmp_path) if name.startswith(".") or name.endswith(".tmp")]


def test_failed_sidecar_write_is_a_storage_error_and_leaves_no_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)

    with pytest.raises(StorageError, match="No space left on device"):
        write(tmp_path, [image()])

    assert files_in(tmp_path) == []


def test_out_dir_is_created_with_parents(tmp_path: Path) -> None:
    out_dir = tmp_path / "a" / "b"

    (written,) = write(out_dir, [image()])

    assert written.path.parent == out_dir


def test_sidecar_holds_every_field_about_the_image(tmp_path: Path) -> None:
    img = image(seed=42, index=0)
    usage = {"images": 1, "latency_ms": 12.5, "cost_usd": None}

    (written,) = write(
        tmp_path,
        [img],
        prompt="cinematic film still, a fox",
        preset="cinematic",
        params={"aspect_ratio": "16:9", "seed": 42},
        usage=usage,
        job_id=JOB_ID,
    )

    assert json.loads(written.sidecar.read_text(encoding="utf-8")) == {
        "prompt": "cinematic film still, a fox",
        "preset": "cinematic",
        "params": {"aspect_ratio": "16:9", "seed": 42},
        "backend": "mock",
        "model": "mock-1",
        "seed": 42,
        "index": 0,
        "width": 24,
        "height": 16,
        "mime": "image/png",
        "bytes": len(img.data),
        "sha256": hashlib.sha256(img.data).hexdigest(),
        "usage": usage,
        "created_at": "2024-05-06T07:08:09+00:00",
        "job_id": JOB_ID,
        "file": f"{JOB_ID}.png",
    }
    assert written.sidecar.read_text(encoding="utf-8").startswith("{\n  ")


def test_sidecar_keeps_a_unicode_prompt_readable(tmp_path: Path) -> None:
    (written,) = write(tmp_path, [image()], prompt="un café à Paris")

    assert "un café à Paris" in written.sidecar.read_text(encoding="utf-8")


def test_written_png_opens_with_the_right_size(tmp_path: Path) -> None:
    (written,) = write(tmp_path, [image(width=40, height=30)])

    with Image.open(written.path) as opened:
        opened.verify()
    with Image.open(written.path) as opened:
        assert opened.format == "PNG"
        assert opened.size == (40, 30)


def test_path_traversal_in_prompt_stays_inside_out_dir(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"

    (written,) = write(out_dir, [image()], prompt="../../etc/passwd")

    assert written.path.parent == out_dir
    assert written.path.name == "20240506-070809-etc-passwd-s42-0.png"
    assert files_in(tmp_path) == ["out"]


@pytest.mark.parametrize(
    ("text", "slug"),
    [
        ("../../etc/passwd", "etc-passwd"),
        ("..", "image"),
        ("a\\b/c", "a-b-c"),
        ("Café Crème à l'œil", "cafe-creme-a-l-il"),
        ("日本語のプロンプト", "image"),
        ("", "image"),
        ("  --Hello,   World!!--  ", "hello-world"),
        ("emoji 🦊 fox", "emoji-fox"),
    ],
)
def test_slug_is_safe_lowercase_ascii(text: str, slug: str) -> None:
    assert slugify(text) == slug


@pytest.mark.parametrize(
    "text", ["../../etc/passwd", "/abs/path", "a/../b", "..\\..\\win", "x" * 500, "💥" * 10, "\x00nul"]
)
def test_slug_never_holds_separators_dots_or_too_many_chars(text: str) -> None:
    slug = slugify(text)

    assert slug
    assert "/" not in slug and "\\" not in slug and "." not in slug
    assert len(slug) <= 40
    assert slug == slug.strip("-")
    assert "--" not in slug


def test_slug_is_cut_at_a_word_boundary_when_long() -> None:
    text = "the quick brown fox jumps over the lazy dog and keeps running"

    assert slugify(text, max_len=40) == "the-quick-brown-fox-jumps-over-the-lazy"
    assert slugify("abcdefghij" * 10, max_len=12) == "abcdefghijab"
