"""How the store finds its statements and its classes (run here, not at import, so mutation testing sees them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import imagen.store
from imagen.store.memory import InMemoryJobStore
from imagen.store.queries import QUERIES, load_queries, parse_queries


def test_the_loaded_statements_are_every_sql_file_of_the_store_by_name() -> None:
    assert load_queries("imagen.store") == QUERIES
    assert {"begin_sync", "record_job_image", "record_and_complete"} <= set(QUERIES)


def package(tmp_path: Path, files: dict[str, str]) -> str:
    """A throwaway package holding `files`, importable by its name."""
    name = f"queries_{abs(hash(tuple(files)))}"
    folder = tmp_path / name
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    for file, text in files.items():
        (folder / file).write_text(text)
    return name


@pytest.fixture
def importable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_statements_are_read_from_every_sql_file_in_name_order_and_nothing_else(importable: Path) -> None:
    name = package(
        importable,
        {
            "b.sql": "-- name: two\nSELECT 2;\n",
            "a.sql": "-- name: one\nSELECT 1 ;  \n",
            "notes.txt": "-- name: x\n",
        },
    )

    assert list(load_queries(name).items()) == [("one", "SELECT 1\n"), ("two", "SELECT 2\n")]
    sys.modules.pop(name, None)


def test_a_name_defined_in_two_files_is_refused_naming_the_second(importable: Path) -> None:
    name = package(importable, {"a.sql": "-- name: one\nSELECT 1;\n", "b.sql": "-- name: one\nSELECT 2;\n"})

    with pytest.raises(ValueError, match=r"query 'one' is defined twice \(b.sql\)"):
        load_queries(name)
    sys.modules.pop(name, None)


def test_text_before_the_first_name_is_not_a_statement_and_indentation_is_kept() -> None:
    assert parse_queries("-- file header\nSELECT 0;\n-- name: one\n  SELECT 1\n  FROM x;\n") == {
        "one": "SELECT 1\n  FROM x\n"
    }


def test_the_package_names_its_classes_and_refuses_others() -> None:
    assert imagen.store.InMemoryJobStore is InMemoryJobStore
    with pytest.raises(AttributeError, match=r"module 'imagen\.store' has no attribute 'Nope'"):
        imagen.store.Nope  # noqa: B018
