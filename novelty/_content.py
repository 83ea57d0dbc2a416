"""What an image's bytes say about the rows before it, when build-index commits a shard.

The catalog keys an image by its path, but what a user did to it belongs to its content:
- **New bytes under an old path** (a file overwritten, a name reused by a new capture):
  its uncertainty scores were measured on a picture that is gone, so they are dropped,
  and `select` treats it as unscored. Being marked labeled or excluded is kept (a label
  may well still fit a re-encoded file), and the build names how many such images changed.
- **Old bytes under a new path** (a file or folder renamed or moved): the row of the old
  path, whose file is gone, leaves the pool as moved, and what was done to it moves with
  its bytes: marked labeled, excluded, and its uncertainty scores. Without this a renamed
  skipped image would be picked again, and a renamed folder would double the pool with
  rows whose files are gone.
Bytes are compared by the blake2b hash the reader takes; a row keeps the hash of the
content it last held, also once gone or queued again, until new bytes are read.
Everything here runs inside commit_shard's transaction.
"""
from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field

from ._sql import in_chunks

GONE = "not found: deleted from its folder since it was indexed"
NOT_FOUND = "not found"  # a path a scan met but could not stat: a list's line, or a symlink whose target went
MOVED = "moved: its bytes are now at {}"
MOVED_PREFIX = MOVED.split("{}")[0]
LINKED = "linked: the same file is indexed at {}"  # one file reached through two paths (Store.sync_sources)
LINKED_PREFIX = LINKED.split("{}")[0]


@dataclass
class ContentChanges:
    """Counts over a build, with one example path for each kind of change."""

    changed: int = 0  # images re-read whose bytes differ from those they were scored on: their scores dropped
    scores_dropped: int = 0  # those scores (all runs)
    changed_marked: int = 0  # images re-read with new bytes that mark-labeled had marked: kept labeled
    changed_excluded: int = 0  # images re-read with new bytes that were excluded: kept excluded
    moved: int = 0  # old rows whose bytes turned up at a new path: out of the pool
    moved_marked: int = 0  # new paths that took mark-labeled's word from their old row
    moved_excluded: int = 0  # new paths that took an exclusion from their old row
    moved_scores: int = 0  # uncertainty scores carried to new paths
    examples: dict = field(default_factory=dict)  # kind -> a path

    def add(self, other: ContentChanges) -> None:
        for k, v in vars(other).items():
            if k == "examples":
                for kind, path in v.items():
                    self.examples.setdefault(kind, path)
            else:
                setattr(self, k, getattr(self, k) + v)


def _rows(db: sqlite3.Connection, where: str, keys: Sequence, hashed_only: bool = False) -> list[tuple]:
    """(id, path, split, hash, status, reason, labeled_at, labeled_by, excluded) of rows
    whose `where` column is in `keys` (and that hold a hash, with `hashed_only`), 500 at a time."""
    out: list[tuple] = []
    for chunk, marks in in_chunks(keys):
        out += db.execute(
            "SELECT i.id, i.path, i.split, i.hash, i.status, i.reason, i.labeled_at, i.labeled_by, x.image IS NOT NULL "
            f"FROM images i LEFT JOIN excluded x ON x.image = i.id WHERE i.{where} IN ({marks})"
            + (" AND i.hash IS NOT NULL" if hashed_only else ""), chunk).fetchall()
    return out


def before_commit(db: sqlite3.Connection, new_hash: dict[int, str]) -> ContentChanges:
    """Rows about to take the bytes just read (`new_hash`: id -> their hash): drop the
    scores of those whose bytes changed."""
    c = ContentChanges()
    changed = [r for r in _rows(db, "id", list(new_hash), hashed_only=True) if new_hash[r[0]] != r[3]]
    if not changed:
        return c
    ids = [r[0] for r in changed]
    scored: set[int] = set()
    for chunk, marks in in_chunks(ids):
        scored.update(i for (i,) in db.execute(f"SELECT DISTINCT image FROM uncertainty WHERE image IN ({marks})", chunk))
        c.scores_dropped += db.execute(f"DELETE FROM uncertainty WHERE image IN ({marks})", chunk).rowcount
    c.changed = len(scored)
    marked = [r for r in changed if r[2] == "labeled" and r[6] is not None]
    excluded = [r for r in changed if r[8]]
    c.changed_marked, c.changed_excluded = len(marked), len(excluded)
    for kind, some in (("changed", [r for r in changed if r[0] in scored]), ("changed_marked", marked),
                       ("changed_excluded", excluded)):
        if some:
            c.examples[kind] = some[0][1]
    return c


def after_commit(db: sqlite3.Connection, new_hash: dict[int, str]) -> ContentChanges:
    """Rows just embedded with these hashes (id -> hash) whose bytes an older row held at
    a path that is gone now: that row leaves the pool as moved, and its marks and scores
    come along."""
    c = ContentChanges()
    hashes = sorted(set(new_hash.values()))
    shared = []  # held by more than one row: almost never, so only those rows are read whole
    for chunk, marks in in_chunks(hashes):
        shared += [h for (h,) in db.execute(f"SELECT hash FROM images WHERE hash IN ({marks}) "
                                            "GROUP BY hash HAVING COUNT(*) > 1", chunk)]
    new: dict[int, tuple] = {}
    by_hash: dict[str, list[tuple]] = {}
    for r in _rows(db, "hash", shared):
        if r[0] in new_hash:
            new[r[0]] = r
        elif r[1] is not None:
            by_hash.setdefault(r[3], []).append(r)
    done: set[int] = set()  # old rows recorded as moved by this call (the same bytes may turn up at two paths)
    for n in new.values():
        # an unlabeled row, or one mark-labeled moved; a --labeled source's image stays a center wherever it went
        olds = [o for o in by_hash.get(n[3], ()) if (o[2] == "unlabeled" or o[6] is not None)
                and ((o[4] == "failed" and (o[5] in (GONE, NOT_FOUND) or (o[5] or "").startswith(MOVED_PREFIX)))
                     or (o[4] == "embedded" and not os.path.exists(o[1])))]
        if olds:
            _carry(db, n, olds, c, done)
    return c


