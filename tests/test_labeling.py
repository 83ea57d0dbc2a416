"""mark-labeled, the labeling history in `info`, and export of a recorded selection,
through the CLI; nearest-labeled values checked against brute-force numpy."""
import csv
import json
import shutil

import numpy as np
import pytest

from novelty import vectors
from novelty.export import write_selection
from novelty.records import save_selection
from novelty.store import open_store
from tests.conftest import TINY, run, unit



def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def record_selection(idx, budget, out=None, radius=0.3):
    """A 'novelty' selection written here with numpy (no kcenter needed): the `budget`
    unlabeled images farthest from the labeled set, recorded as a select run with its
    exact covering-radius trace. -> (run, picked catalog ids, rows)."""
    with open_store(idx, writable=True) as st:
        pool_ids, P = st.vectors("unlabeled")
        lab_ids, L = st.vectors("labeled")
        P, L = unit(P), (unit(L) if len(L) else L.astype(np.float64))  # select's renormalised rows
        d = (1 - P @ L.T).min(axis=1) if len(L) else np.full(len(P), np.inf)
        picks = np.argsort(-d, kind="stable")[:budget]
        cover, trace = d.copy(), []
        for p in picks:
            cover = np.minimum(cover, 1 - P @ P[p])
            trace.append(max(cover.max(), 0.0))
        summary = {"strategy": "novelty", "picks": budget, "pool": len(P), "labeled": len(L), "radius": radius,
                   "covering_radius_before": float(d.max()), "covering_radius_after": trace[-1], "uncertainty": None}
        rid = save_selection(st, {"budget": budget, "strategy": "novelty"}, summary, pool_ids[picks], d[picks], trace)
        meta = st.describe(np.concatenate([pool_ids[picks], lab_ids]))
        rows = [{"rank": r + 1, "id": meta[int(pool_ids[p])][0], "path": meta[int(pool_ids[p])][1], "priority": float(d[p]),
                 "novelty": float(d[p]) if len(L) else None,
                 "nearest_labeled_id": meta[int(lab_ids[np.argmin(1 - P[p] @ L.T)])][0] if len(L) else None,
                 "nearest_labeled_distance": float(d[p]) if len(L) else None,
                 "labeled_neighbors": int(((1 - P[p] @ L.T) <= radius).sum())}
                for r, p in enumerate(picks)]
    if out is not None:
        write_selection(out, rows)
    return rid, pool_ids[picks], rows


@pytest.fixture
def index(tmp_path):
    rng = np.random.default_rng(11)
    idx = tmp_path / "idx"
    for name, n, split in (("l", 30, "labeled"), ("p", 100, "unlabeled")):
        np.save(tmp_path / f"{name}.npy", unit(rng.normal(size=(n, 12))).astype(np.float32))
        (tmp_path / f"{name}.txt").write_text("\n".join(f"{name}{i:03d}" for i in range(n)))
        r = run("import-embeddings", tmp_path / f"{name}.npy", "--ids", tmp_path / f"{name}.txt", "--split", split, "--index", idx)
        assert r.exit_code == 0, r.output
    return idx


def counts(idx):
    with open_store(idx) as st:
        return dict(st.db.execute("SELECT split, COUNT(*) FROM images GROUP BY split").fetchall())


def test_mark_selection_labeled_is_atomic_idempotent_and_in_history(index, tmp_path):
    sel = tmp_path / "sel.csv"
    rid, picked, _ = record_selection(index, 10, sel)
    with open_store(index) as st:
        version = st.vectors_version
    r = run("mark-labeled", "--selection", sel, "--index", index)
    assert r.exit_code == 0, r.output
    assert f"marked 10 image(s) labeled from select run #{rid}; 0 already were" in r.output
    assert counts(index) == {"labeled": 40, "unlabeled": 90}
    with open_store(index) as st:
        rows = st.db.execute(f"SELECT split, labeled_at, labeled_by FROM images WHERE id IN ({','.join(map(str, picked))})").fetchall()
        assert all(s == "labeled" and at is not None and by == rid for s, at, by in rows)
        kind, summary = st.db.execute("SELECT kind, summary FROM runs ORDER BY id DESC LIMIT 1").fetchone()
        assert kind == "mark-labeled" and json.loads(summary)["moved"] == 10
        # splits are not vectors: the FAISS index is still current
        assert st.vectors_version == version and vectors.is_current(st)
    r = run("mark-labeled", "--selection", sel, "--index", index)  # again: nothing to move
    assert r.exit_code == 0 and "marked 0 image(s) labeled" in r.output and "10 already were" in r.output
    assert counts(index) == {"labeled": 40, "unlabeled": 90}
    r = run("info", "--index", index)
    assert r.exit_code == 0
    assert "select  novelty 10 picks — 10 marked labeled on" in r.output
    assert f"mark-labeled  10 moved to labeled (picks of #{rid})" in r.output
    assert "mark-labeled  0 moved to labeled (picks of" in r.output and "10 already labeled" in r.output


