"""merge: join indexes built apart (`build-index --part K/N` on several machines, or
any indexes of one encoder) into one.

Each part is merged in one transaction: its shard files are copied first (temp name,
fsync, rename, like any shard), then the catalog rows that point into them are
committed together with a "merge" run. A merge killed at any moment leaves the target
index as it was before the part in flight (orphan shard files are removed the next
time it is opened for writing), and running the same command again merges what is
left: rows already in the target are not added twice.

Row by row, a part's image joins the target unless the target already holds its path
(or imported id). Then the embedded one of the two wins over a failed one; of two
embedded copies of a file, the one seen with the newer mtime (a part rebuilt after the
file changed); labeled wins over unlabeled, as it does when one build-index run sees a
path under both splits; an unlabeled image the part's scan found deleted from its folder
is failed in the target too (it leaves the pool, as in one build); otherwise the
target's row stays. Pending rows (a part whose
build-index did not finish) are left out and named: finish that build and merge again.
A part's shards are checked against its catalog before anything is copied.

The images `novelty exclude` named in a part are excluded in the target too (a union:
an exclusion already in the target keeps its reason; one undone in a part since is not
undone in the target, run exclude --undo there).

With its rows, the target records a fingerprint of the part's catalog (meta key
`merged:<absolute path of the part>`, so a part moved since counts as new): its images,
shards, runs and exclusions. A target that lost vectors with a shard (found and recorded
first, as import-embeddings does) takes every part again. A part
whose fingerprint has not changed since is taken no further, so re-running the same
command (to resume, or to add parts) never undoes what was done in the target since
(mark-labeled --undo, exclude --undo, a failed row). A part changed in any way since
(rebuilt, marked, scored) is merged again by the rules above: then a label it still
carries is taken again.

The parts' latest uncertainty scores (`novelty uncertainty --index PART` on each
machine) become one run of the target when every part has them with the same settings
(`_mergescores.combine_scores` says when they do not); selections and mark-labeled history stay in
the parts, whose run ids they refer to.
"""
from __future__ import annotations

import hashlib
import json
import marshal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import _content, records, vectors
from ._content import MOVED_PREFIX, ContentChanges
from ._mergescores import combine_scores
from .errors import ConfigError, IndexDamagedError, IndexMismatchError, InputError
from .store import (CATALOG, GONE, LOST_PREFIX, RESTORE, LostShards, Store, _describe, create_store, open_store,
                    record_gone, same_encoder)

_COLS = "path, ext_id, split, size, mtime, hash, status, reason, shard, row, added, labeled_at"


@dataclass
class PartSummary:
    path: str
    rows: int = 0  # images in the part
    added: int = 0  # new to the target
    present: int = 0  # already there, nothing to take
    replaced: int = 0  # the target's failed row, or an older copy of the file, now the part's embedded one
    moved: int = 0  # unlabeled in the target, labeled in the part
    pending: int = 0  # not embedded yet in the part: left out
    clashes: int = 0  # the target holds the image under the other kind of key (imported id / path): left out
    shards: int = 0  # shard files copied
    gone: int = 0  # unlabeled images the part found deleted from their folder: out of the target's pool too
    excluded: int = 0  # images `novelty exclude` named in the part, now excluded in the target too
    unchanged: bool = False  # nothing in the part changed since it was last merged into the target: nothing taken
    held: list[str] = field(default_factory=list)  # the "K/N" parts of build-index --part this part holds


@dataclass
class MergeSummary:
    parts: list[PartSummary] = field(default_factory=list)
    labeled: int = 0  # embedded, in the merged index
    unlabeled: int = 0
    failed: int = 0
    missing_parts: list[str] = field(default_factory=list)  # "K/N" never merged into the target
    lost: LostShards = field(default_factory=LostShards)  # the target's missing or damaged shards, found first
    uncertainty_run: int | None = None  # the parts' uncertainty scores, combined into one run of the target
    uncertainty_scores: int = 0
    uncertainty_note: str | None = None  # why the parts' scores were not combined
    content: ContentChanges = field(default_factory=ContentChanges)  # marks of this index's moved images, carried
    seconds: float = 0.0


