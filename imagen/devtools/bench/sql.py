"""The benchmark's statements by name, from bench.sql, loaded as the runtime's are (imagen.store.queries)."""

from __future__ import annotations

from imagen.store.queries import load_queries

QUERIES = load_queries("imagen.devtools.bench")
