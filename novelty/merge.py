"""merge: join indexes built apart (`build-index --part K/N` on several machines, or
any indexes of one encoder) into one.

Each part is merged in one transaction: its shard files are copied first (temp name,
fsync, rename, like any shard), then the catalog rows that point into them are
committed together with a "merge" run. A merge killed at any moment leaves the target
index as it was before the part in flight (orphan shard files are removed the next
time it is opened for writing), and running the same command again merges what is
left: rows already in the target are not added twice.

Row by row, a part's image joins the target unless the target already holds its path
(or imported id). Then the embedded one of the two wins over a failed or pending one,
and labeled wins over unlabeled, as it does when one build-index run sees a path under
both splits; otherwise the target's row stays. Scores, selections and mark-labeled history stay in the parts: they refer
to the parts' own run ids.
"""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import vectors
from .errors import ConfigError, IndexBusyError, IndexMismatchError, InputError
from .store import Store, _describe, _encoder_key, create_store, open_store

_COLS = "path, ext_id, split, size, mtime, hash, status, reason, shard, row, added, labeled_at"


@dataclass
class PartSummary:
    path: str
    rows: int = 0  # images in the part
    added: int = 0  # new to the target
    present: int = 0  # already there, nothing to take
    replaced: int = 0  # the target's failed or pending row, now the part's embedded one
    moved: int = 0  # unlabeled in the target, labeled in the part
    shards: int = 0  # shard files copied
    part: str | None = None  # "K/N" when the part was built with --part


@dataclass
class MergeSummary:
    parts: list[PartSummary] = field(default_factory=list)
    labeled: int = 0  # embedded, in the merged index
    unlabeled: int = 0
    failed: int = 0
    missing_parts: list[str] = field(default_factory=list)  # "K/N" never merged into the target
    seconds: float = 0.0


def _built_parts(store: Store) -> set[tuple[int, int]]:
    """The --part values the index's build runs used."""
    out = set()
    for (params,) in store.db.execute("SELECT params FROM runs WHERE kind='build'"):
        part = json.loads(params).get("cfg", {}).get("part")
        if part:
            out.add((int(part[0]), int(part[1])))
    return out


def merge_indexes(root: Path, parts: Sequence[Path],
                  progress_factory: Callable[[int], Callable[[int], None]] | None = None) -> MergeSummary:
    """Merge `parts` into the index at `root` (created when missing); progress_factory(n
    parts) is called once the parts and the target are checked, its callable after each part."""
    t0 = time.monotonic()
    root = Path(root)
    if not parts:
        raise ConfigError("give at least one index to merge")
    seen: dict[Path, Path] = {}
    for p in parts:
        r = Path(p).resolve()
        if r == root.resolve():
            raise ConfigError(f"{p} is the target --index itself; merge other indexes into it")
        if r in seen:
            raise ConfigError(f"{p} is given twice (as {seen[r]})")
        seen[r] = Path(p)
    # every part is read and checked before the target is touched
    encoders = []
    for p in parts:
        with open_store(p) as st:
            m = st.manifest
            if not m.get("encoder") or not m.get("dim"):
                raise InputError(f"{p} holds no vectors yet (no encoder in its manifest); nothing was merged")
            encoders.append((m["encoder"], int(m["dim"])))
    enc0, dim0 = encoders[0]
    for p, (enc, dim) in zip(parts, encoders):
        if dim != dim0 or _encoder_key(enc) != _encoder_key(enc0):
            raise IndexMismatchError(f"{p} holds vectors from {_describe(enc, dim)}, {parts[0]} from "
                                     f"{_describe(enc0, dim0)}; indexes of different encoders cannot be merged")
    s = MergeSummary()
    fresh = not root.exists()
    try:
        with create_store(root) as out:
            out.check_encoder(enc0, dim0)
            progress = progress_factory(len(parts)) if progress_factory else None
            for p in parts:
                s.parts.append(_merge_part(out, Path(p)))
                if progress:
                    progress(1)
            if out.vectors_version and not vectors.is_current(out):
                vectors.build(out)
            s.labeled, s.unlabeled, s.failed = (out.db.execute(q).fetchone()[0] for q in (
                "SELECT COUNT(*) FROM images WHERE status='embedded' AND split='labeled'",
                "SELECT COUNT(*) FROM images WHERE status='embedded' AND split='unlabeled'",
                "SELECT COUNT(*) FROM images WHERE status='failed'"))
            # which K/N the target holds (its own build runs, and every part merged into it, now or before)
            held = _built_parts(out)
            for (params,) in out.db.execute("SELECT params FROM runs WHERE kind='merge'"):
                if part := json.loads(params).get("part"):
                    held.add(tuple(int(x) for x in part.split("/")))
            for n in sorted({n for _, n in held}):
                s.missing_parts += [f"{k}/{n}" for k in range(1, n + 1) if (k, n) not in held]
    except IndexBusyError:
        raise
    except BaseException:
        if fresh and not s.parts:  # refused or stopped before any part went in: leave nothing
            shutil.rmtree(root, ignore_errors=True)
        raise
    s.seconds = time.monotonic() - t0
    return s