def held_parts(store: Store) -> set[tuple[int, int]]:
    """The K/N parts an index holds: those its build runs used (build-index --part), and
    those of every index merged into it whose build had finished."""
    out = set()
    for kind, params in store.db.execute("SELECT kind, params FROM runs WHERE kind IN ('build', 'merge') AND finished IS NOT NULL"):
        p = json.loads(params)
        if kind == "build" and (part := p.get("cfg", {}).get("part")):
            out.add((int(part[0]), int(part[1])))
        out |= {(int(k), int(n)) for k, n in p.get("held", [])}
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
    # every part's encoder is checked before the target is touched
    manifests = []
    for p in parts:
        with open_store(p) as st:
            m = st.manifest
        if not m.get("encoder") or not m.get("dim"):
            raise InputError(f"{p} holds no vectors yet (no encoder in its manifest); nothing was merged")
        manifests.append(m)
    enc0, dim0 = manifests[0]["encoder"], int(manifests[0]["dim"])
    for p, m in zip(parts, manifests):
        if int(m["dim"]) != dim0 or not same_encoder(m["encoder"], enc0):
            raise IndexMismatchError(f"{p} holds vectors from {_describe(m['encoder'], int(m['dim']))}, {parts[0]} from "
                                     f"{_describe(enc0, dim0)}; indexes of different encoders cannot be merged")
    s = MergeSummary()
    with create_store(root) as out:
        try:
            out.check_encoder(enc0, dim0)
            if "versions" in manifests[0] and "versions" not in out.manifest:
                out.update_manifest(versions=manifests[0]["versions"])
            s.lost = out.repair_shards(reembed=False)
            # a target holding vectors lost with a shard takes every part again: an unchanged part may hold them
            retake = s.lost.lost > 0 or out.db.execute(
                "SELECT 1 FROM images WHERE status='failed' AND reason LIKE ? LIMIT 1", (LOST_PREFIX + "%",)).fetchone()
            progress = progress_factory(len(parts)) if progress_factory else None
            carried = []
            for p in parts:
                ps, scores = _merge_part(out, Path(p), dim0, retake=bool(retake))
                s.parts.append(ps)
                carried.append((ps.path, scores))
                if progress:
                    progress(1)
            with out.transaction() as db:  # marks live here, not in the parts: those of images a part saw move follow them
                s.content = _content.carry_from_gone(db)
            if out.vectors_version and not vectors.is_current(out):
                vectors.build(out)
            combine_scores(out, carried, s)
            s.labeled, s.unlabeled, s.failed = (out.db.execute(q).fetchone()[0] for q in (
                "SELECT COUNT(*) FROM images WHERE status='embedded' AND split='labeled'",
                "SELECT COUNT(*) FROM images WHERE status='embedded' AND split='unlabeled'",
                "SELECT COUNT(*) FROM images WHERE status='failed'"))
            held = held_parts(out)
            for n in sorted({n for _, n in held}):
                s.missing_parts += [f"{k}/{n}" for k in range(1, n + 1) if (k, n) not in held]
        except BaseException as e:
            if out.discard_if_new() and isinstance(e, (KeyboardInterrupt, OSError)):  # before any part went in
                e.kept = "nothing was merged, and the new index was removed"
            raise
    s.seconds = time.monotonic() - t0
    return s


_ROW = ("id", "status", "split", "size", "mtime", "hash", "labeled_at")  # what _merge_part compares in the target's rows


@dataclass
class _Part:
    """What merge reads from a part, in one snapshot of its catalog."""

    rows: list[tuple]  # _COLS and id, by id
    shards: dict[str, tuple]  # name -> (n, dim, created)
    scores: tuple[dict, dict] | None  # its latest uncertainty run: (params, {path or id: score})
    excluded: list[tuple]  # (path, ext_id, reason, at) of the images `novelty exclude` named there
    held: set[tuple[int, int]]
    fingerprint: str


@dataclass
class _Plan:
    """What a part brings to the target, row by row (the rules in the module docstring)."""

    add: list[tuple] = field(default_factory=list)  # the part's rows new to the target
    replace: list[tuple[int, tuple]] = field(default_factory=list)  # (target id, the part's row)
    move: list[int] = field(default_factory=list)  # target ids to move to labeled
    gone: list[int] = field(default_factory=list)  # target ids of unlabeled images the part found deleted
    gone_labeled: list[int] = field(default_factory=list)  # of images mark-labeled moved: centers still, file gone
    need: dict[str, int] = field(default_factory=dict)  # shard -> the highest row of it taken
    taken: set[str] = field(default_factory=set)  # keys of the rows added or replaced
    same: set[str] = field(default_factory=set)  # keys whose vector in the target is already this part's (the same file)
    present: int = 0
    pending: int = 0
    clashes: int = 0


def merged_key(part: str) -> str:
    """The target's meta key holding the fingerprint of `part` (an absolute path) when it was last merged."""
    return f"merged:{part}"


def _fingerprint(*tables: Sequence[tuple]) -> str:
    """A hash of rows read from SQLite. marshal format 2 writes no references, so equal
    values always give equal bytes: 0.12 s for 250k catalog rows."""
    h = hashlib.blake2b(b"merge-fingerprint-1", digest_size=16)
    for rows in tables:
        h.update(b"|%d|" % len(rows))
        for start in range(0, len(rows), 10_000):
            h.update(marshal.dumps(list(rows[start:start + 10_000]), 2))
    return h.hexdigest()


