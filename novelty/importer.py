"""import-embeddings: vectors computed elsewhere (e.g. the detector's own backbone)
enter the index under their own ids, or under the paths of their images (`paths=True`),
so that `uncertainty`, `report` and `mark-labeled` by path work on them as on
`build-index`'s images. Rows are checked (finite, non-zero) and L2-normalised block by
block; the import is all or nothing. Such an index cannot embed anything again, so a
missing or damaged shard loses its vectors (VECTOR_LOST) at the next import, and
`skip_existing` imports the same whole file again for just those (and any new rows)."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, NoveltyError
from .sources import list_entries, list_path, record
from .store import LOST_PREFIX, LostShards, Store, create_store

log = logging.getLogger(__name__)

BLOCK = 65536  # rows per shard


def read_ids(path: Path, paths: bool = False) -> list[str]:
    """One id a line, blank lines skipped, spaces around an id dropped; with `paths`, a
    line whose spaces belong to a file's name (one that exists as written, read against
    the list's folder) is kept as written, as build-index reads a list file."""
    base = Path(path).parent
    try:
        names = (lambda line: os.path.isfile(list_path(base, line))) if paths else (lambda line: False)
        ids = list(list_entries(Path(path).read_text(encoding="utf-8-sig").splitlines(), names, comments=False))
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
    """Unit-norm float32 blocks; InputError on a row with NaN/inf or zero norm. Each row
    is divided by its largest magnitude first, in float64, so the norm of a row of huge
    (3e38) or tiny (1e-30) values neither overflows to a row of zeros nor underflows to
    'all zeros'."""
    for s in range(0, len(X), block):
        B = np.asarray(X[s:s + block])
        bad = ~np.isfinite(B).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad) + s
            raise InputError(f"{len(rows)}{'+' if s + block < len(X) else ''} row(s) hold NaN or inf, first at row {rows[0]}; nothing was imported")
        B = B.astype(np.float64)  # [b, d]
        top = np.abs(B).max(axis=1, keepdims=True) if B.shape[1] else np.zeros((len(B), 1))
        if (top == 0).any():
            raise InputError(f"row {int(np.flatnonzero(top[:, 0] == 0)[0]) + s} is all zeros; nothing was imported")
        B /= top
        B /= np.linalg.norm(B, axis=1, keepdims=True)
        yield B.astype(np.float32)


def kept_blocks(blocks: Iterator[np.ndarray], keep: np.ndarray, block: int = BLOCK) -> Iterator[np.ndarray]:
    """The rows of `blocks` where `keep` ([n] bool, over all their rows) is True,
    regrouped into blocks of up to `block` rows (a shard each)."""
    parts: list[np.ndarray] = []
    held = start = 0
    for B in blocks:  # [b, d]
        B, start = B[keep[start:start + len(B)]], start + len(B)
        while len(B):
            part, B = B[:block - held], B[block - held:]
            parts.append(part)
            held += len(part)
            if held == block:
                yield np.concatenate(parts)
                parts, held = [], 0
    assert start == len(keep)
    if held:
        yield np.concatenate(parts)


@dataclass
class Imported:
    n: int
    missing: list[str] = field(default_factory=list)  # paths=True: paths that are not a regular file now
    skipped: int = 0  # skip_existing: keys already embedded in the index
    other_vector: int = 0  # of those, keys whose vector in the file is not the one indexed (kept as indexed)
    other_split: int = 0  # of those, keys indexed under the other split (kept there)
    lost: LostShards = field(default_factory=LostShards)  # missing or damaged shards found first


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


def skipped_keys(store: Store, column: str, keys: list[str], skip_existing: bool) -> set[str]:
    """Those of `keys` already embedded in the index, which `skip_existing` skips and an
    import without it refuses. A key held as lost (VECTOR_LOST) is imported again into its
    row; one held as pending, or failed for another reason (no import makes those), is
    neither skipped nor imported: the import is refused, saying why."""
    noun = "id" if column == "ext_id" else "path"
    held = store.find_keys(column, keys, ("status", "reason"))
    odd = [(k, st, why) for k, (st, why) in held.items() if st != "embedded" and not (why or "").startswith(LOST_PREFIX)]
    if odd:
        k, st, why = odd[0]
        raise InputError(f"{len(odd)} {noun}(s) are in the index but {st} ({why or 'no reason'}), e.g. {k!r}, "
                         f"so neither skipped nor imported again; nothing was imported")
    there = {k for k, (st, _) in held.items() if st == "embedded"}
    if there and not skip_existing:
        raise InputError(f"{len(there)} {noun}(s) already in the index, e.g. {min(there)!r}; nothing was imported "
                         f"(--skip-existing imports only the others)")
    return there


