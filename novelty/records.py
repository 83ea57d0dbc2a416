"""What runs leave in the catalog besides vectors: uncertainty scores and selection
picks. Each write is one transaction."""
from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .store import Store, open_store

log = logging.getLogger(__name__)


@dataclass
class UncertaintyScores:
    run: int
    ids: np.ndarray  # [k] catalog ids that have a score
    values: np.ndarray  # [k] float64 >= 0
    params: dict


def save_uncertainty(store: Store, params: dict, ids, values, failures=()) -> int:
    """Store one run of scores (and per-image failures) atomically. -> run id."""
    now = time.time()
    with store.transaction() as db:
        run = db.execute("INSERT INTO runs(kind, params, started, finished, summary) VALUES ('uncertainty', ?, ?, ?, ?)",
                         (json.dumps(params, sort_keys=True), now, now,
                          json.dumps({"scored": len(ids), "failed": len(failures)}))).lastrowid
        db.executemany("INSERT INTO uncertainty(run, image, value) VALUES (?,?,?)",
                       ((run, int(i), float(v)) for i, v in zip(ids, values)))
        db.executemany("INSERT INTO uncertainty(run, image, value, reason) VALUES (?,?,NULL,?)",
                       ((run, int(i), reason) for i, reason in failures))
    return run


def latest_uncertainty(store: Store) -> UncertaintyScores | None:
    """The scores of the uncertainty run that finished last and scored at least one image
    (a run whose every image failed is passed over), or None. Last to finish, not to
    start: a detector run resumed after an import-uncertainty is the newer scoring."""
    row = store.db.execute("SELECT id, params FROM runs r WHERE kind='uncertainty' AND finished IS NOT NULL AND EXISTS "
                           "(SELECT 1 FROM uncertainty u WHERE u.run = r.id AND u.value IS NOT NULL) "
                           "ORDER BY finished DESC, id DESC LIMIT 1").fetchone()
    if row is None:
        return None
    rows = store.db.execute("SELECT image, value FROM uncertainty WHERE run=? AND value IS NOT NULL ORDER BY image",
                            (row[0],)).fetchall()
    ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
    vals = np.fromiter((r[1] for r in rows), np.float64, len(rows))
    return UncertaintyScores(row[0], ids, vals, json.loads(row[1]))