def _read_part(src: Store) -> _Part:
    """Everything merge takes from a part, and its fingerprint, read in one transaction, so
    that the fingerprint describes exactly what was merged. The fingerprint covers every
    image row, shard, run (mark-labeled --undo, exclude --undo and a new uncertainty run
    each add one) and exclusion: anything done to the part changes it."""
    db = src.db
    db.execute("BEGIN")
    try:
        rows = db.execute(f"SELECT {_COLS}, id FROM images ORDER BY id").fetchall()
        shards = db.execute("SELECT name, n, dim, created FROM shards ORDER BY name").fetchall()
        runs = db.execute("SELECT id, kind, finished FROM runs ORDER BY id").fetchall()
        excluded = db.execute("SELECT i.path, i.ext_id, e.reason, e.at FROM excluded e JOIN images i ON i.id = e.image "
                              "ORDER BY e.image").fetchall() if src.has_table("excluded") else []
        latest = records.latest_uncertainty(src)
        held = held_parts(src)
        version = src.vectors_version
    finally:
        db.execute("ROLLBACK")
    scores = None
    if latest is not None:
        key_of = {r[12]: r[0] if r[0] is not None else r[1] for r in rows}
        scores = (latest.params, {key_of[i]: v for i, v in zip(latest.ids.tolist(), latest.values.tolist())})
    return _Part(rows, {name: (n, d, created) for name, n, d, created in shards}, scores, excluded, held,
                 _fingerprint(rows, shards, runs, excluded, [(version,)]))


def _plan(out: Store, part: Path, p: _Part) -> _Plan:
    """Compare the part's rows with the target's (read only)."""
    paths = [r[0] for r in p.rows if r[0] is not None]
    ids = [r[1] for r in p.rows if r[1] is not None]
    by_path, by_id = out.find_keys("path", paths, _ROW), out.find_keys("ext_id", ids, _ROW)
    # one image, one row: a path may not sit in the target as an imported id, nor the reverse
    other = {*out.existing_keys("ext_id", paths), *out.existing_keys("path", ids)}
    plan = _Plan()
    for r in p.rows:
        path, ext_id, split, size, mtime, h, status, _, shard, row = r[:10]
        key = path if path is not None else ext_id
        if status == "pending":
            plan.pending += 1
            continue
        if key in other:
            plan.clashes += 1
            continue
        old = (by_path if path is not None else by_id).get(key)
        newer = old is not None and path is not None and old[1] == "embedded" and status == "embedded" \
            and (size, h) != (old[3], old[5]) and (mtime or 0) > (old[4] or 0)  # the file changed since the target saw it
        if old is None:
            plan.add.append(r[:12])
            plan.taken.add(key)
        elif status == "embedded" and (old[1] != "embedded" or newer):
            plan.replace.append((old[0], r))
            plan.taken.add(key)
        else:
            plan.present += 1
            if path is not None and status == old[1] == "embedded" and (size, h) == (old[3], old[5]):
                plan.same.add(key)  # the same file's vector, merged before
        if status == "embedded" and (old is None or old[1] != "embedded" or newer):
            if shard not in p.shards:
                raise IndexDamagedError(f"{part / CATALOG} points into shard {shard!r}, which it does not list; "
                                        f"{RESTORE}; nothing of {part} was merged")
            plan.need[shard] = max(plan.need.get(shard, -1), row)
        if old is not None and split == "labeled" and old[2] == "unlabeled":
            plan.move.append(old[0])
        moved = status == "failed" and (r[7] or "").startswith(MOVED_PREFIX)
        # deleted from its folder, or moved (then also a row mark-labeled moved here), as the part found: it goes here too
        if old is not None and status == "failed" and (r[7] == GONE or moved) and old[1] == "embedded" \
                and (old[2] == "unlabeled" or (moved and old[6] is not None)):
            plan.gone.append(old[0])
        elif old is not None and status == "failed" and r[7] == GONE and old[1] == "embedded" and old[6] is not None:
            plan.gone_labeled.append(old[0])  # a labeled one stays a center, but should its bytes turn up elsewhere...
    return plan


