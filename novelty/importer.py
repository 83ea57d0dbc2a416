"""import-embeddings: vectors computed elsewhere (e.g. the detector's own backbone)
enter the index under their own ids. Rows are checked (finite, non-zero) and
L2-normalised block by block; the import is all or nothing."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import InputError
from .store import create_store

log = logging.getLogger(__name__)

BLOCK = 65536  # rows per shard


def read_ids(path: Path) -> list[str]:
    try:
        ids = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a UTF-8 text file of ids") from None
    ids = [i for i in ids if i]
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise InputError(f"id {i!r} appears twice in {path}")
        seen.add(i)
    return ids


def load_vectors(path: Path) -> np.ndarray:
    try:
        X = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise InputError(f"{path} is not a .npy array: {e}") from None
    if X.ndim != 2 or not np.issubdtype(X.dtype, np.floating):
        raise InputError(f"{path} must hold a float array [n, d], got {X.dtype} {X.shape}")
    return X


def normalised_blocks(X: np.ndarray, block: int = BLOCK) -> Iterator[np.ndarray]:
    """Unit-norm float32 blocks; InputError on a row with NaN/inf or zero norm."""
    for s in range(0, len(X), block):
        B = np.asarray(X[s:s + block], dtype=np.float32)  # [b, d]
        bad = ~np.isfinite(B).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad) + s
            raise InputError(f"{len(rows)}+ row(s) hold NaN or inf, first at row {rows[0]}; nothing was imported")
        norms = np.linalg.norm(B, axis=1, keepdims=True)
        if (norms == 0).any():
            raise InputError(f"row {int(np.flatnonzero(norms[:, 0] == 0)[0]) + s} is all zeros; nothing was imported")
        yield B / norms


def import_embeddings(root: Path, vectors_file: Path, ids_file: Path, split: str, model: str = "imported") -> int:
    X = load_vectors(vectors_file)
    ids = read_ids(ids_file)
    if len(ids) != len(X):
        raise InputError(f"{ids_file} has {len(ids)} ids but {vectors_file} has {len(X)} rows")
    if not ids:
        raise InputError(f"{vectors_file} holds no vectors")
    with create_store(root) as store:
        store.check_encoder({"kind": "imported", "model": model, "pretrained": None}, int(X.shape[1]))
        run = store.start_run("import", {"vectors": str(vectors_file), "ids": str(ids_file), "split": split, "model": model})
        n = store.add_imported(ids, normalised_blocks(X), split)
        from . import vectors

        vectors.build(store)
        store.finish_run(run, {"imported": n})
    return n
