"""The index directory: a SQLite catalog, float16 vector shards and a manifest.

Layout of an index directory::

    catalog.sqlite       one row per image (or imported vector), shards, runs, scores
    shards/<name>.npy    float16 [n, d] L2-normalised vectors, memory-mapped when read
    vectors.faiss        FAISS index over every embedded vector (see vectors.py)
    manifest.json        encoder, dim, preprocessing, library versions
    .lock                held by the one process that writes

Crash safety: a shard file is written under a temporary name, fsync'd and
``os.replace``d into place; only then are the catalog rows that point into it
committed, in one transaction. A shard file no committed row points to is an orphan
from a killed run and is deleted the next time the index is opened for writing. So a
run killed at any moment leaves an index that opens cleanly and loses at most the
shard in flight. Shard names are unique tokens, not counters, so that workers on
several machines can write shards independently (the shard is the unit of work).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import sqlite3
import struct
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _content
from ._files import atomic_file, atomic_write_text, temp_beside
from ._sql import in_chunks
from ._content import GONE, ContentChanges
from .errors import (IndexBusyError, IndexDamagedError, IndexMismatchError, IndexMissingError, IndexReadOnlyError,
                     InputError, StorageError, Terminated, first_line)

log = logging.getLogger(__name__)
RESTORE = "restore it or build the index again"  # what a damaged catalog or manifest's message advises
# what a missing or damaged shard's message advises: build-index re-embeds the images of a lost shard from
# their files; import-embeddings records imported vectors as lost, and --skip-existing imports only those again
SHARD_ADVICE = ("re-run build-index with the same sources, or for vectors from import-embeddings re-run it with the "
                "same files and --skip-existing")
VECTOR_LOST = ("vector lost: shard {} was missing or damaged, and an imported vector cannot be embedded again; import "
               "it again (import-embeddings --skip-existing takes the whole file)")
LOST_PREFIX = VECTOR_LOST.split("{}")[0]

CATALOG = "catalog.sqlite"
MANIFEST = "manifest.json"
SHARDS = "shards"
FAISS_FILE = "vectors.faiss"
_BESIDE_CATALOG = (MANIFEST, SHARDS, FAISS_FILE)  # what an index holds besides its catalog, made after it
SPLITS = ("labeled", "unlabeled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images(
    id      INTEGER PRIMARY KEY,
    path    TEXT UNIQUE,          -- absolute path of an image file; NULL for vectors imported under ids
    ext_id  TEXT UNIQUE,          -- id of a vector imported under an id; NULL for image files (and import --paths)
    split   TEXT NOT NULL CHECK (split IN ('labeled', 'unlabeled')),
    size    INTEGER,
    mtime   REAL,
    hash    TEXT,                 -- blake2b-128 of the file's bytes
    status  TEXT NOT NULL CHECK (status IN ('pending', 'embedded', 'failed')),
    reason  TEXT,                 -- why it failed
    shard   TEXT,                 -- shard file holding its vector
    row     INTEGER,              -- row in that shard
    added   REAL NOT NULL,        -- when the row came in (merge: when a part's new bytes last replaced its vector)
    labeled_at REAL,              -- when mark-labeled moved it
    labeled_by INTEGER,           -- the selection run it came from, if any
    file    TEXT,                 -- "device:inode" when last scanned: one file met under another path in a later run
    CHECK ((path IS NULL) != (ext_id IS NULL))
);
CREATE INDEX IF NOT EXISTS images_split ON images(split, status);
CREATE INDEX IF NOT EXISTS images_hash ON images(hash);
CREATE INDEX IF NOT EXISTS images_shard ON images(shard);
CREATE TABLE IF NOT EXISTS shards(
    name    TEXT PRIMARY KEY,
    n       INTEGER NOT NULL,
    dim     INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs(
    id      INTEGER PRIMARY KEY,
    kind    TEXT NOT NULL,        -- build | import | merge | select | uncertainty | mark-labeled | unmark | exclude | include
    params  TEXT NOT NULL,        -- JSON
    summary TEXT,                 -- JSON, set when the run finishes
    started REAL NOT NULL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS picks(
    run     INTEGER NOT NULL REFERENCES runs(id),
    rank    INTEGER NOT NULL,
    image   INTEGER NOT NULL REFERENCES images(id),
    priority REAL,                -- what the strategy maximised at this pick
    radius  REAL,                 -- covering radius of the pool after this pick (k-center strategies)
    PRIMARY KEY (run, rank)
);
CREATE TABLE IF NOT EXISTS excluded(
    image   INTEGER PRIMARY KEY REFERENCES images(id),  -- never picked by select while unlabeled
    reason  TEXT,
    run     INTEGER REFERENCES runs(id),  -- the exclude run that named it
    at      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS uncertainty(
    run     INTEGER NOT NULL REFERENCES runs(id),
    image   INTEGER NOT NULL REFERENCES images(id),
    value   REAL,                 -- NULL when scoring this image failed
    reason  TEXT,
    PRIMARY KEY (run, image)
);
"""


@dataclass(frozen=True)
class ImageRecord:
    """What a source scan yields for one file."""

    path: str  # absolute
    split: str
    size: int  # -1 when the file cannot be stat'ed
    mtime: float
    reason: str | None = None  # set when the file is already known to be unreadable
    file: str | None = None  # "device:inode", to know one file reached through two paths (a link)


@dataclass(frozen=True)
class LostShards:
    """Shards the catalog referred to that were missing or damaged, and what became of their images."""

    names: tuple[str, ...] = ()  # taken out of the catalog, their files removed
    requeued: int = 0  # their images with a path: pending again, to embed again from the files
    lost: int = 0  # their vectors imported under ids: failed (VECTOR_LOST)


@dataclass(frozen=True)
class Layout:
    """Where embedded vectors live: parallel arrays ordered by catalog id."""

    ids: np.ndarray  # [n] int64 catalog ids
    shard: np.ndarray  # [n] int64 index into names
    row: np.ndarray  # [n] int64 row within that shard
    names: list[str]


def record_gone(db, ids: Iterable[int]) -> None:
    """Record images as deleted from their folder (GONE): failed, with no vector. Inside
    the caller's transaction, which moves vectors_version on. Their hash stays: should
    the same bytes turn up at another path, what was done to them moves there (_content)."""
    db.executemany("UPDATE images SET status = 'failed', reason = ?, size = -1, mtime = NULL, shard = NULL, "
                   "row = NULL WHERE id = ?", ((GONE, int(i)) for i in ids))


def _add_columns(db) -> None:
    """Columns added since a catalog was made (session 14: images.file), and their index."""
    if "file" not in {r[1] for r in db.execute("PRAGMA table_info(images)")}:
        db.execute("ALTER TABLE images ADD COLUMN file TEXT")
    db.execute("CREATE INDEX IF NOT EXISTS images_file ON images(file)")


