"""Named SQL queries, loaded once from ``sql/*.sql``.

A file holds one or more queries, each introduced by a header line ``-- name --``.
Python asks for queries by name and never builds SQL from input.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

SQL_DIR = Path(__file__).parent / "sql"
_HEADER = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


@functools.cache
def all_queries() -> dict[str, str]:
    queries: dict[str, str] = {}
    for path in sorted(SQL_DIR.glob("*.sql")):
        text = path.read_text()
        heads = list(_HEADER.finditer(text))
        for i, head in enumerate(heads):
            end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
            name = head.group(1)
            if name in queries:
                raise RuntimeError(f"query {name!r} defined twice ({path.name})")
            queries[name] = text[head.start():end].strip()
    return queries


def query(name: str) -> str:
    return all_queries()[name]