def skipped_differences(store: Store, column: str, keys: list[str], X: np.ndarray, skip: set[str], split: str,
                        block: int = 1 << 18) -> tuple[int, int]:
    """Of the skipped keys, how many the index holds with another vector than the file's
    row (beyond float16 rounding) or under another split: a regenerated dump whose
    changes --skip-existing would otherwise drop without a word. Block-wise."""
    pos = np.array([i for i, k in enumerate(keys) if k in skip], dtype=np.int64)
    held = store.find_keys(column, [keys[i] for i in pos], ("id", "split"))
    other_split = sum(held[keys[i]][1] != split for i in pos)
    other_vector = 0
    layout = store.embedded()  # read once, not once per block
    for s in range(0, len(pos), block):
        rows = pos[s:s + block]
        _, V = store.vectors(ids=np.array([held[keys[i]][0] for i in rows], dtype=np.int64), layout=layout)  # in the order asked
        F = np.asarray(X[rows], dtype=np.float32)
        F /= np.linalg.norm(F, axis=1, keepdims=True)
        other_vector += int((np.abs(V.astype(np.float32) - F).max(axis=1) > 2e-3).sum())
    return other_vector, int(other_split)


def import_embeddings(root: Path, vectors_file: Path, ids_file: Path, split: str, model: str = "imported",
                      paths: bool = False, skip_existing: bool = False) -> Imported:
    X = load_vectors(vectors_file)
    ids = read_ids(ids_file, paths)
    if len(ids) != len(X):
        raise InputError(f"{ids_file} has {len(ids)} ids but {vectors_file} has {len(X)} rows")
    if not ids:
        raise InputError(f"{vectors_file} holds no vectors")
    files, missing, given = None, [], ids
    if paths:
        ids, files, missing = image_paths(ids, ids_file, split)
    with create_store(root) as store:
        try:
            from . import vectors

            store.check_encoder({"kind": "imported", "model": model, "pretrained": None}, int(X.shape[1]))
            lost = store.repair_shards(reembed=False)  # committed whatever the import below comes to
            try:
                # one image, one row: a path may not also be an imported id (as given or absolute), nor the reverse
                other = store.existing_keys("ext_id", sorted(set(given) | set(ids))) if paths else store.existing_keys("path", ids)
                if other:
                    raise InputError(f"{len(other)} of these are already in the index as "
                                     f"{'imported ids' if paths else 'image paths'}, e.g. {other[0]!r}; nothing was imported")
                skip = skipped_keys(store, "path" if paths else "ext_id", ids, skip_existing)
                differ = skipped_differences(store, "path" if paths else "ext_id", ids, X, skip, split) if skip else (0, 0)
                keep = np.array([k not in skip for k in ids], dtype=bool)  # [n]
                keys = [k for k, kept in zip(ids, keep) if kept]
                if files is not None:
                    files = [st for st, kept in zip(files, keep) if kept]
                    missing = [m for m in missing if m not in skip]
                if keys:  # all or nothing, with its history line, finished: the import is done once its vectors are in
                    summary = {"imported": len(keys), "skipped": len(skip), "missing_files": len(missing)}
                    if lost.names:
                        summary.update(lost_shards=list(lost.names), vectors_lost=lost.lost)
                    run = store.add_imported(keys, kept_blocks(normalised_blocks(X), keep), split, files, run_params={
                        "vectors": str(Path(vectors_file).resolve()), "ids": str(Path(ids_file).resolve()),
                        "split": split, "model": model, "paths": paths, "skip_existing": skip_existing},
                        run_summary=summary)
            except NoveltyError:
                if lost.names:  # the repair stands: searches need not fall back to reading the shards
                    vectors.build(store)
                raise
        except BaseException:  # refused, stopped (Ctrl-C) or failed: a first import leaves no index behind
            store.discard_if_new()  # a first import leaves nothing (its dim would bind the next, its shards fill the disk)
            raise
        if keys or lost.names:  # stale until then: readers search the shards, the next writer rebuilds it
            try:
                vectors.build(store)
            except (KeyboardInterrupt, OSError) as e:
                if keys:
                    e.kept = (f"the {len(keys)} vectors are in (import run #{run}); the FAISS index is rebuilt by the "
                              f"next command that writes, and searches read the shards until then")
                raise
    return Imported(len(keys), missing, len(skip), other_vector=differ[0], other_split=differ[1], lost=lost)