def _labeled_over_unlabeled(db, linked: dict[str, str]) -> list[str]:
    """Paths given under --unlabeled, newly linked to a labeled path: labeled images, as
    the rule says, but a link in the labeled folder to the unlabeled one makes the whole
    pool labeled, so the build says so."""
    out = []
    for chunk, marks in in_chunks(sorted(linked)):
        out += [p for p, in db.execute(
            f"SELECT s.path FROM scan s WHERE s.split = 'unlabeled' AND s.path IN ({marks}) AND NOT EXISTS "
            f"(SELECT 1 FROM images i WHERE i.path = s.path AND i.status = 'failed' AND i.reason = s.reason)", chunk)]
    labeled = set()
    for chunk, marks in in_chunks(sorted({linked[p] for p in out})):
        labeled.update(p for p, in db.execute(f"SELECT path FROM scan WHERE split = 'labeled' AND path IN ({marks})", chunk))
    return [p for p in out if linked[p] in labeled]


def _one_path_a_file(db) -> dict[str, str]:
    """One file reached through several paths in a scan (a symlink, a hard link, a folder
    of links beside the folder they point into) is one image: the labeled path wins, then
    one the catalog already holds (so marks stay where they are), then the first
    scanned. The others are recorded as failed, "linked" to it. -> {other path: its path}."""
    groups: dict[str, list[tuple]] = {}
    for file, path, split, known, order in db.execute(
            "SELECT s.file, s.path, s.split, EXISTS (SELECT 1 FROM images i WHERE i.path = s.path AND i.status != 'failed'), "
            "s.rowid FROM scan s WHERE s.file IN (SELECT file FROM scan WHERE file IS NOT NULL GROUP BY file "
            "HAVING COUNT(*) > 1)"):
        groups.setdefault(file, []).append((split == "labeled", known, -order, path))
    linked = {}
    for rows in groups.values():
        first = max(rows)[3]
        linked.update((r[3], first) for r in rows if r[3] != first)
    # paths met alone that reach a file the catalog holds under another path, not met this time: linked to it while
    # that path is still the same file, so the image keeps its row and marks (as a labeled file, when it is one, though
    # given under --unlabeled). (s.path, s.split, the path indexed, its split) of
    earlier = db.execute(  # a new path to a file an earlier run indexed (a link to a folder given before, a list of links)
        "SELECT s.path, s.split, t.path, t.split FROM scan s JOIN images t ON t.file = s.file "
        "WHERE s.file IS NOT NULL AND s.reason IS NULL AND t.path != s.path AND t.status != 'failed' "
        "AND NOT EXISTS (SELECT 1 FROM scan o WHERE o.path = t.path) "
        "AND NOT EXISTS (SELECT 1 FROM images i WHERE i.path = s.path AND i.status != 'failed')").fetchall()
    relinked = db.execute(  # a path an earlier run linked (re-read, it would be a second row of one image)
        "SELECT s.path, s.split, t.path, t.split FROM scan s JOIN images i ON i.path = s.path "
        "JOIN images t ON t.path = substr(i.reason, ?) AND t.status != 'failed' "
        "WHERE i.status = 'failed' AND i.reason LIKE ? AND s.reason IS NULL",
        (len(_content.LINKED_PREFIX) + 1, _content.LINKED_PREFIX + "%")).fetchall()
    for path, split, to, to_split in (*earlier, *relinked):
        if path not in linked and not (split == "labeled" and to_split == "unlabeled") and _same_file(path, to):
            linked[path] = to
    db.executemany("UPDATE scan SET size = -1, mtime = 0.0, reason = ? WHERE path = ?",
                   ((_content.LINKED.format(to), path) for path, to in linked.items()))
    return linked


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def gone_from(paths: Iterable[str]) -> set[str]:
    """Those of `paths` (absolute) whose folder now lists without them: deleted. A
    folder answers only when it can be listed and still holds an image file (one of
    these, or another: with --part, the others may be another part's), so a drive not
    mounted (an empty mount point), a share that is down, or a folder renamed or emptied
    says nothing: what it held is unknown, not gone. One listing a folder."""
    from .config import IMAGE_EXTENSIONS

    by_folder: dict[str, list[str]] = {}
    for p in paths:
        by_folder.setdefault(os.path.dirname(p), []).append(p)
    out: set[str] = set()
    for folder, ps in by_folder.items():
        try:
            names = set(os.listdir(folder))
        except (OSError, ValueError):
            continue
        missing = [p for p in ps if os.path.basename(p) not in names]
        if len(missing) < len(ps) or any(n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".") for n in names):
            out.update(missing)
    return out


