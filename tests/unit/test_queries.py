"""imagen/store/queries.sql: statements loaded by name, and the usage INSERT in step with UsageRecord."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest

from imagen.store.postgres_stages import usage_params
from imagen.store.queries import QUERIES, parse_queries
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


def test_the_chained_end_writes_the_same_usage_row_as_the_sink() -> None:
    chained = QUERIES["record_usage_and_complete"]
    record = UsageRecord(backend="mock", model="m", images=1, ok=True, latency_ms=1.0)

    assert columns(chained) == columns(QUERIES["insert_usage"])
    assert {p for p in re.findall(r"%\((\w+)\)s", chained) if p.startswith("u_")} == set(
        usage_params(record, "u_")
    )
    assert chained.endswith(QUERIES["record_and_complete"].split("WITH fence AS", 1)[1])
