"""Splitting a SQL script into its statements, for the migrator (`imagen.db`).

A migration runs statement by statement so a failure can name its statement and
line. The split is at top-level semicolons only: never inside a string, a quoted
identifier, a comment or a dollar-quoted body (a function's).
"""

from __future__ import annotations

import re

_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*)?\$")


def split_statements(text: str) -> list[tuple[int, str]]:
    """Split a SQL script at top-level semicolons: (offset in `text`, statement) pairs.

    Understands quoted strings (including E'' escapes), quoted identifiers,
    dollar-quoted bodies and both comment styles; statements holding only
    comments are dropped. It does not understand `BEGIN ATOMIC` function bodies:
    write function bodies with $$ quotes.
    """
    statements: list[tuple[int, str]] = []
    start = 0
    code_start = -1
    i = 0
    n = len(text)

    def close(end: int) -> None:
        if code_start >= 0:
            statements.append((start, text[start:end]))

    while i < n:
        char = text[i]
        if char == "-" and text.startswith("--", i):
            newline = text.find("\n", i)
            i = n if newline < 0 else newline + 1
            continue
        if char == "/" and text.startswith("/*", i):
            i = _skip_block_comment(text, i)
            continue
        if char.isspace():
            i += 1
            continue
        if code_start < 0:
            code_start = i
        if char == ";":
            close(i)
            start, code_start = i + 1, -1
            i += 1
        elif char == "'":
            i = _skip_string(text, i)
        elif char == '"':
            i = _skip_quoted(text, i, '"')
        elif char == "$" and not (i and (text[i - 1].isalnum() or text[i - 1] in "_$")):
            tag = _DOLLAR_TAG.match(text, i)
            if tag:
                end = text.find(tag.group(), tag.end())
                i = n if end < 0 else end + len(tag.group())
            else:
                i += 1
        else:
            i += 1
    close(n)
    return statements


def _skip_block_comment(text: str, i: int) -> int:
    depth = 0
    while i < len(text):
        if text.startswith("/*", i):
            depth, i = depth + 1, i + 2
        elif text.startswith("*/", i):
            depth, i = depth - 1, i + 2
            if depth == 0:
                return i
        else:
            i += 1
    return i


def _skip_string(text: str, i: int) -> int:
    # E'...' strings allow backslash escapes; standard strings only double the quote.
    prefix = text[i - 1] if i else ""
    before = text[i - 2] if i > 1 else ""
    escapes = prefix in ("e", "E") and not (before.isalnum() or before == "_")
    i += 1
    while i < len(text):
        char = text[i]
        if escapes and char == "\\":
            i += 2
        elif char == "'":
            if text.startswith("''", i):
                i += 2
            else:
                return i + 1
        else:
            i += 1
    return i


def _skip_quoted(text: str, i: int, quote: str) -> int:
    i += 1
    while i < len(text):
        if text[i] == quote:
            if text.startswith(quote * 2, i):
                i += 2
                continue
            return i + 1
        i += 1
    return i