def _merge_part(out: Store, part: Path) -> PartSummary:
    with open_store(part) as src:
        rows = src.db.execute(f"SELECT {_COLS} FROM images ORDER BY id").fetchall()
        shards = {name: (n, dim, created) for name, n, dim, created in src.db.execute("SELECT name, n, dim, created FROM shards")}
        built = sorted(_built_parts(src))
        ps = PartSummary(str(part.resolve()), len(rows), part=f"{built[0][0]}/{built[0][1]}" if len(built) == 1 else None)
        have: dict[tuple[str, str], tuple[int, str, str]] = {}  # (column, key) -> (id, status, split)
        for column in ("path", "ext_id"):
            keys = [r[0 if column == "path" else 1] for r in rows if r[0 if column == "path" else 1] is not None]
            for start in range(0, len(keys), 500):
                chunk = keys[start:start + 500]
                q = f"SELECT {column}, id, status, split FROM images WHERE {column} IN ({','.join('?' * len(chunk))})"
                have.update(((column, k), (i, st, sp)) for k, i, st, sp in out.db.execute(q, chunk))
        add, replace, move, need = [], [], [], set()
        for r in rows:
            path, ext_id, split, status, shard = r[0], r[1], r[2], r[6], r[8]
            old = have.get(("path", path) if path is not None else ("ext_id", ext_id))
            if old is None:
                add.append(r)
            elif old[1] != "embedded" and status == "embedded":
                replace.append((old[0], r))
            else:
                ps.present += 1
            if status == "embedded" and (old is None or old[1] != "embedded"):
                need.add(shard)
            if old is not None and split == "labeled" and old[2] == "unlabeled":
                move.append(old[0])
        ps.added, ps.replaced, ps.moved = len(add), len(replace), len(move)
        known = {name for (name,) in out.db.execute("SELECT name FROM shards")}
        copy = sorted(need - known)
        for name in copy:  # files first, then the rows that point into them
            out.write_shard_file(name, src.shard(name))
        ps.shards = len(copy)
    now = time.time()
    with out.transaction() as db:
        db.executemany("INSERT INTO shards(name, n, dim, created) VALUES (?,?,?,?)", ((n, *shards[n]) for n in copy))
        db.executemany(f"INSERT INTO images({_COLS}) VALUES ({','.join('?' * 12)})", add)
        db.executemany("UPDATE images SET status='embedded', reason=NULL, shard=?, row=?, hash=COALESCE(?, hash), "
                       "size=?, mtime=? WHERE id=?", ((r[8], r[9], r[5], r[3], r[4], i) for i, r in replace))
        db.executemany("UPDATE images SET split='labeled', labeled_at=COALESCE(labeled_at, ?) WHERE id=?", ((now, i) for i in move))
        if need:
            out._bump_version()
        summary = {k: getattr(ps, k) for k in ("path", "part", "rows", "added", "present", "replaced", "moved", "shards")}
        db.execute("INSERT INTO runs(kind, params, summary, started, finished) VALUES ('merge',?,?,?,?)",
                   (json.dumps({"from": ps.path, "part": ps.part}), json.dumps(summary), now, time.time()))
    return ps