def _copy_shards(out: Store, src: Store, part: Path, p: _Part, need: dict[str, int], dim: int) -> list[str]:
    """Write the shard files the target lacks, each checked against the part's catalog
    first: files first, then (in _commit_part) the rows. -> their names."""
    known = {name for (name,) in out.db.execute("SELECT name FROM shards")}
    copy = sorted(set(need) - known)
    for name in copy:
        v = src.shard(name)
        if v.ndim != 2 or v.shape[1] != dim or len(v) != p.shards[name][0] or need[name] >= len(v):
            raise IndexDamagedError(f"shard {src.root / 'shards' / name}.npy holds {tuple(v.shape)}, its catalog says "
                                    f"{p.shards[name][0]} rows of dim {dim}; {RESTORE}; nothing of {part} was merged")
        out.write_shard_file(name, v)
    return copy


def _carry_exclusions(out: Store, excluded: list[tuple], run: int) -> int:
    """The part's exclusions, onto the target's rows of the same path or imported id
    (images left out of the target are not there to exclude); one already excluded in
    the target keeps its reason. -> how many are new to the target."""
    n = 0
    for column, i in (("path", 0), ("ext_id", 1)):
        named = {r[i]: r for r in excluded if r[i] is not None}
        found = out.find_keys(column, list(named), ("id",))
        n += out.db.executemany("INSERT OR IGNORE INTO excluded(image, reason, run, at) VALUES (?,?,?,?)",
                                ((v[0], named[k][2], run, named[k][3]) for k, v in found.items())).rowcount
    return n


def _commit_part(out: Store, ps: PartSummary, p: _Part, plan: _Plan, copy: list[str]) -> None:
    """The part's rows and exclusions, its merge run and its fingerprint: one transaction."""
    now = time.time()
    with out.transaction() as db:
        db.executemany("INSERT INTO shards(name, n, dim, created) VALUES (?,?,?,?)", ((n, *p.shards[n]) for n in copy))
        db.executemany(f"INSERT INTO images({_COLS}) VALUES ({','.join('?' * 12)})", plan.add)
        db.executemany("UPDATE images SET status='embedded', reason=NULL, shard=?, row=?, hash=COALESCE(?, hash), "
                       "size=?, mtime=?, added=? WHERE id=?",  # added: when these bytes came in (_content.carry_from_gone)
                       ((r[8], r[9], r[5], r[3], r[4], now, i) for i, r in plan.replace))
        db.executemany("UPDATE images SET split='labeled', labeled_at=COALESCE(labeled_at, ?) WHERE id=?",
                       ((now, i) for i in plan.move))
        record_gone(db, plan.gone)
        db.executemany("UPDATE images SET size=-1, mtime=NULL WHERE id=?", ((i,) for i in plan.gone_labeled))  # (_content)
        if plan.need or plan.gone:
            out._bump_version()
        run = db.execute("INSERT INTO runs(kind, params, started) VALUES ('merge',?,?)",
                         (json.dumps({"from": ps.path, "held": [h.split("/") for h in ps.held]}), now)).lastrowid
        ps.excluded = _carry_exclusions(out, p.excluded, run)
        summary = {k: getattr(ps, k) for k in ("path", "held", "rows", "added", "present", "replaced", "moved", "pending",
                                               "clashes", "shards", "excluded", "gone")}
        db.execute("UPDATE runs SET summary=?, finished=? WHERE id=?", (json.dumps(summary), time.time(), run))
        db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (merged_key(ps.path), p.fingerprint))


def _merge_part(out: Store, part: Path, dim: int, retake: bool = False) -> tuple[PartSummary, tuple[dict, dict] | None]:
    """-> the part's summary, and its latest uncertainty run's (params, {path or id: score})
    if it has one, for the images whose vector in the target is the part's. A part whose
    fingerprint is the one recorded when it was last merged into this target is compared
    (for its scores and warnings) but nothing of it is taken."""
    with open_store(part) as src:
        p = _read_part(src)
        plan = _plan(out, part, p)
        ps = PartSummary(str(part.resolve()), len(p.rows), pending=plan.pending, clashes=plan.clashes)
        if not ps.pending:  # an unfinished part does not count as held: the warning names it
            ps.held = [f"{k}/{n}" for k, n in sorted(p.held)]
        ps.unchanged = not retake and out.meta_get(merged_key(ps.path)) == p.fingerprint
        if not ps.unchanged:
            ps.added, ps.present, ps.replaced, ps.moved = len(plan.add), plan.present, len(plan.replace), len(plan.move)
            ps.gone = len(plan.gone)
            copy = _copy_shards(out, src, part, p, plan.need, dim)
            ps.shards = len(copy)
    if not ps.unchanged:
        _commit_part(out, ps, p, plan, copy)
    ours = plan.same if ps.unchanged else plan.same | plan.taken  # only the scores of the part's own vectors are carried
    scores = None if p.scores is None else (p.scores[0], {k: v for k, v in p.scores[1].items() if k in ours})
    return ps, scores