def test_undo_moves_back_only_what_mark_labeled_moved(index, tmp_path):
    first = tmp_path / "sel.csv"
    rid, picked, _ = record_selection(index, 10, first)
    before = run("select", "--budget", 10, "--index", index, "--out", tmp_path / "a.csv")
    assert run("mark-labeled", "--selection", first, "--index", index).exit_code == 0
    with open_store(index) as st:  # the ids users see: imported ids (a catalog id names only an image without one)
        shown = [st.describe([i])[int(i)][0] for i in picked[:4]]
    (tmp_path / "list.txt").write_text("\n".join(["l000", "l001", *shown]) + "\n")  # 2 from the sources
    r = run("mark-labeled", "--undo", tmp_path / "list.txt", "--index", index)
    assert r.exit_code == 0 and "moved 4 image(s) back to unlabeled; 0 already were" in r.output, r.output
    assert "warning: 2 image(s) are labeled because a --labeled source lists them and stay labeled" in r.output
    assert counts(index) == {"labeled": 36, "unlabeled": 94}
    with open_store(index) as st:
        rows = st.db.execute(f"SELECT split, labeled_at, labeled_by FROM images WHERE id IN ({','.join(map(str, picked[:4]))})").fetchall()
        assert all(row == ("unlabeled", None, None) for row in rows)
    r = run("mark-labeled", "--undo", "--selection", first, "--index", index)  # the rest, and idempotent for the 4
    assert r.exit_code == 0 and "moved 6 image(s) back to unlabeled; 4 already were" in r.output, r.output
    assert counts(index) == {"labeled": 30, "unlabeled": 100}
    after = run("select", "--budget", 10, "--index", index, "--out", tmp_path / "b.csv")
    assert after.exit_code == before.exit_code == 0
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()  # as if never marked
    r = run("info", "--index", index)
    assert "unmark  4 moved back to unlabeled, 2 left labeled (a --labeled source)" in r.output, r.output


def test_marked_images_count_as_labeled_in_nearest_labeled(index, tmp_path):
    """Brute force: after marking, the pool's nearest-labeled distances are taken over
    the old labeled set plus the marked images."""
    with open_store(index) as st:
        pool_ids, P = st.vectors("unlabeled")
        _, L = st.vectors("labeled")
    marked = [f"p{i:03d}" for i in (3, 14, 15, 92)]
    (tmp_path / "list.txt").write_text("# labeled on Monday\n" + "\n".join(marked) + "\n\n")
    r = run("mark-labeled", tmp_path / "list.txt", "--index", index)
    assert r.exit_code == 0 and "marked 4 image(s) labeled; 0 already were" in r.output, r.output
    with open_store(index) as st:
        ids2, P2 = st.vectors("unlabeled")
        _, L2 = st.vectors("labeled")
    keep = np.isin(pool_ids, ids2)  # still unlabeled
    new_L = np.concatenate([L, P[~keep]]).astype(np.float64)
    np.testing.assert_array_equal(np.sort(L2.astype(np.float64), axis=0), np.sort(new_L, axis=0))
    want = (1 - unit(P2) @ unit(new_L).T).min(axis=1)
    rid, _, rows = record_selection(index, 5)  # a selection made now sees the marked images as labeled
    got = {x["id"]: x["novelty"] for x in rows}
    with open_store(index) as st:
        shown = st.describe(ids2)
    for i, v in zip(ids2.tolist(), want):
        if shown[i][0] in got:
            assert got[shown[i][0]] == pytest.approx(v, abs=1e-9)
    assert not set(got) & set(marked)


def test_select_treats_marked_images_as_labeled(index, tmp_path):
    pytest.importorskip("novelty.scores")
    pytest.importorskip("novelty.kcenter")
    (tmp_path / "list.txt").write_text("p000\np001\np002\n")
    assert run("mark-labeled", tmp_path / "list.txt", "--index", index).exit_code == 0
    out = tmp_path / "s.csv"
    r = run("select", "--budget", 5, "--strategy", "novelty", "--index", index, "--out", out)
    assert r.exit_code == 0, r.output
    with open_store(index) as st:
        ids, P = st.vectors("unlabeled")
        _, L = st.vectors("labeled")
        shown = st.describe(ids)
    d = (1 - P.astype(np.float64) @ L.astype(np.float64).T).min(axis=1)
    assert [x["id"] for x in read(out)] == [shown[int(ids[i])][0] for i in np.argsort(-d, kind="stable")[:5]]
    assert "of 97 unlabeled" in r.output