def read_uncertainty_csv(store: Store, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse id,uncertainty; every id must exist, every value be finite and >= 0."""
    keys, vals = [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"id", "uncertainty"} <= set(reader.fieldnames):
                raise InputError(f"{path} must have the columns id,uncertainty (got {reader.fieldnames})")
            for line, rec in enumerate(reader, start=2):
                if None in rec:  # more fields than the header: an id with a comma, unquoted, or columns shifted
                    raise InputError(f"{path}:{line}: {len(reader.fieldnames) + len(rec[None])} fields, the header has "
                                     f"{len(reader.fieldnames)}; quote an id that holds a comma")
                if rec["uncertainty"] is None:
                    raise InputError(f"{path}:{line}: {len(rec) - sum(v is None for v in rec.values())} field(s), the "
                                     f"header has {len(reader.fieldnames)}: no uncertainty")
                try:
                    text = rec["uncertainty"]
                    if "_" in text or not text.isascii():  # float() reads 1_000 and full-width digits; no CSV writer means them
                        raise ValueError
                    v = float(text)
                except ValueError:
                    raise InputError(f"{path}:{line}: uncertainty {rec['uncertainty']!r} is not a number") from None
                if not math.isfinite(v) or v < 0:
                    raise InputError(f"{path}:{line}: uncertainty must be finite and >= 0, got {v}")
                keys.append(rec["id"])
                vals.append(v)
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a UTF-8 CSV file") from None
    if not keys:
        raise InputError(f"{path} holds no scores")
    ids, unknown = store.resolve(keys)
    if unknown:
        raise InputError(f"{len(unknown)} id(s) in {path} are not in the index, e.g. {unknown[0]!r}; nothing was imported")
    if len(set(ids.tolist())) != len(ids):
        raise InputError(f"{path} scores some image twice")
    ids, moved = store.follow_moves(ids, said="images scored")  # a file written before images were renamed
    if moved and len(set(ids.tolist())) != len(ids):
        raise InputError(f"{path} scores some image twice: under two of its paths (one it moved from, or a link to it)")
    return ids, np.asarray(vals)


@dataclass
class PoolScores:
    ids: np.ndarray  # [k] the scores to store: those of unlabeled images
    values: np.ndarray  # [k]
    labeled: int  # scores of labeled images, dropped: select never ranks a labeled image
    not_embedded: int  # of those kept, scores of unlabeled images with no vector yet (pending or failed)
    excluded: int = 0  # of those kept, scores of images `exclude` keeps out of selection (used if included again)


def pool_scores(store: Store, path: Path, ids: np.ndarray, values: np.ndarray) -> PoolScores:
    """The scores of a file (read_uncertainty_csv) that select can use. A file that scores
    no unlabeled embedded image is refused: select would only warn that it covers no
    image of the pool, after `import-uncertainty` had said hybrid is now the default."""
    ids = np.asarray(ids, dtype=np.int64)
    labeled = np.isin(ids, np.fromiter((i for (i,) in store.db.execute("SELECT id FROM images WHERE split='labeled'")),
                                       np.int64))
    in_pool = np.isin(ids, store.pool_ids()[0])
    excluded = np.isin(ids, store.excluded_ids()) & ~labeled
    not_embedded = ~labeled & ~in_pool & ~excluded
    if not in_pool.any():
        why = (f"{int(labeled.sum())} labeled, {int(not_embedded.sum())} unlabeled but not embedded"
               + (f", {int(excluded.sum())} excluded" if excluded.any() else ""))
        raise InputError(f"none of the {len(ids)} id(s) in {path} is an image select may pick, unlabeled, embedded "
                         f"and not excluded ({why}); so nothing was imported")
    keep = ~labeled
    return PoolScores(ids[keep], np.asarray(values)[keep], int(labeled.sum()), int(not_embedded.sum()), int(excluded.sum()))


def save_selection(store: Store, params: dict, summary: dict, image_ids, priority, radius_trace=None) -> int:
    """Record a selection run and its picks (rank 1..N in pick order)."""
    now = time.time()
    radius_trace = [None] * len(image_ids) if radius_trace is None else [float(r) for r in radius_trace]
    with store.transaction() as db:
        run = db.execute("INSERT INTO runs(kind, params, summary, started, finished) VALUES ('select', ?, ?, ?, ?)",
                         (json.dumps(params, sort_keys=True), json.dumps(summary, default=float), now, now)).lastrowid
        db.executemany("INSERT INTO picks(run, rank, image, priority, radius) VALUES (?,?,?,?,?)",
                       ((run, r + 1, int(i), None if not np.isfinite(p) else float(p), rad)
                        for r, (i, p, rad) in enumerate(zip(image_ids, priority, radius_trace))))
    return run


def note_files_not_written(root: Path, run: int) -> None:
    """Mark a recorded select run whose output files could not be written (a full disk),
    so `info` does not show it as a selection someone has; best effort, since the disk
    that refused the files may refuse this too."""
    try:
        with open_store(root, writable=True) as store, store.transaction() as db:
            (summary,) = db.execute("SELECT summary FROM runs WHERE id=?", (run,)).fetchone()
            db.execute("UPDATE runs SET summary=? WHERE id=?", (json.dumps({**json.loads(summary or "{}"),
                                                                             "files_written": False}), run))
    except Exception:  # noqa: BLE001 - the error that stopped the write is the one to report
        log.debug("could not mark run %d as not written", run, exc_info=True)
