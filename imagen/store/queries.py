"""Every SQL statement on imagen.* by name, from the package's .sql files (procrastinate's `queries.sql`).

A statement starts at a `-- name: <name>` line; the `--` lines right after it say
why it is written that way, and it runs to the next `-- name:` or `-- fragment:`
line. A `-- fragment: <name>` block is a piece that several statements share (the
images and usage rows' INSERT, so each table's column list is spelled once): a
statement names it as `{name}`, and the loader puts the fragment there, indented
as the placeholder is. Every `*.sql` file of imagen/store is read (queries.sql,
jobs.sql, operator.sql: one file per concern), and a name (statement or fragment)
may be defined once across them. A `{word}` that is not a fragment is left for the
statement's user to fill, and only a statement named `*_template` may have one
(jobs.py fills claim_jobs_template): anything else is a misspelled fragment.
Loaded once, at import; a name that is missing is a KeyError at import of its
user, not at run time. Statements keep psycopg's `%(name)s` parameters (and `%%`
for a literal percent sign).
"""

from __future__ import annotations

import re
from importlib import resources

_BLOCK = re.compile(r"^-- (name|fragment): ([a-z_]+)\s*$", re.MULTILINE)
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def _body(text: str) -> str:
    """A block's text without its leading comment lines, trailing comments or semicolon."""
    lines = text.strip().splitlines()
    while lines and lines[0].startswith("--"):
        lines.pop(0)
    while lines and (not lines[-1].strip() or lines[-1].startswith("--")):
        lines.pop()
    return "\n".join(lines).strip().removesuffix(";").rstrip()


def parse_blocks(text: str, found: dict[str, tuple[str, str]] | None = None) -> dict[str, tuple[str, str]]:
    """{name: (kind, text)} of a queries file's blocks, kind "name" or "fragment", as written (no
    fragment filled in), added to `found`; a name defined twice is a ValueError."""
    found = {} if found is None else found
    parts = _BLOCK.split(text)
    for kind, name, body in zip(parts[1::3], parts[2::3], parts[3::3], strict=True):
        if name in found:
            raise ValueError(f"query {name!r} is defined twice")
        found[name] = (kind, _body(body))
    return found


def fill(blocks: dict[str, tuple[str, str]]) -> dict[str, str]:
    """{name: statement} with every `{fragment}` put in; a `{word}` that names no fragment is a
    ValueError outside a `*_template` statement, and so is a fragment no statement uses."""
    fragments = {name: text for name, (kind, text) in blocks.items() if kind == "fragment"}
    used: set[str] = set()

    def put(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in fragments:
            return match.group(0)
        used.add(name)
        line = match.string[match.string.rfind("\n", 0, match.start()) + 1 : match.start()]
        indent = line if not line.strip() else ""
        return fragments[name].replace("\n", "\n" + indent)

    statements = {}
    for name, (kind, text) in blocks.items():
        if kind != "name":
            continue
        statement = _PLACEHOLDER.sub(put, text)
        left = _PLACEHOLDER.findall(statement)
        if left and not name.endswith("_template"):
            raise ValueError(f"query {name!r} names {{{left[0]}}}, which is no fragment")
        statements[name] = statement + "\n"
    if unused := sorted(set(fragments) - used):
        raise ValueError(f"fragment {unused[0]!r} is used by no statement")
    return statements


def parse_queries(text: str) -> dict[str, str]:
    """{name: statement} from the text of a queries file; each statement without its comment lines."""
    return fill(parse_blocks(text))


def sources(package: str) -> dict[str, str]:
    """{file name: text} of every `*.sql` file of `package`, in file name order."""
    entries = sorted(resources.files(package).iterdir(), key=lambda e: e.name)
    return {e.name: e.read_text() for e in entries if e.name.endswith(".sql")}


def load_blocks(package: str) -> dict[str, tuple[str, str]]:
    """Every block of `package`'s `*.sql` files as written; a name defined twice (in one file or
    across two) is a ValueError."""
    found: dict[str, tuple[str, str]] = {}
    for file, text in sources(package).items():
        try:
            parse_blocks(text, found)
        except ValueError as exc:
            raise ValueError(f"{exc} ({file})") from None
    return found


def load_queries(package: str) -> dict[str, str]:
    """{name: statement} from every `*.sql` file of `package`, fragments filled in."""
    return fill(load_blocks(package))


QUERIES = load_queries("imagen.store")