def test_mark_by_path_relative_to_the_list(tmp_path, sample_dir):
    src = tmp_path / "imgs"
    src.mkdir()
    for f in sorted((sample_dir / "unlabeled").glob("unlabeled_*.jpg"))[:4]:
        shutil.copy(f, src / f.name)
    idx = tmp_path / "idx"
    assert run("build-index", "--index", idx, "--model", TINY, "--pretrained", "none", "--unlabeled", src).exit_code == 0
    names = sorted(p.name for p in src.iterdir())
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "done.txt").write_text(f"../imgs/{names[0]}\n{src / names[1]}\n")
    r = run("mark-labeled", tmp_path / "lists" / "done.txt", "--index", idx)
    assert r.exit_code == 0 and "marked 2 image(s) labeled" in r.output, r.output
    with open_store(idx) as st:
        labeled = {p for (p,) in st.db.execute("SELECT path FROM images WHERE split='labeled'")}
    assert labeled == {str(src / names[0]), str(src / names[1])}


@pytest.mark.parametrize(
    "args, message",
    [
        (["LIST_UNKNOWN"], "2 of 4 id(s) are not in the index: 'zzz', 'nope.jpg'; nothing was changed (a relative "
                           "path is read against the current folder, then against the list's folder"),
        ([], "give a LIST file of ids or paths, or --selection FILE"),
        (["LIST_OK", "--selection", "LIST_OK"], "give a LIST file of ids or paths, or --selection FILE"),
        (["missing.txt"], "list file missing.txt does not exist"),
        (["LIST_EMPTY"], "holds no ids"),
        (["--selection", "SEL_BAD"], "needs an id or a path column"),
        (["--selection", "x.xlsx"], "selection file x.xlsx does not exist"),
        (["SEL_AS_LIST"], "SEL_AS_LIST is a selection file (its first line is a CSV header); pass it as --selection"),
        (["A_FOLDER"], "A_FOLDER is a folder; give a list file of ids or paths"),
    ],
)
def test_bad_mark_input_changes_nothing(index, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "SEL_AS_LIST").write_text("rank,id,path,priority\n1,p001,,0.5\n")
    (tmp_path / "A_FOLDER").mkdir()
    (tmp_path / "LIST_UNKNOWN").write_text("p001\nzzz\np002\nnope.jpg\n")
    (tmp_path / "LIST_OK").write_text("p001\n")
    (tmp_path / "LIST_EMPTY").write_text("# nothing\n\n")
    (tmp_path / "SEL_BAD").write_text("name,score\np001,1\n")
    (tmp_path / "SEL_BAD").rename(tmp_path / "SEL_BAD.csv")
    args = ["SEL_BAD.csv" if a == "SEL_BAD" else a for a in args]
    with open_store(index) as st:
        runs = st.db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    r = run("mark-labeled", *args, "--index", index)
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert counts(index) == {"labeled": 30, "unlabeled": 100}
    with open_store(index) as st:
        assert st.db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == runs


