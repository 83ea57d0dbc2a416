"""Close the labeling loop: read a selection back, mark its images labeled (one
transaction, all or nothing), keep the images labelers skipped out of later selections
(exclude), describe the history of selections and what became of their picks, and
write a recorded selection run again.

A selection file or list names images by the id `select` wrote (an imported id or the
catalog id) or by path. It is tied to the select run whose picks it matches: the same
images in the same order, else the latest run whose picks contain them all (a file
trimmed to what was actually labeled).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, InputError
from .export import COLUMNS
from .sources import list_entries
from .store import Store, open_store

log = logging.getLogger(__name__)

SELECTION_FORMATS = (".csv", ".jsonl", ".parquet")


def _rows_from_file(path: Path) -> list[dict]:
    ext = path.suffix.lower()
    if ext == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: files saved by spreadsheets
            return list(csv.DictReader(f))
    if ext == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n}: not a JSON line: {e.msg}") from None
        return rows
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError("reading .parquet needs pyarrow: pip install -c constraints.txt 'novelty[parquet]'") from None
        try:
            return pq.read_table(path).to_pylist()
        except (OSError, ValueError) as e:  # pyarrow's ArrowIOError / ArrowInvalid
            raise InputError(f"{path} is not a readable Parquet file: {e}") from e
    raise InputError(f"cannot read selection {path}: the extension must be one of {', '.join(SELECTION_FORMATS)}")


def read_selection(path: Path) -> list[dict]:
    """Rows of a selection file written by `select` or `export` (.csv, .jsonl, .parquet)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"selection file {path} does not exist")
    try:
        rows = _rows_from_file(path)
    except UnicodeDecodeError:
        raise InputError(f"selection file {path} is not UTF-8 text") from None
    if not rows:
        raise InputError(f"selection file {path} holds no rows")
    if not ({"id", "path"} & set(rows[0])):
        raise InputError(f"selection file {path} needs an id or a path column (got {', '.join(map(str, rows[0]))})")
    return rows


def read_list(path: Path, indexed: Callable[[str], bool]) -> list[str]:
    """Ids or paths, one a line, by the rules of sources.list_entries: blank lines and
    # comments are skipped, unless `indexed(line)` says the line as written names an
    image (a file name may start with # or a space)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a list file of ids or paths, one a line")
    if not path.is_file():
        raise InputError(f"list file {path} does not exist")
    try:
        keys = list(list_entries(path.read_text(encoding="utf-8-sig").splitlines(), indexed))
    except UnicodeDecodeError:
        raise InputError(f"list file {path} is not UTF-8 text") from None
    if not keys:
        raise InputError(f"list file {path} holds no ids")
    head = [k.strip().lower() for k in keys[0].split(",")]
    if "," in keys[0] and {"id", "path"} & set(head) and not indexed(keys[0]):  # a CSV header, not an id
        raise InputError(f"{path} is a selection file (its first line is a CSV header); pass it as --selection {path}")
    return keys


def resolve_keys(store: Store, keys: list[str], fallbacks: list[str | None] | None = None, then: str = "") -> np.ndarray:
    """Catalog ids of `keys`, in order; a key that is unknown is tried again as its
    fallback (a path). Unknown keys raise one InputError naming a few of them."""
    out, unknown = [], []
    for n, key in enumerate(keys):
        key = "" if key is None else str(key)
        found, _ = store.resolve([key]) if key else (np.empty(0), None)
        if not len(found) and fallbacks and fallbacks[n]:
            found, _ = store.resolve([fallbacks[n]])
        if len(found):
            out.append(int(found[0]))
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise InputError(f"{len(unknown)} of {len(keys)} id(s) are not in the index: {shown}{'; ' + then if then else ''}")
    return np.asarray(out, dtype=np.int64)


def selection_ids(store: Store, rows: list[dict], then: str = "") -> np.ndarray:
    """Catalog ids of a selection file's rows. A row whose id names another image than its
    path (a file written by another index) is refused: trusting either would move the
    wrong image."""
    keys = [r.get("id") if r.get("id") not in (None, "") else r.get("path") for r in rows]
    ids = resolve_keys(store, keys, [r.get("path") or None for r in rows], then)
    known = store.describe(ids)
    for r, i in zip(rows, ids.tolist()):
        given, stored = r.get("path") or None, known[i][1]
        if given and stored and os.path.abspath(given) != stored:
            raise InputError(f"row with id {r.get('id')!r} names {given}, but id {r.get('id')} in this index is {stored}; "
                             f"was the file written for another index?")
    return ids


def match_select_run(store: Store, ids: np.ndarray) -> tuple[int | None, bool]:
    """-> (the select run these images came from, whether its picks match exactly, in order)."""
    if not len(ids):
        return None, False
    cands = [r for (r,) in store.db.execute(
        "SELECT DISTINCT p.run FROM picks p JOIN runs r ON r.id = p.run WHERE r.kind='select' AND p.image=? "
        "ORDER BY p.run DESC", (int(ids[0]),))]
    want = [int(i) for i in ids]
    containing = None
    for run in cands:
        picks = [i for (i,) in store.db.execute("SELECT image FROM picks WHERE run=? ORDER BY rank", (run,))]
        if picks == want:
            return run, True
        if containing is None and set(want) <= set(picks):
            containing = run
    return containing, False


# ---------------------------------------------------------------------- mark-labeled
def check_one_source(list_file: Path | None, selection: Path | None) -> None:
    if (list_file is None) == (selection is None):
        raise ConfigError("give a LIST file of ids or paths, or --selection FILE (one of them)")


def _fill_named(db, ids: np.ndarray) -> None:
    """The temp table chosen_ids(image) holds `ids`, for one statement's IN (SELECT ...)."""
    db.execute("CREATE TEMP TABLE IF NOT EXISTS chosen_ids(image INTEGER PRIMARY KEY)")
    db.execute("DELETE FROM chosen_ids")
    db.executemany("INSERT INTO chosen_ids VALUES (?)", ((int(i),) for i in ids))