def text_key(name: str) -> str:
    """A file name as the catalog stores it: SQLite holds UTF-8 text, so the bytes of a
    name that is not valid UTF-8 (os functions hand them over as surrogates) are written
    as backslash escapes, e.g. '\\xff'."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def display_id(image_id: int, ext_id: str | None) -> str:
    """The id users see: the imported id, else the catalog id."""
    return ext_id if ext_id is not None else str(image_id)


class Store:
    """An index directory. Open with :func:`open_store` or :func:`create_store`."""

    def __init__(self, root: Path, writable: bool, create: bool = False):
        self.root = Path(root)
        self.writable = writable
        self.made_dirs: list[Path] = []  # folders create_store made for it, innermost first: discard() removes them
        self.created = False  # this process created the catalog: discard() may undo that
        self._lock_fd: int | None = None
        if writable:
            self._acquire_lock(create)
        if create and not (self.root / CATALOG).exists():  # under the lock: two first runs cannot both create it
            other = [n for n in _BESIDE_CATALOG if (self.root / n).exists()]
            if other:  # the catalog comes first: these are another tool's, or what a lost catalog left
                if self._made_lock:
                    (self.root / ".lock").unlink(missing_ok=True)
                self._release_lock()
                raise IndexDamagedError(f"{self.root} holds {' and '.join(other)} but no {CATALOG}: another tool's folder, "
                                        f"or an index that lost its catalog; give --index a new or empty folder, or "
                                        f"restore the catalog")
            self._create_catalog()
            self.created = True
        # a folder this process cannot write (a read-only mount): SQLite could not create the catalog's -shm file
        # there, so the catalog is opened immutable, which is safe only while no writes are pending in its -wal
        frozen = not writable and not os.access(self.root, os.W_OK)
        if frozen and (self.root / f"{CATALOG}-wal").exists() and (self.root / f"{CATALOG}-wal").stat().st_size:
            raise IndexReadOnlyError(f"{self.root} is read-only and its catalog has writes not yet folded in "
                                     f"({CATALOG}-wal); open it once where it can be written")
        target = (self.root / CATALOG).resolve().as_uri() + "?mode=ro&immutable=1" if frozen else self.root / CATALOG
        self.db = sqlite3.connect(target, timeout=60, isolation_level=None, uri=frozen)
        try:
            if not frozen:
                self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            if writable:
                self.db.executescript(_SCHEMA)
                _add_columns(self.db)
                self._remove_orphans()
            else:
                self.db.execute("SELECT 1 FROM images LIMIT 1").fetchall()
        except sqlite3.DatabaseError as e:
            self.close()
            if storage_trouble(e):  # the disk or the system, not the file: never advise replacing the index
                raise StorageError(f"cannot use {self.root / CATALOG} ({e}); check free space and permissions, "
                                   f"the index was not changed") from None
            raise IndexDamagedError(f"{self.root / CATALOG} is damaged ({e}); {RESTORE}") from None

    # ----------------------------------------------------------------- lifecycle
    _held: set[str] = set()  # roots this process writes: POSIX locks don't exclude the same process

    def _acquire_lock(self, create: bool = False) -> None:
        key = str(self.root.resolve())
        if key in Store._held:
            raise IndexBusyError(f"{self.root} is already open for writing in this process")
        # A POSIX record lock, not flock: it belongs to this process alone, so forked
        # DataLoader workers that outlive a killed run do not keep the index locked.
        self._made_lock = not (self.root / ".lock").exists()
        try:
            try:
                fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                if not create:
                    raise
                # another first run, refused, removed the folder it had made between our look and our open
                self.made_dirs = _make_dirs(self.root)
                fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise IndexReadOnlyError(f"cannot write to the index {self.root} ({e.strerror}); reading commands "
                                     f"(info, neighbors, duplicates, report, export) still work") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = _lock_holder(fd)
            os.close(fd)
            who = f"another novelty process (pid {pid})" if pid else "another novelty process"
            raise IndexBusyError(f"{who} is writing {self.root}; wait for it to finish") from None
        self._lock_fd = fd
        Store._held.add(key)

    def _create_catalog(self) -> None:
        """The catalog never exists without its schema: a run killed here leaves nothing."""
        tmp = temp_beside(self.root / CATALOG)
        try:
            db = sqlite3.connect(tmp)
            db.executescript(_SCHEMA)
            db.commit()
            db.close()
            os.replace(tmp, self.root / CATALOG)
        except BaseException as e:  # refused, or stopped (Ctrl-C, SIGTERM): nothing of this run stays
            tmp.unlink(missing_ok=True)
            if self._made_lock:
                (self.root / ".lock").unlink(missing_ok=True)
            self._release_lock()
            if isinstance(e, (OSError, sqlite3.OperationalError)):
                raise IndexReadOnlyError(f"cannot create the index {self.root} ({getattr(e, 'strerror', None) or e})") from None
            if isinstance(e, KeyboardInterrupt):
                e.kept = "nothing was written"  # type: ignore[attr-defined]  # the CLI says it (cli.command)
            raise

    def discard(self) -> None:
        """Undo the creation of this index, for a first run that stopped before anything
        in it counts: its own files (never anything else in a folder the user made), then
        the folders create_store made. Done under the write lock, the lock file last: no
        other writer can be at work in it, and one that starts after the lock file is gone
        works in a folder of its own making, which is then left alone."""
        assert self.writable and self.created
        self.db.close()
        own = (CATALOG, *_BESIDE_CATALOG)
        for f in sorted(self.root.iterdir()):  # those, SQLite's -wal and -shm, and their temporary files
            if f.name in own or f.name in (f"{CATALOG}-wal", f"{CATALOG}-shm") or f.name.startswith(tuple(f".{n}." for n in own)):
                shutil.rmtree(f, ignore_errors=True) if f.is_dir() and not f.is_symlink() else f.unlink(missing_ok=True)
        (self.root / ".lock").unlink(missing_ok=True)
        _remove_made(self.made_dirs)
        self._release_lock()

    def discard_if_new(self) -> bool:
        """discard() when this process created the index and nothing was recorded in it
        yet (no run): what a first import or merge that was refused or stopped leaves.
        -> whether it was discarded."""
        if self.created and self.db.execute("SELECT 1 FROM runs LIMIT 1").fetchone() is None:
            self.discard()
            return True
        return False

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
            Store._held.discard(str(self.root.resolve()))

    def close(self) -> None:
        self.db.close()
        self._release_lock()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _remove_orphans(self) -> None:
        shard_dir = self.root / SHARDS
        shard_dir.mkdir(exist_ok=True)
        known = {name for (name,) in self.db.execute("SELECT name FROM shards")}
        leftovers = [f for f in shard_dir.iterdir() if f.name.endswith(".tmp") or (f.suffix == ".npy" and f.stem not in known)]
        leftovers += list(self.root.glob(f".{CATALOG}.*.tmp")) + list(self.root.glob(".*.json.*.tmp"))
        for f in leftovers:
            log.info("removing %s left by an interrupted run", f.name)
            f.unlink()

    # ------------------------------------------------------------------ manifest
    @property
    def manifest(self) -> dict:
        path = self.root / MANIFEST
        if not path.exists():
            return {}
        try:
            m = json.loads(path.read_text())
        except (ValueError, OSError) as e:
            raise IndexDamagedError(f"{path} is damaged ({e}); {RESTORE}") from None
        if not isinstance(m, dict):
            raise IndexDamagedError(f"{path} is damaged (not a JSON object); {RESTORE}")
        return m

    def write_manifest(self, manifest: dict) -> None:
        atomic_write_text(self.root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))

    def update_manifest(self, **fields) -> None:
        m = self.manifest
        m.update(fields, updated=time.time())
        self.write_manifest(m)

    def check_encoder(self, encoder: dict, dim: int) -> None:
        """Refuse vectors from another model or dim; record the encoder on first use, or
        while the index holds no vector yet (a first run killed before its first shard)."""
        m = self.manifest
        if m.get("encoder") and not same_encoder(m["encoder"], encoder) or m.get("dim") not in (None, dim):
            if self.db.execute("SELECT 1 FROM shards LIMIT 1").fetchone() is None:
                log.info("the index holds no vector yet: it now takes %s", _describe(encoder, dim))
                m.pop("encoder", None), m.pop("faiss", None)
        if not m.get("encoder"):
            m.update(encoder=encoder, dim=dim, dtype="float16", normalized=True, created=time.time())
            self.write_manifest(m)
            return
        old, new = _describe(m["encoder"], m["dim"]), _describe(encoder, dim)
        if m["dim"] != dim or not same_encoder(m["encoder"], encoder):
            raise IndexMismatchError(f"index {self.root} holds vectors from {old}; refusing vectors from {new}")
        moved = {k: encoder[k] for k in ("pretrained", "model_config") if encoder.get(k) != m["encoder"].get(k)
                 and m["encoder"].get(k) is not None and encoder.get(k) is not None}
        if moved and self.writable:  # the same weights or config file at a new path (same SHA-256): recorded there now,
            m["encoder"].update(moved)  # so neighbors finds it
            self.write_manifest(m)

    @property
    def dim(self) -> int | None:
        return self.manifest.get("dim")

    # ------------------------------------------------------------------- catalog
    def meta_get(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def _bump_version(self) -> None:
        """Called inside a transaction whenever the set of embedded vectors changes."""
        self.db.execute(
            "INSERT INTO meta(key, value) VALUES ('vectors_version', '1') ON CONFLICT(key) "
            "DO UPDATE SET value = CAST(value AS INTEGER) + 1"
        )

    @property
    def vectors_version(self) -> int:
        return int(self.meta_get("vectors_version", "0"))

    def sync_sources(self, records: Iterable[ImageRecord], retry_failed: bool = False, folders: Sequence[str] = (),
                     keep: Callable[[str], bool] | None = None, labeled_folders: Sequence[str] = ()) -> dict:
        """Merge a source scan into the catalog, in one transaction.

        New paths are added as pending; paths whose size or mtime changed go back to
        pending; unchanged ones are left alone (failed ones too, unless retry_failed).
        A path listed under a new split moves to it, except that an image moved to the
        labeled split by mark-labeled stays labeled when its folder is scanned as
        unlabeled again. An unlabeled image under one of `folders` (the scanned folders,
        absolute) that the scan no longer found, and for which `keep(path)` holds (this
        part's paths), was deleted: it is recorded as failed ("gone") and leaves the
        pool; a labeled one stays, as a center, and is counted (labeled_missing_ids;
        also under `labeled_folders`). So does one the scan did not reach (its
        folder or list not given this time) whose folder now lists without it
        (gone_from). Returns counts.
        """
        now = time.time()
        with self.transaction() as db:
            db.execute("CREATE TEMP TABLE IF NOT EXISTS scan(path TEXT PRIMARY KEY, split TEXT, size INT, mtime REAL, "
                       "reason TEXT, file TEXT)")
            db.execute("DELETE FROM scan")
            # labeled wins when a path is given under both splits
            db.executemany(
                "INSERT INTO scan VALUES (?,?,?,?,?,?) ON CONFLICT(path) DO UPDATE SET split='labeled' "
                "WHERE excluded.split='labeled'",
                ((r.path, r.split, r.size, r.mtime, r.reason, r.file) for r in records),
            )
            linked = _one_path_a_file(db)
            as_labeled = _labeled_over_unlabeled(db, linked)  # before the rows below take the scan's word
            counts = {"scanned": db.execute("SELECT COUNT(*) FROM scan").fetchone()[0]}
            counts["failed_at_scan"] = [r for (r,) in db.execute(
                "SELECT s.reason FROM scan s LEFT JOIN images i ON i.path = s.path WHERE s.reason IS NOT NULL "
                "AND (i.id IS NULL OR i.size IS NOT s.size OR i.mtime IS NOT s.mtime"
                + (" OR (i.status = 'failed' AND s.reason NOT LIKE ?))" if retry_failed else ")"),  # retried, failed again
                (_content.LINKED_PREFIX + "%",) if retry_failed else ())]
            counts["new"] = db.execute(
                "INSERT INTO images(path, split, size, mtime, status, reason, added) "
                "SELECT s.path, s.split, s.size, s.mtime, CASE WHEN s.reason IS NULL THEN 'pending' ELSE 'failed' END, "
                "s.reason, ? FROM scan s WHERE NOT EXISTS (SELECT 1 FROM images i WHERE i.path = s.path)",
                (now,),
            ).rowcount
            # failed before and not changed since (--retry-failed): updated, but not "changed"; tried again, but for
            # a path linked to another (not a failure: it stays linked)
            refailed, retried = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(s.reason IS NULL OR s.reason NOT LIKE ?), 0) FROM images i "
                "JOIN scan s ON i.path = s.path WHERE i.status = 'failed' AND i.size IS s.size AND i.mtime IS s.mtime",
                (_content.LINKED_PREFIX + "%",)).fetchone() if retry_failed else (0, 0)
            relinked = db.execute(  # paths that become links to another: said on their own line, not "changed"
                "SELECT COUNT(*) FROM images i JOIN scan s ON i.path = s.path WHERE s.reason LIKE ? "
                "AND (i.size IS NOT s.size OR i.mtime IS NOT s.mtime)", (_content.LINKED_PREFIX + "%",)).fetchone()[0]
            changed = db.execute(
                "UPDATE images SET status = CASE WHEN s.reason IS NULL THEN 'pending' ELSE 'failed' END, "
                "reason = s.reason, size = s.size, mtime = s.mtime, shard = NULL, row = NULL "  # hash: what it held (_content)
                "FROM scan s WHERE images.path = s.path AND (images.size IS NOT s.size OR images.mtime IS NOT s.mtime "
                + ("OR images.status = 'failed'" if retry_failed else "")
                + ")"
            ).rowcount
            counts["changed"], counts["retried"] = changed - refailed - relinked, retried
            db.execute("UPDATE images SET file = s.file FROM scan s WHERE images.path = s.path AND s.reason IS NULL "
                       "AND images.file IS NOT s.file")  # each file's identity, for a later run's new paths
            counts["kept_labeled"] = db.execute(
                "SELECT COUNT(*) FROM images i JOIN scan s ON i.path = s.path "
                "WHERE i.split = 'labeled' AND s.split = 'unlabeled' AND i.labeled_at IS NOT NULL"
            ).fetchone()[0]
            counts["moved"] = db.execute(
                "UPDATE images SET split = s.split FROM scan s WHERE images.path = s.path AND images.split != s.split "
                "AND NOT (images.labeled_at IS NOT NULL AND s.split = 'unlabeled')"  # mark-labeled's word stands
            ).rowcount
            # rows the scan did not meet: under a scanned folder, deleted (unlabeled: out of the pool; labeled: a center
            # still, said each run); elsewhere (a folder or list not given this time), deleted when its folder now lists
            # without it (gone_from answers only for folders that list and still hold an image). One pass over them.
            unl_prefixes = tuple(f.rstrip(os.sep) + os.sep for f in folders)
            lab_prefixes = unl_prefixes + tuple(f.rstrip(os.sep) + os.sep for f in labeled_folders)
            gone, missing, outside = [], [], []
            for i, p, split in db.execute(
                    "SELECT id, path, split FROM images i WHERE path IS NOT NULL AND (status = 'embedded' OR "
                    "(split = 'unlabeled' AND status = 'pending')) AND NOT EXISTS (SELECT 1 FROM scan s WHERE s.path = i.path)"):
                if keep is not None and not keep(p):
                    continue
                if split == "labeled":
                    if p.startswith(lab_prefixes):
                        missing.append(i)
                elif p.startswith(unl_prefixes):
                    gone.append(i)
                else:
                    outside.append((i, p))
            counts["labeled_missing_ids"] = sorted(missing)
            deleted = gone_from([p for _, p in outside])
            counts["gone_elsewhere"] = sum(p in deleted for _, p in outside)
            gone = sorted(gone + [i for i, p in outside if p in deleted])
            record_gone(db, gone)
            counts["linked"], counts["content"] = len(linked), _content.carry_to(db, linked)
            counts["unlabeled_as_labeled"] = as_labeled
            counts["gone"], counts["gone_ids"] = len(gone), gone
            if changed or gone:
                self._bump_version()
            db.execute("DELETE FROM scan")
        return counts

    def _count_among(self, ids: Sequence[int], where: str, params: tuple = ()) -> int:
        return sum(self.db.execute(f"SELECT COUNT(*) FROM images WHERE {where} AND id IN ({marks})",
                                   (*params, *chunk)).fetchone()[0] for chunk, marks in in_chunks(ids))

    def still_embedded(self, ids: Sequence[int]) -> int:
        """How many of `ids` are still embedded (a labeled image found moved is not)."""
        return self._count_among(ids, "status = 'embedded'")

    def still_gone(self, ids: Sequence[int]) -> int:
        """How many of `ids` are still recorded as deleted (GONE), not since found moved."""
        return self._count_among(ids, "reason = ?", (GONE,))

    def pending_ids(self) -> np.ndarray:
        """Catalog ids still to embed, labeled first, then by id."""
        rows = self.db.execute(
            "SELECT id FROM images WHERE status='pending' ORDER BY split='unlabeled', id"
        ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def path_of(self, image_id: int) -> str:
        return self.db.execute("SELECT path FROM images WHERE id=?", (int(image_id),)).fetchone()[0]

    def commit_shard(
        self,
        ids: Sequence[int],
        vectors: np.ndarray,  # [n, d] float32 or float16, L2-normalised
        hashes: Sequence[str | None] = (),
        failures: Sequence[tuple[int, str, str | None]] = (),  # (id, reason, hash)
    ) -> tuple[str | None, ContentChanges]:
        """Write one shard and commit the catalog rows describing it, atomically, with
        what the bytes read say about earlier rows (_content: changed and moved images).
        -> (the shard's name, None when nothing was embedded; those changes)."""
        assert self.writable
        assert len(ids) == len(vectors)
        name = None
        if len(ids):
            name = f"shard-{time.strftime('%Y%m%d')}-{uuid.uuid4().hex[:12]}"
            self.write_shard_file(name, vectors)
        read = {int(i): h for i, h in zip(ids, hashes)} | {int(i): h for i, _, h in failures}
        with self.transaction() as db:
            known = {i: h for i, h in read.items() if h is not None}
            changes = _content.before_commit(db, known)
            if name is not None:
                db.execute(
                    "INSERT INTO shards(name, n, dim, created) VALUES (?,?,?,?)",
                    (name, len(ids), vectors.shape[1], time.time()),
                )
                hashes = list(hashes) or [None] * len(ids)
                db.executemany(
                    "UPDATE images SET status='embedded', reason=NULL, shard=?, row=?, "
                    "hash=COALESCE(?, hash) WHERE id=?",
                    ((name, r, h, int(i)) for r, (i, h) in enumerate(zip(ids, hashes))),
                )
                self._bump_version()
            db.executemany(
                "UPDATE images SET status='failed', reason=?, hash=COALESCE(?, hash), shard=NULL, row=NULL WHERE id=?",
                ((reason, h, int(i)) for i, reason, h in failures),
            )
            if name is not None:
                changes.add(_content.after_commit(db, {int(i): known[int(i)] for i in ids if int(i) in known}))
        return name, changes

    def write_shard_file(self, name: str, vectors: np.ndarray) -> None:
        """A shard's file, float16, written whole (a temporary file a kill leaves in shards/ is an orphan)."""
        with atomic_file(self.root / SHARDS / f"{name}.npy") as f:
            np.save(f, np.ascontiguousarray(vectors, dtype=np.float16))

    def add_imported(self, keys: Sequence[str], blocks: Iterable[np.ndarray], split: str,
                     files: Sequence[tuple[int, float] | None] | None = None, run_params: dict | None = None,
                     run_summary: dict | None = None) -> int | None:
        """Add vectors computed elsewhere under their own ids (`keys`), all or nothing.

        `blocks` yields unit-norm [b, d] arrays whose rows follow `keys`; each becomes
        a shard, and one transaction commits them all. An exception from `blocks` (a
        validation error) removes what was written and adds nothing. With `files` (one
        (size, mtime) or None per key), the keys are absolute image paths and are stored
        as paths, so `uncertainty`, `report` and path look-ups can open the images.
        With `run_params`, the same transaction records an "import" run, finished with
        `run_summary`, and its id is returned: the history has the import exactly when
        the vectors are in."""
        if split not in SPLITS:
            raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        column = "ext_id" if files is None else "path"
        held = self.find_keys(column, keys, ("status", "reason"))
        # a vector a lost shard took (VECTOR_LOST) may be imported again under its key: its row is reused
        lost = {k for k, (status, reason) in held.items() if status == "failed" and (reason or "").startswith(LOST_PREFIX)}
        clash = [k for k in held if k not in lost]
        if clash:
            raise InputError(f"{len(clash)} {'id' if files is None else 'path'}(s) already in the index, e.g. {clash[0]!r}")
        written: list[tuple[str, int, int]] = []  # (name, n, dim)
        try:
            for block in blocks:
                name = f"shard-{time.strftime('%Y%m%d')}-{uuid.uuid4().hex[:12]}"
                self.write_shard_file(name, block)
                written.append((name, len(block), block.shape[1]))
        except BaseException:
            for name, _, _ in written:
                (self.root / SHARDS / f"{name}.npy").unlink(missing_ok=True)
            raise
        assert sum(n for _, n, _ in written) == len(keys)
        stats = files if files is not None else [None] * len(keys)
        now = time.time()
        with self.transaction() as db:
            db.executemany("INSERT INTO shards(name, n, dim, created) VALUES (?,?,?,?)", ((w[0], w[1], w[2], now) for w in written))
            rows = [(e, split, *(st or (None, None)), name, r, now)
                    for e, st, (name, r) in zip(keys, stats, ((name, r) for name, n, _ in written for r in range(n)))]
            db.executemany(
                f"INSERT INTO images({column}, split, size, mtime, status, shard, row, added) VALUES (?,?,?,?,'embedded',?,?,?)",
                (row for row in rows if row[0] not in lost))
            db.executemany(  # a row mark-labeled moved keeps its split, as in sync_sources
                f"UPDATE images SET split=CASE WHEN labeled_at IS NULL THEN ? ELSE split END, size=?, mtime=?, "
                f"status='embedded', reason=NULL, shard=?, row=?, hash=NULL "
                f"WHERE {column}=?", ((*row[1:6], row[0]) for row in rows if row[0] in lost))
            self._bump_version()
            if run_params is not None:
                return db.execute("INSERT INTO runs(kind, params, summary, started, finished) VALUES ('import',?,?,?,?)",
                                  (json.dumps(run_params, sort_keys=True), json.dumps(run_summary or {}), now,
                                   time.time())).lastrowid
        return None

    def find_keys(self, column: str, keys: Sequence[str], fields: Sequence[str] = ()) -> dict[str, tuple]:
        """key -> the row's `fields`, for those of `keys` the catalog holds in `column`
        (ext_id or path), 500 keys per query."""
        assert column in ("ext_id", "path")
        found: dict[str, tuple] = {}
        cols = ", ".join((column, *fields))
        for chunk, marks in in_chunks(keys):
            found.update((r[0], r[1:]) for r in self.db.execute(f"SELECT {cols} FROM images WHERE {column} IN ({marks})", chunk))
        return found

    def existing_keys(self, column: str, keys: Sequence[str]) -> list[str]:
        """Those of `keys` that the catalog holds in `column` (ext_id or path)."""
        return list(self.find_keys(column, keys))

    # ------------------------------------------------------------------- vectors
    def shard(self, name: str) -> np.ndarray:
        """A shard's vectors, memory-mapped: float16 [n, d]."""
        path = self.root / SHARDS / f"{name}.npy"
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:
            raise IndexDamagedError(f"shard {path} is missing or damaged ({e or 'empty'}); {SHARD_ADVICE}") from None

    def listed_shard(self, name: str) -> np.ndarray:
        """shard(name), refused unless it holds float16 [n, d] as the shards table lists
        it: a file cut to fewer rows would otherwise fail later, as an IndexError."""
        X = self.shard(name)
        listed = self.db.execute("SELECT n, dim FROM shards WHERE name=?", (name,)).fetchone()
        if listed is not None and (not isinstance(X, np.ndarray) or X.dtype != np.float16 or X.shape != tuple(listed)):
            got = f"{X.dtype} {X.shape}" if isinstance(X, np.ndarray) else "an .npz archive"
            raise IndexDamagedError(f"shard {self.root / SHARDS / name}.npy is damaged (it holds {got}, the catalog says "
                                    f"float16 {tuple(listed)}); {SHARD_ADVICE}")
        return X

    def shard_problems(self) -> dict[str, str]:
        """Shards the catalog refers to that cannot be read as it describes them -> why.

        A shard is sound when its file loads as float16 [n, dim], n and dim as its row in
        `shards` says, dim the manifest's, and every catalog row pointing into it is below
        n. Only the .npy headers are read (memory maps), and one grouped query covers the
        rows (0.23 s for a synthetic catalog of a million images in 245 shards, warm cache)."""
        listed = {name: (n, d) for name, n, d in self.db.execute("SELECT name, n, dim FROM shards")}
        used = {name: (lo, hi) for name, lo, hi in self.db.execute(
            "SELECT shard, MIN(row), MAX(row) FROM images WHERE shard IS NOT NULL GROUP BY shard")}
        problems = {}
        for name in sorted(listed.keys() | used.keys()):
            if name not in listed:
                problems[name] = "the catalog's images point into it, but its shards table does not list it"
                continue
            n, d = listed[name]
            why = _shard_problem(self.root / SHARDS / f"{name}.npy", n, d, self.dim)
            lo, hi = used.get(name, (0, -1))
            if why is None and (lo < 0 or hi >= n):
                why = f"the catalog points at row {hi if hi >= n else lo} of its {n} rows"
            if why is not None:
                problems[name] = why
        return problems

    def repair_shards(self, reembed: bool) -> LostShards:
        """Find the missing or damaged shards (shard_problems) and drop them (drop_shards),
        warning about each: build-index (`reembed`) embeds their images again from their
        files; an index made by import-embeddings, or a merge target, records their
        vectors as lost. Without this a lost shard would be skipped as unchanged, and would
        fail every later read of the vectors."""
        problems = self.shard_problems()
        if not problems:
            return LostShards()
        again = ": its images are embedded again from their files" if reembed else ""
        for name, why in problems.items():
            log.warning("shard %s is missing or damaged (%s)%s", name, why, again)
        lost = self.drop_shards(list(problems), reembed)
        if lost.lost:
            log.warning("%d imported vector(s) were in those %d shard(s): recorded as failed (vector lost); import the "
                        "same files again with --skip-existing to put them back", lost.lost, len(problems))
        return lost

    def drop_shards(self, names: Sequence[str], reembed: bool = True) -> LostShards:
        """Take shards out of the catalog, in one transaction, and delete their files.

        Their images with a path go back to pending (shard, row and hash cleared), so
        build-index embeds them again from the files; their vectors imported under an id
        become failed (VECTOR_LOST). With `reembed=False` (an index made by
        import-embeddings, which embeds nothing) every row of those shards, with a path
        or not, becomes failed (VECTOR_LOST). vectors_version moves on when any image
        changed, so the FAISS index is rebuilt. A kill after the commit leaves the files
        as orphans, removed at the next open for writing."""
        assert self.writable
        with self.transaction() as db:
            db.execute("CREATE TEMP TABLE IF NOT EXISTS lost_shards(name TEXT PRIMARY KEY)")
            db.execute("DELETE FROM lost_shards")
            db.executemany("INSERT OR IGNORE INTO lost_shards VALUES (?)", ((n,) for n in names))
            requeued = 0
            if reembed:
                requeued = db.execute(
                    "UPDATE images SET status='pending', reason=NULL, shard=NULL, row=NULL, hash=NULL "
                    "WHERE path IS NOT NULL AND shard IN (SELECT name FROM lost_shards)").rowcount
            head, tail = VECTOR_LOST.split("{}")
            lost = db.execute(  # the rows left pointing into them
                "UPDATE images SET status='failed', reason=? || shard || ?, shard=NULL, row=NULL, hash=NULL "
                "WHERE shard IN (SELECT name FROM lost_shards)", (head, tail)).rowcount
            db.execute("DELETE FROM shards WHERE name IN (SELECT name FROM lost_shards)")
            db.execute("DELETE FROM lost_shards")
            if requeued or lost:
                self._bump_version()
        for name in names:
            (self.root / SHARDS / f"{name}.npy").unlink(missing_ok=True)
        return LostShards(tuple(names), requeued, lost)

    def embedded(self, split: str | None = None, block: int = 1 << 16) -> Layout:
        """Where the vectors of embedded images are, ordered by id. `split=None` means all.
        Read `block` rows at a time: a million rows as Python tuples would hold ~250 MB."""
        q = "SELECT id, shard, row FROM images WHERE status='embedded'"
        args: tuple = ()
        if split is not None:
            q += " AND split=?"
            args = (split,)
        cur = self.db.execute(q + " ORDER BY id", args)
        ids, shard_idx, row = [], [], []
        lookup: dict[str, int] = {}
        while chunk := cur.fetchmany(block):
            ids.append(np.fromiter((r[0] for r in chunk), dtype=np.int64, count=len(chunk)))
            shard_idx.append(np.fromiter((lookup.setdefault(r[1], len(lookup)) for r in chunk), dtype=np.int64,
                                         count=len(chunk)))
            row.append(np.fromiter((r[2] for r in chunk), dtype=np.int64, count=len(chunk)))
        empty = np.zeros(0, np.int64)
        ids_a = np.concatenate(ids) if ids else empty
        shard_a = np.concatenate(shard_idx) if shard_idx else empty
        names = sorted(lookup)  # shard numbers in name order
        remap = np.array([names.index(n) for n in lookup], np.int64)
        return Layout(ids_a, remap[shard_a] if len(shard_a) else empty, np.concatenate(row) if row else empty, names)

    def vectors(self, split: str | None = None, ids: np.ndarray | None = None,
                layout: Layout | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Gather embedded vectors into one float16 array [n, d], one shard at a time.

        Returns (ids, X) ordered by id. With `ids`, only those (they must be embedded),
        in the order given. A caller that gathers block after block passes the
        `layout` it read once with `embedded(split)`.
        """
        lay = self.embedded(split) if layout is None else layout
        pos = None
        if ids is not None:
            all_ids = lay.ids
            pos = np.searchsorted(all_ids, ids)
            ok = (pos < len(all_ids)) & (all_ids[np.minimum(pos, len(all_ids) - 1)] == ids) if len(all_ids) else np.zeros(len(ids), bool)
            if not np.all(ok):
                raise InputError(f"id {int(np.asarray(ids)[~ok][0])} has no vector")
        return self._gather(lay, pos)

    def _gather(self, lay: Layout, pos: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float16 [n, d]) of the layout's rows at positions `pos` (None: all), one shard at a time."""
        all_ids, shard_idx, row = lay.ids, lay.shard, lay.row
        if pos is not None:
            all_ids, shard_idx, row = all_ids[pos], shard_idx[pos], row[pos]
        d = self.dim or 0
        if len(all_ids) and not d:
            raise IndexDamagedError(f"{self.root / MANIFEST} is missing or has no dim, but the catalog holds vectors; "
                                    f"{RESTORE}")
        out = np.empty((len(all_ids), d), dtype=np.float16)  # [n, d]
        for k, name in enumerate(lay.names):
            sel = np.flatnonzero(shard_idx == k)
            if not len(sel):
                continue
            src = self.listed_shard(name)
            r = row[sel]
            # runs where both the output positions and the shard rows are consecutive
            # (the usual case: ids and rows were assigned in the same order) are plain copies
            brk = np.flatnonzero((np.diff(sel) != 1) | (np.diff(r) != 1)) + 1
            starts, ends = np.r_[0, brk], np.r_[brk, len(sel)]
            if len(starts) > len(sel) // 64:  # scattered: one fancy-indexed gather
                out[sel] = src[r]
                continue
            for a, b in zip(starts.tolist(), ends.tolist()):
                out[sel[a]:sel[a] + (b - a)] = src[r[a]:r[a] + (b - a)]
        return all_ids, out

    def has_table(self, name: str) -> bool:
        """Whether the catalog has table `name` (one opened read-only by an older version
        may lack the newer tables: the schema is added only when opened for writing)."""
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None

    def excluded_ids(self) -> np.ndarray:
        """Catalog ids `novelty exclude` named, sorted (an index from before the table: none)."""
        if not self.has_table("excluded"):
            return np.zeros(0, np.int64)
        rows = self.db.execute("SELECT image FROM excluded ORDER BY image").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def _pool_layout(self) -> tuple[Layout, np.ndarray]:
        """The embedded unlabeled images' layout, and which of them select may pick (not excluded)."""
        lay = self.embedded("unlabeled")
        return lay, ~np.isin(lay.ids, self.excluded_ids())

    def pool_ids(self) -> tuple[np.ndarray, int]:
        """The catalog ids select may pick: embedded, unlabeled, not excluded (sorted).
        -> (ids, how many embedded unlabeled images are excluded)."""
        lay, keep = self._pool_layout()
        return lay.ids[keep], int((~keep).sum())

    def pool(self) -> tuple[np.ndarray, np.ndarray, int]:
        """The unlabeled vectors select may pick (pool_ids), from one read of the layout.
        -> (ids, float16 [n, d], how many embedded unlabeled images are excluded)."""
        lay, keep = self._pool_layout()
        excluded = int((~keep).sum())
        return (*self._gather(lay, np.flatnonzero(keep) if excluded else None), excluded)

    def iter_blocks(self, split: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids [b], float16 vectors [b, d]) shard by shard, never all at once."""
        lay = self.embedded(split)
        all_ids, shard_idx, row = lay.ids, lay.shard, lay.row
        order = np.lexsort((row, shard_idx))
        bounds = np.flatnonzero(np.diff(shard_idx[order])) + 1
        for sel in np.split(order, bounds) if len(order) else []:
            name = lay.names[shard_idx[sel[0]]]
            yield all_ids[sel], np.asarray(self.listed_shard(name)[row[sel]])

    # -------------------------------------------------------------------- lookup
    def resolve(self, keys: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """Map user-given ids or paths to catalog ids. Returns (ids, unknown keys).

        A key is looked up as an imported id, then as a catalog id, then as a path
        (absolute, or relative to the current directory): as written, then without
        the spaces around it (a file name may start or end with a space). A catalog id
        names only an image shown by it (one without an imported id): in an index of
        imported ids 1000.., "5" is unknown, not the fifth row.
        """
        found, unknown = [], []
        for given in keys:
            row = None
            for key in dict.fromkeys((given, given.strip())):
                row = self.db.execute("SELECT id FROM images WHERE ext_id=?", (text_key(key),)).fetchone()
                if row is None and key.isdigit():
                    row = self.db.execute("SELECT id FROM images WHERE id=? AND ext_id IS NULL", (int(key),)).fetchone()
                if row is None and key:
                    row = self.db.execute("SELECT id FROM images WHERE path=?", (text_key(os.path.abspath(key)),)).fetchone()
                if row is not None:
                    break
            if row is None:
                unknown.append(given.strip())
            else:
                found.append(row[0])
        return np.asarray(found, dtype=np.int64), unknown

    def follow_moves(self, ids: np.ndarray, said: str | None = None) -> tuple[np.ndarray, int]:
        """Rows recorded as moved (_content: their bytes turned up at a new path) stand for
        the row at that path, to the end of a chain of moves, so a list or selection made
        before files were renamed still names the images. A move is followed only while
        the new path holds the same bytes: a name since given to another picture is not
        the image. With `said` (what the ids are, e.g. "picks"), a move is warned about.
        -> (ids, how many were moved)."""
        ids = np.asarray(ids, dtype=np.int64).copy()
        followed = np.zeros(len(ids), bool)
        prefixes = (_content.MOVED_PREFIX, _content.LINKED_PREFIX)
        for _ in range(16):  # a chain of renames; a cycle cannot form (a move needs the old file gone)
            where: dict[int, tuple[str, str]] = {}
            for chunk, marks in in_chunks(ids.tolist()):
                where.update((i, (r, h)) for i, r, h in self.db.execute(
                    f"SELECT id, reason, hash FROM images WHERE status = 'failed' AND (reason LIKE ? OR reason LIKE ?) "
                    f"AND id IN ({marks})", (*(p + "%" for p in prefixes), *chunk)))
            to = {}
            for i, (reason, h) in where.items():
                path = next(reason[len(p):] for p in prefixes if reason.startswith(p))
                row = self.db.execute("SELECT id, hash FROM images WHERE path = ?", (path,)).fetchone()
                # a path linked on its first scan was never read, so holds no hash: it is the file the other path reads
                same = row is not None and (row[1] == h or (h is None and reason.startswith(_content.LINKED_PREFIX)))
                if same and row[0] != i:
                    to[i] = row[0]
            if not to:
                break
            for k, i in enumerate(ids.tolist()):
                if i in to:
                    ids[k], followed[k] = to[i], True
        moved = int(followed.sum())
        if moved and said:
            log.warning("%d of the %s have moved since (renamed, their folder moved, or indexed under another path "
                        "to the same file): taken at their new paths",
                        moved, said)
        return ids, moved

    def describe(self, ids: Sequence[int]) -> dict[int, tuple[str, str | None, str]]:
        """id -> (display id, path, split)."""
        out: dict[int, tuple[str, str | None, str]] = {}
        for chunk, marks in in_chunks([int(i) for i in ids]):
            for i, e, p, s in self.db.execute(f"SELECT id, ext_id, path, split FROM images WHERE id IN ({marks})", chunk):
                out[i] = (display_id(i, e), p, s)
        return out

    # --------------------------------------------------------------------- stats
    def counts(self) -> dict:
        by = {(s, st): n for s, st, n in self.db.execute("SELECT split, status, COUNT(*) FROM images GROUP BY split, status")}
        failed = dict(self.db.execute(
            "SELECT CASE WHEN instr(reason, ':') > 0 THEN substr(reason, 1, instr(reason, ':') - 1) ELSE reason END AS r, "
            "COUNT(*) FROM images WHERE status='failed' GROUP BY r ORDER BY COUNT(*) DESC"
        ).fetchall())
        return {"by_split_status": by, "failed_by_reason": failed}

    def duplicate_hashes(self) -> tuple[int, int]:
        """(groups, images) of exact byte duplicates among embedded files."""
        row = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(c), 0) FROM (SELECT COUNT(*) c FROM images "
            "WHERE hash IS NOT NULL AND status='embedded' GROUP BY hash HAVING c > 1)"
        ).fetchone()
        return int(row[0]), int(row[1])

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())

    # ---------------------------------------------------------------------- runs
    def start_run(self, kind: str, params: dict) -> int:
        with self.transaction() as db:
            return db.execute(
                "INSERT INTO runs(kind, params, summary, started) VALUES (?,?,?,?)",
                (kind, json.dumps(params, sort_keys=True), _owner(), time.time())
            ).lastrowid

    def claim_run(self, run_id: int) -> None:
        """Mark an unfinished run as this process's, when it resumes one: `info` then says
        it is running, not how it stopped before."""
        with self.transaction() as db:
            db.execute("UPDATE runs SET summary=? WHERE id=? AND finished IS NULL", (_owner(), run_id))

    def writer(self) -> int | None:
        """The pid of the process that holds this index's write lock now (0 when the
        system does not say, as a network file system may not), None when nobody writes.
        The kernel is asked (F_GETLK) without taking the lock, so a writer starting at
        the same moment is never turned away."""
        try:
            fd = os.open(self.root / ".lock", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None  # no lock file: nothing ever wrote here, or it cannot be read
        try:
            return _lock_holder(fd)
        finally:
            os.close(fd)

    def finish_run(self, run_id: int, summary: dict) -> None:
        with self.transaction() as db:
            db.execute("UPDATE runs SET summary=?, finished=? WHERE id=?", (json.dumps(summary, default=str), time.time(), run_id))

    @contextlib.contextmanager
    def recording_stop(self, run_id: int) -> Iterator[None]:
        """A run that raises (an error, Ctrl-C) stays unfinished, so it resumes, with the
        reason in its summary for `info`; a killed one has no reason to leave."""
        try:
            yield
        except BaseException as e:
            reason = ("SIGTERM" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
                      if isinstance(e, KeyboardInterrupt) else first_line(e, limit=160))
            try:
                with self.transaction() as db:
                    db.execute("UPDATE runs SET summary=? WHERE id=? AND finished IS NULL",
                               (json.dumps({"stopped": reason}), run_id))
            except Exception:  # a full disk or a lost lock must not hide the error that stopped the run
                log.debug("could not record why run %d stopped", run_id, exc_info=True)
            raise


# struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid (native alignment pads it to 32 bytes)
_FLOCK = "hhqqi4x"


def _lock_holder(fd: int) -> int | None:
    """The pid holding a write lock on the open file `fd` (0: the system does not say),
    None when none is held or the system cannot tell."""
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        l_type, *_, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    except OSError:
        return None
    return None if l_type == fcntl.F_UNLCK else max(int(pid), 0)


def _owner() -> str:
    """An unfinished run's summary until it finishes or stops: which process runs it, so
    `info` can tell a run still going from a killed one (see Store.writer)."""
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname()})


def _shard_problem(path: Path, n: int, d: int, dim: int | None) -> str | None:
    """Why the shard file at `path` is not float16 [n, d] with d == dim (when the manifest
    has one); None when it is.
    Reads the header only. An error that says nothing about the file's contents (no
    permission, an I/O error) is raised: the vectors may well be there."""
    try:
        X = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        return "the file is missing"
    except (ValueError, EOFError) as e:  # a cut header, garbage, an empty file, or data cut short
        if "mmap length is greater than file size" in str(e):  # numpy's words for a file cut after its header
            return "the file is damaged: it is shorter than its header says (cut short)"
        return f"the file is damaged: {e or 'empty'}"
    except OSError as e:
        raise IndexDamagedError(f"cannot read shard {path} ({e.strerror or e}); make it readable and run again") from None
    if not isinstance(X, np.ndarray):  # garbage that happens to read as an .npz archive
        X.close()
        return "the file is damaged: not a .npy array"
    dtype, shape = X.dtype, X.shape
    del X  # closes the map
    if dtype != np.float16 or shape != (n, d) or d != (dim or d):
        return f"the file holds {dtype} {shape}, the catalog says float16 ({n}, {d}) of dim {dim}"
    return None


STORAGE_TROUBLE = ("disk i/o error", "database or disk is full", "unable to open database file",
                   "attempt to write a readonly database")


def storage_trouble(e: sqlite3.Error) -> bool:
    """Whether SQLite failed because of the disk or the system (full, I/O, permissions)
    rather than because the catalog file is damaged."""
    return isinstance(e, sqlite3.OperationalError) and any(m in str(e).lower() for m in STORAGE_TROUBLE)


def same_encoder(a: dict, b: dict) -> bool:
    """Whether two manifests' encoders give the same vectors. A model config file counts
    by its contents (config_sha256), not its name: two configs called mycfg.json differ,
    and a renamed copy is the same model. A manifest from before config_sha256 was
    recorded is compared by name, as it was then."""
    def model(e: dict, other: dict):
        return e["config_sha256"] if "config_sha256" in e and "config_sha256" in other else e.get("model")

    def weights(e: dict):
        return e.get("weights_sha256") or e.get("pretrained")

    return a.get("kind") == b.get("kind") and model(a, b) == model(b, a) and weights(a) == weights(b)


def _describe(enc: dict, dim: int) -> str:
    weights = f"weights {enc['pretrained']!r}, " if enc.get("pretrained") is not None else ""
    config = f"config sha256 {enc['config_sha256'][:12]}, " if enc.get("config_sha256") else ""
    return f"{enc.get('kind')} model {enc.get('model')!r} ({config}{weights}dim {dim})"


def create_store(root: Path) -> Store:
    """Open an index directory for writing, creating it when needed."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise IndexMissingError(f"{root} exists and is not a directory")
    try:
        made = _make_dirs(root)
    except OSError as e:
        raise IndexReadOnlyError(f"cannot create the index {root} ({e.strerror or e})") from None
    try:
        store = Store(root, writable=True, create=True)  # the lock first, then the catalog
    except BaseException:  # refused or stopped: the folders made for it go too, if nothing else is in them
        _remove_made(made)
        raise
    store.made_dirs = store.made_dirs or made
    return store


def _remove_made(dirs: Sequence[Path]) -> None:
    """The folders _make_dirs made (innermost first), those still empty."""
    for d in dirs:
        with contextlib.suppress(OSError):
            d.rmdir()


def _make_dirs(root: Path) -> list[Path]:
    """mkdir -p root. -> the folders it made, innermost first (another process may make
    some of them at the same moment: those are not ours)."""
    missing = []
    p = root.absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    made = []
    for d in reversed(missing):
        try:
            d.mkdir()
            made.append(d)
        except FileExistsError:
            pass
    return made[::-1]


def open_store(root: Path, writable: bool = False) -> Store:
    """Open an existing index directory; a one-line error when there is none."""
    root = Path(root)
    if not (root / CATALOG).exists():
        raise IndexMissingError(f"no index at {root}: run `novelty build-index` (or import-embeddings) first")
    return Store(root, writable=writable)