# ---------------------------------------------------------------------------- export
def test_export_recorded_run_matches_the_selection_and_survives_marking(index, tmp_path):
    rid, picked, rows = record_selection(index, 8, tmp_path / "sel.csv", radius=0.6)
    r = run("export", "--latest", "--out", tmp_path / "a.csv", "--index", index)
    assert r.exit_code == 0 and f"wrote 8 picks of select run #{rid}" in r.output and "a.label-studio.json" in r.output, r.output
    got = read(tmp_path / "a.csv")
    assert [x["id"] for x in got] == [x["id"] for x in rows] and [int(x["rank"]) for x in got] == list(range(1, 9))
    for g, w in zip(got, rows):  # recomputed against the labeled set, as numpy did
        for col in ("priority", "novelty", "nearest_labeled_distance"):
            assert float(g[col]) == pytest.approx(w[col], abs=1e-5)
        assert g["nearest_labeled_id"] == w["nearest_labeled_id"] and int(g["labeled_neighbors"]) == w["labeled_neighbors"]
        assert g["distance_at_pick"] == "" and g["uncertainty"] == ""
    assert len(json.loads((tmp_path / "a.label-studio.json").read_text())) == 8
    # once the picks are labeled, they are not their own nearest labeled images
    assert run("mark-labeled", "--selection", tmp_path / "sel.csv", "--index", index).exit_code == 0
    r = run("export", "--run", rid, "--out", tmp_path / "b.csv", "--index", index)
    assert r.exit_code == 0, r.output
    assert read(tmp_path / "b.csv") == got
    for ext in ("jsonl", "parquet"):
        assert run("export", "--run", rid, "--out", tmp_path / f"c.{ext}", "--index", index).exit_code == 0
    assert [json.loads(x)["id"] for x in (tmp_path / "c.jsonl").read_text().splitlines()] == [x["id"] for x in rows]
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "c.parquet").column("rank").to_pylist() == list(range(1, 9))


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give --run N or --latest"),
        (["--run", "1", "--latest"], "give --run N or --latest"),
        (["--run", "1"], "run #1 is not a selection run; recent selection runs: #"),
        (["--run", "99"], "run #99 is not a selection run"),
        (["--latest", "--out", "x.txt"], "extension must be one of .csv, .jsonl, .parquet"),
    ],
)
def test_bad_export_input(index, tmp_path, args, message):
    record_selection(index, 3)
    if "--out" not in args:
        args = [*args, "--out", tmp_path / "e.csv"]
    r = run("export", *args, "--index", index)
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_export_without_a_selection(index, tmp_path):
    r = run("export", "--latest", "--out", tmp_path / "e.csv", "--index", index)
    assert r.exit_code == 2 and "has no recorded selection" in r.output


def test_export_prints_the_label_studio_path_with_its_folder(index, tmp_path):
    record_selection(index, 3)
    r = run("export", "--latest", "--out", tmp_path / "e.jsonl", "--index", index)
    assert r.exit_code == 0 and f"-> {tmp_path / 'e.jsonl'}, {tmp_path / 'e.label-studio.json'}\n" in r.output, r.output


def test_export_parquet_without_pyarrow_fails_before_any_work(index, tmp_path, monkeypatch):
    import sys

    from novelty import labeling

    record_selection(index, 3)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setattr(labeling, "run_rows", lambda *a: pytest.fail("export worked before checking for pyarrow"))
    r = run("export", "--latest", "--out", tmp_path / "e.parquet", "--index", index)
    assert r.exit_code == 2 and "writing .parquet needs pyarrow" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert list(tmp_path.glob("e.*")) == []


# --------------------------------------------------------------------------- exclude
def farthest(idx, skip=()):
    """Display ids of the unlabeled images by distance to the labeled set, farthest first (numpy)."""
    with open_store(idx) as st:
        ids, P = st.vectors("unlabeled")
        _, L = st.vectors("labeled")
        shown = st.describe(ids)
    d = (1 - unit(P) @ unit(L).T).min(axis=1)
    order = [shown[int(ids[i])][0] for i in np.argsort(-d, kind="stable")]
    return [x for x in order if x not in skip]


def test_excluded_images_are_never_selected_until_included_again(index, tmp_path):
    top = farthest(index)[:4]
    (tmp_path / "skip.txt").write_text("\n".join(top) + "\n")
    r = run("exclude", tmp_path / "skip.txt", "--reason", "blank", "--index", index)
    assert r.exit_code == 0 and "excluded 4 image(s) from selection; 0 already were" in r.output, r.output
    r = run("exclude", tmp_path / "skip.txt", "--index", index)  # idempotent
    assert r.exit_code == 0 and "excluded 0 image(s) from selection; 4 already were" in r.output, r.output
    out = tmp_path / "s.csv"
    r = run("select", "--budget", 6, "--strategy", "novelty", "--index", index, "--out", out)
    assert r.exit_code == 0 and "selected 6 of 96 unlabeled images (4 excluded)" in r.output, r.output
    assert [x["id"] for x in read(out)] == farthest(index, skip=top)[:6]
    r = run("select", "--budget", 10, "--strategy", "kcenter", "--index", index, "--out", out)
    assert r.exit_code == 0 and not set(top) & {x["id"] for x in read(out)}
    info = run("info", "--index", index).output
    assert "excluded   4 unlabeled image(s) kept out of selection (blank: 4)" in info, info
    assert "model      vectors from import-embeddings (model 'imported')" in info, info
    assert "exclude  4 excluded" in info and "exclude  0 excluded, 4 already were" in info, info
    # back in the pool
    r = run("exclude", tmp_path / "skip.txt", "--undo", "--index", index)
    assert r.exit_code == 0 and "4 image(s) are candidates again" in r.output, r.output
    r = run("select", "--budget", 6, "--strategy", "novelty", "--index", index, "--out", out)
    assert r.exit_code == 0 and "selected 6 of 100 unlabeled images with" in r.output, r.output
    assert [x["id"] for x in read(out)] == farthest(index)[:6]
    assert "kept out of selection" not in run("info", "--index", index).output