def named_ids(store: Store, list_file: Path | None, selection: Path | None) -> tuple[np.ndarray, dict]:
    """Catalog ids named by a list file or a selection file, in order, and the source for
    the run's params. Any unknown id raises, naming it: nothing is changed."""
    if selection is not None:
        return (selection_ids(store, read_selection(selection), "nothing was changed"),
                {"selection": str(Path(selection).resolve())})
    base = Path(list_file).parent

    def indexed(key: str) -> bool:
        return bool(len(store.resolve([key])[0]) or (not os.path.isabs(key) and len(store.resolve([str(base / key)])[0])))

    keys = read_list(list_file, indexed)
    ids = resolve_keys(store, keys, [None if os.path.isabs(k) else str(base / k) for k in keys],
                       f"nothing was changed (a relative path is read against the current folder, then "
                       f"against the list's folder {base.resolve()})")
    return ids, {"list": str(Path(list_file).resolve())}


def followed_ids(store: Store, named: np.ndarray, source: dict) -> np.ndarray:
    """`named` with each image that moved since (renamed, its folder moved) taken at its
    new path, and warned about; the run's params say how many."""
    ids, followed = store.follow_moves(named, said="images named")
    if followed:
        source["followed_moves"] = followed
    return ids


@dataclass
class MarkResult:
    run: int  # the mark-labeled run
    requested: int  # distinct images named
    moved: int  # unlabeled -> labeled now (with undo: labeled -> unlabeled)
    already: int  # labeled before (with undo: unlabeled before)
    labeled_by: int | None  # the select run they came from
    from_sources: int = 0  # with undo: labeled because a --labeled source lists them, left labeled
    no_vector: int = 0  # of those marked, images with no vector now (deleted or failed): no center until embedded
    no_vector_example: str | None = None  # one of them: "path: reason"


