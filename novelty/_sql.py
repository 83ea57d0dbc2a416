"""SQLite helpers for the catalog."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

IN_CHUNK = 500  # keys per `IN (...)` list: well under SQLite's bound on host parameters


def in_chunks(keys: Sequence, size: int = IN_CHUNK) -> Iterator[tuple[list, str]]:
    """`keys` in lists of at most `size`, each with its placeholders '?,?,...' for an
    `IN (...)` clause."""
    for s in range(0, len(keys), size):
        chunk = list(keys[s:s + size])
        yield chunk, ",".join("?" * len(chunk))
