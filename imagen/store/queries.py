"""Every SQL statement on imagen.* by name, from the package's .sql files (procrastinate's `queries.sql`).

A statement starts at a `-- name: <name>` line; the `--` lines right after it say
why it is written that way, and it runs to the next `-- name:` line. Every `*.sql`
file of imagen/store is read (queries.sql, jobs.sql, operator.sql: one file per concern),
and a name may be defined once across them. Loaded once, at import; a name that is
missing is a KeyError at import of its user, not at run time.
Statements keep psycopg's `%(name)s` parameters (and `%%` for a literal percent sign).
"""

from __future__ import annotations

import re
from importlib import resources

_NAME = re.compile(r"^-- name: ([a-z_]+)\s*$", re.MULTILINE)


def parse_queries(text: str) -> dict[str, str]:
    """{name: statement} from the text of a queries file; each statement without its comment lines."""
    parts = _NAME.split(text)
    found: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in found:
            raise ValueError(f"query {name!r} is defined twice")
        lines = body.strip().splitlines()
        while lines and lines[0].startswith("--"):
            lines.pop(0)
        while lines and (not lines[-1].strip() or lines[-1].startswith("--")):
            lines.pop()
        found[name] = "\n".join(lines).strip().removesuffix(";").rstrip() + "\n"
    return found


def load_queries(package: str) -> dict[str, str]:
    """{name: statement} from every `*.sql` file of `package`, in file name order; a name defined twice
    (in one file or across two) is a ValueError."""
    found: dict[str, str] = {}
    for entry in sorted(resources.files(package).iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        for name, statement in parse_queries(entry.read_text()).items():
            if name in found:
                raise ValueError(f"query {name!r} is defined twice ({entry.name})")
            found[name] = statement
    return found


QUERIES = load_queries("imagen.store")