def mark_labeled(root: Path, list_file: Path | None = None, selection: Path | None = None, undo: bool = False) -> MarkResult:
    """Move the named images from unlabeled to labeled, in one transaction. An unknown
    id changes nothing; images already labeled are counted, not refused (idempotent).
    Splits are not vectors: the FAISS index stays valid and vectors_version is kept.

    With `undo`, move images that mark-labeled moved back to unlabeled (a mistake in
    the list, a label rejected by review). Images labeled because a --labeled source
    lists them stay labeled: their split is the sources' word, changed there."""
    check_one_source(list_file, selection)
    with open_store(root, writable=True) as store:
        named, source = named_ids(store, list_file, selection)
        by, exact = match_select_run(store, named)
        ids = followed_ids(store, named, source)
        distinct = np.unique(ids)
        now = time.time()
        with store.transaction() as db:
            _fill_named(db, distinct)
            from_sources = 0
            if undo:
                from_sources = db.execute("SELECT COUNT(*) FROM images WHERE split='labeled' AND labeled_at IS NULL "
                                          "AND id IN (SELECT image FROM chosen_ids)").fetchone()[0]
                moved = db.execute("UPDATE images SET split='unlabeled', labeled_at=NULL, labeled_by=NULL WHERE "
                                   "split='labeled' AND labeled_at IS NOT NULL AND id IN (SELECT image FROM chosen_ids)").rowcount
                by = None
            else:
                moved = db.execute("UPDATE images SET split='labeled', labeled_at=?, labeled_by=? "
                                   "WHERE split='unlabeled' AND id IN (SELECT image FROM chosen_ids)", (now, by)).rowcount
            blind = [] if undo else db.execute(
                "SELECT COALESCE(path, ext_id), reason FROM images WHERE status != 'embedded' "
                "AND id IN (SELECT image FROM chosen_ids) ORDER BY id").fetchall()
            db.execute("DELETE FROM chosen_ids")
            already = len(distinct) - moved - from_sources
            summary = {"requested": len(distinct), "moved": moved, "already": already, "labeled_by": by,
                       "exact_match": exact, "from_sources": from_sources}
            run = db.execute("INSERT INTO runs(kind, params, summary, started, finished) VALUES (?, ?, ?, ?, ?)",
                             ("unmark" if undo else "mark-labeled", json.dumps(source, sort_keys=True), json.dumps(summary),
                              now, time.time())).lastrowid
    log.info("%s %d image(s) (%d already were)", "moved back" if undo else "marked", moved, already)
    return MarkResult(run, len(distinct), moved, already, by, from_sources, len(blind),
                      f"{blind[0][0]}: {blind[0][1] or 'not embedded yet'}" if blind else None)


# --------------------------------------------------------------------------- exclude
@dataclass
class ExcludeResult:
    run: int  # the exclude (or include) run
    requested: int  # distinct images named
    changed: int  # excluded now (with undo: excluded no more)
    already: int  # excluded before (with undo: not excluded before)
    labeled: int  # of the images named, those labeled now (not in the pool while they are)


def exclude(root: Path, list_file: Path | None = None, selection: Path | None = None, reason: str | None = None,
            undo: bool = False) -> ExcludeResult:
    """Keep the named images out of every later selection (an image the labelers could
    not label: blank, private, out of scope), in one transaction; an unknown id changes
    nothing. select leaves them out of its pool (its covering radius and redundancy are
    then over the images it may pick); their vectors stay, so neighbors, duplicates and
    report still show them. With `undo`, they are candidates again."""
    check_one_source(list_file, selection)
    if reason is not None and undo:
        raise ConfigError("--reason goes with exclude, not with --undo")
    if reason is not None and (not reason.strip() or not reason.isprintable()):
        raise ConfigError("--reason must be one line of printable text")
    with open_store(root, writable=True) as store:
        named, source = named_ids(store, list_file, selection)
        ids = followed_ids(store, named, source)
        distinct = np.unique(ids)
        now = time.time()
        with store.transaction() as db:
            _fill_named(db, distinct)
            labeled = db.execute("SELECT COUNT(*) FROM images WHERE split='labeled' AND id IN (SELECT image FROM chosen_ids)"
                                 ).fetchone()[0]
            params = {**source, **({"reason": reason} if reason else {})}
            run = db.execute("INSERT INTO runs(kind, params, started) VALUES (?, ?, ?)",
                             ("include" if undo else "exclude", json.dumps(params, sort_keys=True), now)).lastrowid
            if undo:
                changed = db.execute("DELETE FROM excluded WHERE image IN (SELECT image FROM chosen_ids)").rowcount
            else:
                changed = db.execute("INSERT OR IGNORE INTO excluded(image, reason, run, at) SELECT image, ?, ?, ? FROM chosen_ids",
                                     (reason, run, now)).rowcount
            db.execute("DELETE FROM chosen_ids")
            summary = {"requested": len(distinct), "changed": changed, "already": len(distinct) - changed, "labeled": labeled}
            db.execute("UPDATE runs SET summary=?, finished=? WHERE id=?", (json.dumps(summary), time.time(), run))
    log.info("%s %d image(s) (%d already were)", "included" if undo else "excluded", changed, len(distinct) - changed)
    return ExcludeResult(run, len(distinct), changed, len(distinct) - changed, labeled)


