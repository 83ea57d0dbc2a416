"""import-embeddings: vectors computed elsewhere (e.g. the detector's own backbone)
enter the index under their own ids, or under the paths of their images (`paths=True`),
so that `uncertainty`, `report` and `mark-labeled` by path work on them as on
`build-index`'s images. Rows are checked (finite, non-zero) and L2-normalised block by
block; the import is all or nothing."""
from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import IndexBusyError, InputError, NoveltyError
from .sources import list_path, record
from .store import create_store

log = logging.getLogger(__name__)

BLOCK = 65536  # rows per shard


def read_ids(path: Path) -> list[str]:
    try:
        ids = [line.strip() for line in Path(path).read_text(encoding="utf-8-sig").splitlines()]
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
    except (ValueError, OSError, EOFError) as e:  # EOFError: an empty file
        raise InputError(f"{path} is not a .npy array: {e or 'the file is empty'}") from None
    if not isinstance(X, np.ndarray):  # an .npz archive
        X.close()
        raise InputError(f"{path} is an .npz archive, not a .npy array: save one array with np.save")
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


@dataclass
class Imported:
    n: int
    missing: list[str] = field(default_factory=list)  # paths=True: paths that are not a regular file now


def image_paths(keys: list[str], source: Path, split: str) -> tuple[list[str], list[tuple[int, float] | None], list[str]]:
    """Lines of an ids file read as image paths, the way build-index reads a list file
    (sources.list_path, sources.record). Returns the absolute paths, each file's (size,
    mtime) or None, and the paths that are not a regular file now (gone, unreadable, a
    folder). A NUL byte, two lines naming one file, or a list in which no file exists
    (written for another folder) are refused."""
    base = Path(source).parent
    for n, k in enumerate(keys, 1):
        if "\0" in k:
            raise InputError(f"path {n} in {source} holds a NUL byte")
    paths = [list_path(base, k) for k in keys]
    seen: dict[str, str] = {}
    for k, p in zip(keys, paths):
        if p in seen:
            raise InputError(f"{seen[p]!r} and {k!r} in {source} are the same file {p}")
        seen[p] = k
    recs = [record(p, split) for p in paths]
    stats = [None if r.reason else (r.size, r.mtime) for r in recs]
    missing = [r.path for r in recs if r.reason]
    if missing and len(missing) == len(paths):
        raise InputError(f"none of the {len(paths)} paths in {source} is a file, e.g. {paths[0]}; "
                         f"relative paths are read against the list's folder {base}")
    return paths, stats, missing


def import_embeddings(root: Path, vectors_file: Path, ids_file: Path, split: str, model: str = "imported",
                      paths: bool = False) -> Imported:
    X = load_vectors(vectors_file)
    ids = read_ids(ids_file)
    if len(ids) != len(X):
        raise InputError(f"{ids_file} has {len(ids)} ids but {vectors_file} has {len(X)} rows")
    if not ids:
        raise InputError(f"{vectors_file} holds no vectors")
    files, missing, given = None, [], ids
    if paths:
        ids, files, missing = image_paths(ids, ids_file, split)
    fresh = not Path(root).exists()
    try:
        with create_store(root) as store:
            store.check_encoder({"kind": "imported", "model": model, "pretrained": None}, int(X.shape[1]))
            # one image, one row: a path may not also be an imported id (as given or absolute), nor the reverse
            other = store.existing_keys("ext_id", sorted(set(given) | set(ids))) if paths else store.existing_keys("path", ids)
            if other:
                raise InputError(f"{len(other)} of these are already in the index as {'imported ids' if paths else 'image paths'}, "
                                 f"e.g. {other[0]!r}; nothing was imported")
            # all or nothing, with its history line: a refused import leaves neither
            run = store.add_imported(ids, normalised_blocks(X), split, files, run_params={
                "vectors": str(Path(vectors_file).resolve()), "ids": str(Path(ids_file).resolve()),
                "split": split, "model": model, "paths": paths})
            from . import vectors

            vectors.build(store)
            store.finish_run(run, {"imported": len(ids), "missing_files": len(missing)})
    except IndexBusyError:
        raise  # another writer's index, whether it existed a moment ago or not: never ours to remove
    except NoveltyError:
        if fresh:  # a refused first import leaves no index behind (its dim would bind the next import)
            shutil.rmtree(root, ignore_errors=True)
        raise
    return Imported(len(ids), missing)