def test_excluding_labeled_images_warns_and_applies_once_they_are_unlabeled(index, tmp_path):
    (tmp_path / "x.txt").write_text("l000\np000\n")
    r = run("exclude", tmp_path / "x.txt", "--index", index)
    assert r.exit_code == 0 and "excluded 2 image(s)" in r.output and "1 of them are labeled" in r.output, r.output
    assert "excluded   1 unlabeled image(s)" in run("info", "--index", index).output
    (tmp_path / "m.txt").write_text("p000\n")
    assert run("mark-labeled", tmp_path / "m.txt", "--index", index).exit_code == 0  # labeled now: a center
    r = run("select", "--budget", 3, "--strategy", "novelty", "--index", index, "--out", tmp_path / "s.csv")
    assert r.exit_code == 0 and "of 99 unlabeled images with" in r.output, r.output  # nothing excluded is left in it


def test_excluding_the_whole_pool_is_said_and_bad_input_changes_nothing(index, tmp_path):
    (tmp_path / "bad.txt").write_text("p001\nzzz\n")
    r = run("exclude", tmp_path / "bad.txt", "--index", index)
    assert r.exit_code == 2 and "1 of 2 id(s) are not in the index: 'zzz'" in r.output, r.output
    for args, said in ((["--reason", " "], "--reason must be one line of printable text"),
                       (["--reason", "a\nb"], "--reason must be one line of printable text"),
                       (["--reason", "x", "--undo"], "--reason goes with exclude, not with --undo")):
        r = run("exclude", tmp_path / "bad.txt", *args, "--index", index)
        assert r.exit_code == 2 and said in r.output and len(r.output.strip().splitlines()) == 1, r.output
    with open_store(index) as st:
        assert not len(st.excluded_ids()) and not st.db.execute("SELECT COUNT(*) FROM runs WHERE kind='exclude'").fetchone()[0]
    (tmp_path / "all.txt").write_text("\n".join(f"p{i:03d}" for i in range(100)))
    assert run("exclude", tmp_path / "all.txt", "--index", index).exit_code == 0
    r = run("select", "--budget", 3, "--index", index, "--out", tmp_path / "s.csv")
    assert r.exit_code == 2 and "has no embedded unlabeled images to select from (100 excluded)" in r.output, r.output


def test_an_index_from_before_exclude_reads_and_gains_the_table_when_written(index, tmp_path):
    import sqlite3

    db = sqlite3.connect(index / "catalog.sqlite")
    db.execute("DROP TABLE excluded")
    db.commit()
    db.close()
    r = run("info", "--index", index)  # read-only open: no table, nothing excluded
    assert r.exit_code == 0 and "kept out of selection" not in r.output
    (tmp_path / "x.txt").write_text("p000\n")
    assert run("exclude", tmp_path / "x.txt", "--index", index).exit_code == 0
    assert "excluded   1 unlabeled image(s) kept out of selection (no reason given: 1)" in run("info", "--index", index).output


def test_info_counts_the_excluded_images_select_would_pick(tmp_path, sample_dir):
    """Only embedded unlabeled images count, as in select's summary: excluding a broken
    file (failed) changes neither number."""
    idx = tmp_path / "idx"
    assert run("build-index", "--index", idx, "--model", TINY, "--pretrained", "none",
               "--labeled", sample_dir / "labeled", "--unlabeled", sample_dir / "unlabeled").exit_code == 0
    with open_store(idx) as st:
        failed = st.db.execute("SELECT path FROM images WHERE status='failed' LIMIT 1").fetchone()[0]
        good = st.db.execute("SELECT path FROM images WHERE status='embedded' AND split='unlabeled' LIMIT 2").fetchall()
    (tmp_path / "x.txt").write_text("\n".join([failed, *(p for (p,) in good)]))
    assert run("exclude", tmp_path / "x.txt", "--reason", "t", "--index", idx).exit_code == 0
    assert "excluded   2 unlabeled image(s) kept out of selection (t: 2)" in run("info", "--index", idx).output
    r = run("select", "--budget", 3, "--index", idx, "--out", tmp_path / "s.csv")
    assert r.exit_code == 0 and "(2 excluded)" in r.output, r.output
