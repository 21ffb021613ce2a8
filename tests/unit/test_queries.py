"""imagen/store/queries.sql: statements loaded by name, fragments they share, and the usage INSERT in step
with UsageRecord."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest

from imagen.store.postgres_stages import usage_params
from imagen.store.queries import QUERIES, load_blocks, parse_queries, sources
from imagen.usage import UsageRecord


def columns(statement: str) -> list[str]:
    match = re.search(r"INSERT INTO imagen\.usage \(([^)]*)\)", statement)
    assert match, statement
    return [c.strip() for c in match.group(1).split(",")]


def test_a_statement_is_its_text_without_the_comment_lines_or_the_semicolon() -> None:
    text = "-- header\n\n-- name: one\n-- why it is so\nSELECT 1\nFROM x;\n\n-- section\n\n-- name: two\nSELECT 2;\n"

    assert parse_queries(text) == {"one": "SELECT 1\nFROM x\n", "two": "SELECT 2\n"}


def test_a_name_given_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="'one' is defined twice"):
        parse_queries("-- name: one\nSELECT 1;\n-- name: one\nSELECT 2;\n")


def test_the_usage_insert_has_one_column_and_parameter_per_usage_record_field() -> None:
    names = [f.name for f in fields(UsageRecord)]
    record = UsageRecord(backend="mock", model="m", images=1, ok=True, latency_ms=1.0)

    assert columns(QUERIES["insert_usage"]) == names
    assert set(re.findall(r"%\((\w+)\)s", QUERIES["insert_usage"])) == set(usage_params(record))


def test_a_fragment_is_put_where_a_statement_names_it_indented_as_the_name_is() -> None:
    text = (
        "-- name: one\nWITH x AS (\n    {cols}\n)\nSELECT 1;\n"
        "-- fragment: cols\n-- why\nSELECT a,\n       b\n"
        "-- name: two\nSELECT {cols} FROM y;\n"
    )

    assert parse_queries(text) == {
        "one": "WITH x AS (\n    SELECT a,\n           b\n)\nSELECT 1\n",
        "two": "SELECT SELECT a,\n       b FROM y\n",
    }


def test_a_name_in_braces_that_is_no_fragment_is_refused_outside_a_template() -> None:
    with pytest.raises(ValueError, match=r"'one' names \{colz\}, which is no fragment"):
        parse_queries("-- fragment: cols\na\n-- name: one\nSELECT {colz}, {cols};\n")
    assert parse_queries("-- name: one_template\nSELECT {n} FROM x WHERE y = '{}';\n") == {
        "one_template": "SELECT {n} FROM x WHERE y = '{}'\n"
    }


def test_a_fragment_no_statement_uses_or_one_named_like_a_statement_is_refused() -> None:
    with pytest.raises(ValueError, match="fragment 'cols' is used by no statement"):
        parse_queries("-- fragment: cols\na\n-- name: one\nSELECT 1;\n")
    with pytest.raises(ValueError, match="'one' is defined twice"):
        parse_queries("-- name: one\nSELECT {one};\n-- fragment: one\na\n")


def test_the_usage_column_list_is_spelled_once_and_both_usage_writers_use_it() -> None:
    insert = re.compile(r"^(?!\s*--).*\binsert\s+into\s+imagen\.usage\b", re.IGNORECASE | re.MULTILINE)
    written = {file: len(insert.findall(text)) for file, text in sources("imagen.store").items()}
    blocks = load_blocks("imagen.store")
    writers = sorted(name for name, statement in QUERIES.items() if "INSERT INTO imagen.usage" in statement)

    assert sum(written.values()) == 1, written
    assert blocks["usage_insert"][0] == "fragment" and insert.search(blocks["usage_insert"][1])
    assert writers == ["insert_usage", "record_and_complete"]
    assert all("{usage_insert}" in blocks[name][1] for name in writers)


def test_the_chained_end_is_one_statement_whose_usage_row_is_gated_on_its_call_id_not_the_fence() -> None:
    chained = QUERIES["record_and_complete"]
    record = UsageRecord(backend="mock", model="m", images=1, ok=True, latency_ms=1.0)
    written = re.search(
        r"WITH usage AS \((.*?)\n\),\njob AS \((.*?)\n\),\nimage AS \((.*?)\n\)\nUPDATE", chained, re.S
    )

    assert "record_usage_and_complete" not in QUERIES
    assert written, chained
    usage, job, image = (" ".join(part.split()) for part in written.groups())
    assert columns(chained) == columns(QUERIES["insert_usage"])
    assert {p for p in re.findall(r"%\((\w+)\)s", chained) if p.startswith("u_")} == set(usage_params(record))
    # No usage given: every u_ parameter NULL, and the WHERE inserts nothing (the fence is not in it).
    assert set(usage_params(None)) == set(usage_params(record))
    assert set(usage_params(None).values()) == {None}
    assert usage.endswith("WHERE %(u_call_id)s::uuid IS NOT NULL ON CONFLICT (call_id) DO NOTHING")
    assert "FROM" not in usage, "the usage row reads no other row: the fence cannot stop it"
    assert job.endswith("WHERE id = %(job_id)s AND attempt = %(attempt)s AND status = 'running' FOR UPDATE")
    assert image.endswith(
        "FROM job ON CONFLICT (job_id) DO UPDATE SET job_id = imagen.images.job_id"
        " WHERE imagen.images.owner_user_id = excluded.owner_user_id RETURNING id, job_id, owner_user_id"
    )
