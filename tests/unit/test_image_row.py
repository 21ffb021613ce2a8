"""The images row has one description, `ImageRow`, and one INSERT (queries.sql's `image_insert` fragment)
that every statement writing one uses; a generation's `ImageMeta` crosses the hand-off whole."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from uuid import uuid4

import pytest

from imagen.store.queries import QUERIES, load_blocks, sources
from imagen.store.rows import ImageMeta, ImageRow

WRITERS = [name for name, statement in QUERIES.items() if "INSERT INTO imagen.images" in statement]
# An INSERT on the table however it is spelled, outside comment lines.
IMAGES_INSERT = re.compile(r"^(?!\s*--).*\binsert\s+into\s+imagen\.images\b", re.IGNORECASE | re.MULTILINE)


def test_every_statement_writing_an_images_row_is_one_we_know() -> None:
    assert sorted(WRITERS) == ["insert_image", "record_and_complete", "record_job_image"]


def test_the_images_column_list_is_spelled_once_in_the_sql_and_every_writer_uses_it() -> None:
    written = {file: len(IMAGES_INSERT.findall(text)) for file, text in sources("imagen.store").items()}
    assert sum(written.values()) == 1, written
    blocks = load_blocks("imagen.store")
    assert blocks["image_insert"][0] == "fragment" and IMAGES_INSERT.search(blocks["image_insert"][1])
    for name in WRITERS:
        text = blocks[name][1]
        assert "{image_insert}" in text and not IMAGES_INSERT.search(text), name


@pytest.mark.parametrize("name", WRITERS)
def test_an_images_insert_names_the_owner_and_exactly_the_columns_of_image_row(name: str) -> None:
    statement = QUERIES[name]
    match = re.search(r"INSERT INTO imagen\.images \(([^)]*)\)", statement)
    assert match, statement
    columns = [c.strip() for c in match.group(1).split(",")]
    assert columns == ["owner_user_id", *(f.name for f in fields(ImageRow))]
    params = set(re.findall(r"%\((\w+)\)s", statement))
    assert {f.name for f in fields(ImageRow)} - {"job_id"} <= params


def test_the_hand_off_meta_survives_json_and_ignores_keys_it_does_not_know() -> None:
    meta = ImageMeta(
        mime="image/webp", width=640, height=480, backend="openai", model="gpt-image-1", prompt="a cat",
        params={"size": "640x480", "seed": 3}, preset="photo",
    )  # fmt: skip
    data = json.loads(json.dumps({**meta.to_json(), "from_a_newer_worker": 1}))

    assert ImageMeta.from_json(data) == meta
    row = ImageRow.of(job_id := uuid4(), "imagen", "p.webp", 1234, meta)
    assert row.values() == {
        "job_id": job_id, "bucket": "imagen", "path": "p.webp", "mime": "image/webp", "width": 640,
        "height": 480, "bytes": 1234, "prompt": "a cat", "backend": "openai", "model": "gpt-image-1",
        "params": {"size": "640x480", "seed": 3},
    }  # fmt: skip