def excluded_by_reason(store: Store) -> dict[str, int]:
    """Excluded images select would otherwise pick (embedded, unlabeled), by reason ('' for
    none given), most first: the count select's summary gives."""
    if not store.has_table("excluded"):
        return {}
    return dict(store.db.execute(
        "SELECT COALESCE(e.reason, ''), COUNT(*) FROM excluded e JOIN images i ON i.id = e.image "
        "WHERE i.split = 'unlabeled' AND i.status = 'embedded' GROUP BY 1 ORDER BY 2 DESC").fetchall())


# --------------------------------------------------------------------------- history
def _day(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "?"


def run_notes(store: Store, run_ids: list[int]) -> dict[int, str]:
    """One line per run for `info`: what it did, for a selection what became of its picks,
    and for a run that did not finish why it stopped (an error or Ctrl-C recorded it),
    that it is running now, or that it was killed."""
    notes: dict[int, str] = {}
    writer = store.writer()
    running = (writer, _running_run(store, writer))
    for rid in run_ids:
        row = store.db.execute("SELECT kind, summary, finished FROM runs WHERE id=?", (int(rid),)).fetchone()
        if row is None:
            continue
        kind, s, finished = row[0], json.loads(row[1]) if row[1] else {}, row[2]
        s = s if isinstance(s, dict) else {}
        if kind == "select":
            n = s["picks"] if "picks" in s else store.db.execute("SELECT COUNT(*) FROM picks WHERE run=?", (rid,)).fetchone()[0]
            # by labeled_by, not by the picks' rows: a pick marked after it moved is marked at its new row
            marked, when = store.db.execute("SELECT COUNT(*), MAX(labeled_at) FROM images WHERE labeled_by=? "
                                            "AND labeled_at IS NOT NULL", (rid,)).fetchone()
            notes[rid] = (f"{s.get('strategy', '?')} {n} picks" + (f" — {marked} marked labeled on {_day(when)}" if marked else "")
                          + (" (its files were not written: export --run to write them)" if s.get("files_written") is False
                             else ""))
        elif kind == "mark-labeled":
            notes[rid] = (f"{s.get('moved', 0)} moved to labeled" + (f" (picks of #{s['labeled_by']})" if s.get("labeled_by") else "")
                          + (f", {s['already']} already labeled" if s.get("already") else ""))
        elif kind == "unmark":
            notes[rid] = (f"{s.get('moved', 0)} moved back to unlabeled"
                          + (f", {s['from_sources']} left labeled (a --labeled source)" if s.get("from_sources") else ""))
        elif kind in ("exclude", "include") and "changed" in s:
            notes[rid] = f"{s['changed']} {kind}d" + (f", {s['already']} already were" if s.get("already") else "")
        elif kind == "build" and "embedded" in s:
            notes[rid] = f"{s['embedded']} embedded, {s.get('failed', 0)} failed"
        elif kind == "import" and "imported" in s:
            notes[rid] = f"{s['imported']} vectors"
        elif kind == "merge" and "added" in s:
            notes[rid] = f"{s['added']} added from {s.get('path')}" + (f" (part {', '.join(s['held'])})" if s.get("held") else "")
        elif kind == "uncertainty" and "scored" in s:  # with_score: the whole run's, a resumed one's included
            notes[rid] = f"{s.get('with_score', s['scored'])} scored"
        if not finished:
            tail = f"(stopped: {s['stopped']})" if s.get("stopped") else _unfinished(s, rid, running)
            notes[rid] = f"{notes[rid]}  {tail}" if notes.get(rid) else tail
    return notes


def _running_run(store: Store, pid: int | None) -> int | None:
    """The run that `pid`, the write lock's holder, is running, if it is on this host."""
    if not pid:
        return None
    host = socket.gethostname()
    for rid, summary in store.db.execute("SELECT id, summary FROM runs WHERE finished IS NULL ORDER BY id DESC"):
        s = json.loads(summary) if summary else {}
        if isinstance(s, dict) and s.get("pid") == pid and s.get("host") == host:
            return int(rid)  # the newest one: an older run of a reused pid was killed
    return None


def _unfinished(s: dict, rid: int, running: tuple[int | None, int | None]) -> str:
    """Why a run has not finished, when it recorded no reason: the write lock's holder
    runs it now, or it was killed (the lock is free, or another process holds it)."""
    writer, run = running
    if run == rid:
        return f"(running now: pid {writer})"
    if writer is not None and "pid" not in s:  # a run from before runs named their process
        return "(not finished: killed, or still running)"
    if writer is not None and s.get("host") != socket.gethostname():
        return f"(not finished: killed, or still running on {s.get('host')})"
    return "(not finished: killed)"


# ---------------------------------------------------------------------------- export
def select_run(store: Store, run: int | None) -> tuple[int, dict, dict]:
    """-> (run id, params, summary) of a recorded selection; None means the latest."""
    q = "SELECT id, kind, params, summary FROM runs WHERE kind='select' AND finished IS NOT NULL ORDER BY id DESC LIMIT 1"
    row = store.db.execute(q).fetchone() if run is None else store.db.execute(
        "SELECT id, kind, params, summary FROM runs WHERE id=?", (int(run),)).fetchone()
    if row is None or row[1] != "select":
        known = [str(r) for (r,) in store.db.execute("SELECT id FROM runs WHERE kind='select' ORDER BY id DESC LIMIT 10")]
        if run is None or not known:
            raise InputError(f"index {store.root} has no recorded selection; run `novelty select` first")
        raise InputError(f"run #{run} is not a selection run; recent selection runs: {', '.join('#' + k for k in known)}")
    return row[0], json.loads(row[2] or "{}"), json.loads(row[3] or "{}")


def run_rows(store: Store, run: int, summary: dict) -> list[dict]:
    """Rows of a recorded selection in export.COLUMNS. Rank, id, path and priority are
    stored; uncertainty comes from the uncertainty run the selection used. novelty,
    nearest_labeled_* and labeled_neighbors are recomputed against the labeled set as
    it is now less this run's own picks (once marked, they are not their own
    neighbours); distance_at_pick is not stored and is left empty."""
    from .inspect import knn_blocks

    picks = store.db.execute("SELECT rank, image, priority FROM picks WHERE run=? ORDER BY rank", (run,)).fetchall()
    image, moved = store.follow_moves(np.array([p[1] for p in picks], dtype=np.int64), said="picks")
    if moved:  # written at the paths the images have now
        picks = [(rank, int(i), priority) for (rank, _, priority), i in zip(picks, image)]
    meta = store.describe(image)
    u: dict[int, float] = {}
    urun = (summary.get("uncertainty") or {}).get("run")
    if urun is not None:
        u = dict(store.db.execute("SELECT image, value FROM uncertainty WHERE run=? AND value IS NOT NULL", (urun,)).fetchall())
    embedded = image[np.isin(image, store.embedded().ids)]
    radius = summary.get("radius")
    near: dict[int, tuple[float, int, int | None]] = {}
    if len(embedded):
        q_ids, Q = store.vectors(ids=np.unique(embedded))
        D, I, count = knn_blocks(store, Q, 1, "labeled", exclude=image, radius=radius)
        near = {int(i): (float(D[n, 0]), int(I[n, 0]), None if count is None else int(count[n])) for n, i in enumerate(q_ids)}
    lab_meta = store.describe([v[1] for v in near.values() if v[1] >= 0])
    rows = []
    for rank, i, priority in picks:
        d, li, c = near.get(i, (np.inf, -1, None))
        rows.append({
            "rank": rank, "id": meta[i][0], "path": meta[i][1], "priority": priority,
            "novelty": d if li >= 0 else None, "uncertainty": u.get(i),
            "nearest_labeled_id": lab_meta[li][0] if li >= 0 else None,
            "nearest_labeled_distance": d if li >= 0 else None,
            "labeled_neighbors": c, "distance_at_pick": None,
        })
    return rows


def export_run(root: Path, run: int | None, out: Path, image_root: Path | None = None) -> tuple[int, int, Path, int]:
    """Write a recorded selection again (and its Label Studio file).
    -> (run, rows, that file, images outside `image_root`)."""
    from .export import get_writer, write_selection

    get_writer(out)  # a bad extension fails before any work
    with open_store(root) as store:
        rid, _, summary = select_run(store, run)
        rows = run_rows(store, rid, summary)
    assert all(set(r) == set(COLUMNS) for r in rows)
    return rid, len(rows), *write_selection(out, rows, image_root)