def carry_from_gone(db: sqlite3.Connection) -> ContentChanges:
    """For merge, where a part records a deletion or a move but the marks live in the
    merged index: rows whose file is gone (or moved) that still hold a mark, an
    exclusion or scores hand them to a newer row holding the same bytes, if one is
    there; the others keep them until such a row comes in. A labeled center whose file
    a part found gone is such a row too, and stays a center until then."""
    c = ContentChanges()
    held = db.execute(  # also a center mark-labeled moved whose file a part found gone (size -1): it stays a center
        "SELECT i.id FROM images i WHERE i.hash IS NOT NULL AND ((i.status = 'failed' AND (i.reason = ? OR i.reason LIKE ?) "
        "AND (i.labeled_at IS NOT NULL OR EXISTS (SELECT 1 FROM excluded x WHERE x.image = i.id) "
        "OR EXISTS (SELECT 1 FROM uncertainty u WHERE u.image = i.id))) "
        "OR (i.status = 'embedded' AND i.size = -1 AND i.labeled_at IS NOT NULL))", (GONE, MOVED_PREFIX + "%")).fetchall()
    if not held:
        return c
    olds = _rows(db, "id", [i for (i,) in held])
    hashes = sorted({o[3] for o in olds})
    added: dict[int, float] = {}
    for chunk, marks in in_chunks(hashes):
        added.update(db.execute(f"SELECT id, added FROM images WHERE hash IN ({marks})", chunk))
    by_hash: dict[str, list[tuple]] = {}
    for r in _rows(db, "hash", hashes):
        if r[4] == "embedded" and r[1] is not None:
            by_hash.setdefault(r[3], []).append(r)
    done: set[int] = set()
    held_ids = {o[0] for o in olds}
    for o in olds:
        # the bytes' new place: the row of them added last, not a copy that was there all along
        cands = [n for n in by_hash.get(o[3], ()) if n[0] not in held_ids and added[n[0]] >= added[o[0]]]
        if cands:
            _carry(db, max(cands, key=lambda n: (added[n[0]], n[0])), [o], c, done)
    return c


def carry_to(db: sqlite3.Connection, linked: dict[str, str]) -> ContentChanges:
    """Paths a scan found to be the same file as another ({path: the path kept}): what
    was done to the image under the path dropped goes to the one kept, as for a move."""
    c = ContentChanges()
    if not linked:
        return c
    rows = {r[1]: r for r in _rows(db, "path", sorted(set(linked) | set(linked.values())))}
    done: set[int] = set()
    for path, to in linked.items():
        if path in rows and to in rows:
            _carry(db, rows[to], [rows[path]], c, done)
    return c


def _carry(db: sqlite3.Connection, n: tuple, olds: list[tuple], c: ContentChanges, done: set[int]) -> None:
    """Row `n` holds the bytes the `olds` held at paths that are gone: record those as
    moved there, and move (not copy: an undo at the new path must not come back with the
    old) their exclusion, mark-labeled's mark and scores to `n`, when `n` is unlabeled."""
    i, ids = n[0], [o[0] for o in olds]
    marks = ",".join("?" * len(ids))
    for o in olds:
        if o[0] not in done and (o[4] == "embedded" or o[5] in (GONE, NOT_FOUND)):
            db.execute("UPDATE images SET status='failed', reason=?, size=-1, mtime=NULL, shard=NULL, row=NULL "
                       "WHERE id=?", (MOVED.format(n[1]), o[0]))  # as record_gone: a file that comes back is read again
            done.add(o[0])
            c.moved += 1
            c.examples.setdefault("moved", n[1])
    if n[2] != "unlabeled":  # labeled where it went (a --labeled folder): nothing to carry, and nothing stays behind
        db.execute(f"DELETE FROM excluded WHERE image IN ({marks})", ids)
        db.execute(f"UPDATE images SET split='unlabeled', labeled_at=NULL, labeled_by=NULL "
                   f"WHERE labeled_at IS NOT NULL AND id IN ({marks})", ids)
        return
    if not n[8] and any(o[8] for o in olds):
        db.execute(f"INSERT OR IGNORE INTO excluded(image, reason, run, at) SELECT ?, reason, run, at FROM excluded "
                   f"WHERE image IN ({marks}) ORDER BY at DESC LIMIT 1", (i, *ids))
        c.moved_excluded += 1
        c.examples.setdefault("moved_excluded", n[1])
    db.execute(f"DELETE FROM excluded WHERE image IN ({marks})", ids)
    marked = [o for o in olds if o[6] is not None]
    if n[6] is None and marked:
        db.execute("UPDATE images SET split='labeled', labeled_at=?, labeled_by=? WHERE id=?", (marked[0][6], marked[0][7], i))
        c.moved_marked += 1
        c.examples.setdefault("moved_marked", n[1])
    if marked:
        db.execute(f"UPDATE images SET split='unlabeled', labeled_at=NULL, labeled_by=NULL WHERE id IN ({marks})", ids)
    carried = db.execute(f"INSERT OR IGNORE INTO uncertainty(run, image, value, reason) "
                         f"SELECT run, ?, value, reason FROM uncertainty WHERE image IN ({marks})", (i, *ids)).rowcount
    if carried:
        c.moved_scores += carried
        c.examples.setdefault("moved_scores", n[1])
    db.execute(f"DELETE FROM uncertainty WHERE image IN ({marks})", ids)
