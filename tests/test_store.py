import os
import sqlite3

import numpy as np
import pytest

from novelty import sources
from novelty.errors import IndexBusyError, IndexMismatchError, IndexMissingError, InputError
from novelty.store import ImageRecord, create_store, open_store


def unit(n, d, seed=0):
    X = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def records(tmp_path, n, split="unlabeled", size=10):
    return [ImageRecord(str(tmp_path / f"{i}.jpg"), split, size, 1.0) for i in range(n)]


def test_sync_commit_and_gather(tmp_path):
    with create_store(tmp_path / "idx") as st:
        st.check_encoder({"kind": "x", "model": "m"}, 8)
        c = st.sync_sources(records(tmp_path, 5))
        assert c["new"] == 5 and c["changed"] == 0
        ids = st.pending_ids()
        X = unit(5, 8)
        st.commit_shard(ids[:3], X[:3], ["h0", "h1", "h2"])
        st.commit_shard(ids[3:], X[3:], failures=[])
        got_ids, got = st.vectors()
        assert got_ids.tolist() == ids.tolist()
        np.testing.assert_array_equal(got, X.astype(np.float16))
        # block iteration sees each vector once
        blocks = list(st.iter_blocks())
        assert sorted(np.concatenate([b[0] for b in blocks]).tolist()) == ids.tolist()
        assert len(st.pending_ids()) == 0


def test_resync_detects_changes_and_never_duplicates(tmp_path):
    with create_store(tmp_path / "idx") as st:
        st.sync_sources(records(tmp_path, 4))
        st.commit_shard(st.pending_ids(), unit(4, 8))
        recs = records(tmp_path, 6)
        recs[1] = ImageRecord(recs[1].path, "unlabeled", 99, 1.0)  # size changed
        c = st.sync_sources(recs)
        assert (c["new"], c["changed"]) == (2, 1)
        assert st.db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 6
        assert len(st.pending_ids()) == 3
        # the same path under labeled moves it; labeled wins when both are given
        c = st.sync_sources(records(tmp_path, 1, "labeled") + records(tmp_path, 1))
        assert c["moved"] == 1
        assert st.db.execute("SELECT split FROM images WHERE path=?", (recs[0].path,)).fetchone()[0] == "labeled"


def test_orphan_shard_from_a_killed_run_is_removed(tmp_path):
    with create_store(tmp_path / "idx") as st:
        st.sync_sources(records(tmp_path, 2))
        st.write_shard_file("shard-orphan", unit(2, 8))  # file written, catalog never committed
        (tmp_path / "idx" / "shards" / ".shard-x.npy.tmp").write_bytes(b"partial")
    with create_store(tmp_path / "idx") as st:
        assert sorted(p.name for p in (tmp_path / "idx" / "shards").iterdir()) == []
        assert len(st.pending_ids()) == 2


def test_encoder_mismatch_names_both(tmp_path):
    with create_store(tmp_path / "idx") as st:
        st.check_encoder({"kind": "open_clip", "model": "A", "pretrained": "t"}, 8)
        st.check_encoder({"kind": "open_clip", "model": "A", "pretrained": "t"}, 8)
        st.sync_sources([ImageRecord("/x/a.jpg", "unlabeled", 1, 1.0)])
        st.commit_shard(st.pending_ids(), unit(1, 8))  # a vector of A's: now nothing else may come in
        with pytest.raises(IndexMismatchError, match="'A'.*'B'"):
            st.check_encoder({"kind": "open_clip", "model": "B", "pretrained": "t"}, 8)
        with pytest.raises(IndexMismatchError, match="dim 8.*dim 16"):
            st.check_encoder({"kind": "open_clip", "model": "A", "pretrained": "t"}, 16)


def test_one_writer_at_a_time(tmp_path):
    import subprocess
    import sys

    probe = [sys.executable, "-c", f"from novelty.store import create_store; create_store({str(tmp_path / 'idx')!r})"]
    cli = [sys.executable, "-m", "novelty", "mark-labeled", str(tmp_path / "none.txt"), "--index", str(tmp_path / "idx")]
    (tmp_path / "none.txt").write_text("x\n")
    with create_store(tmp_path / "idx"):
        with pytest.raises(IndexBusyError, match="already open for writing"):
            create_store(tmp_path / "idx")
        r = subprocess.run(probe, capture_output=True, text=True)
        assert r.returncode != 0 and f"another novelty process (pid {os.getpid()}) is writing" in r.stderr
        r = subprocess.run(cli, capture_output=True, text=True)  # the CLI: one line, exit 5 (retry later)
        assert r.returncode == 5 and r.stderr.strip().count("\n") == 0, r.stderr
        assert f"another novelty process (pid {os.getpid()}) is writing" in r.stderr  # the holder, named
    assert subprocess.run(probe).returncode == 0  # released on close


def test_open_missing_index(tmp_path):
    with pytest.raises(IndexMissingError):
        open_store(tmp_path / "none")


def test_imported_is_all_or_nothing(tmp_path):
    def blocks():
        yield unit(3, 8)
        raise InputError("bad row")

    with create_store(tmp_path / "idx") as st:
        with pytest.raises(InputError):
            st.add_imported(["a", "b", "c", "d", "e", "f"], blocks(), "unlabeled")
        assert st.db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 0
        assert list((tmp_path / "idx" / "shards").iterdir()) == []
        st.add_imported(["a", "b"], iter([unit(2, 8)]), "labeled")
        ids, unknown = st.resolve(["a", "zz", "2"])
        assert unknown == ["zz", "2"] and len(ids) == 1  # "2": b's catalog id, which nobody is shown for an imported row
        st.add_imported(["1000", "1001", "1002"], iter([unit(3, 8)]), "unlabeled")
        ids, unknown = st.resolve(["1001", "5", "4"])
        assert unknown == ["5", "4"] and st.describe(ids)[int(ids[0])][0] == "1001"
        st.sync_sources(records(tmp_path, 1))  # a file's image is shown, and named, by its catalog id
        (file_id,) = st.pending_ids().tolist()
        assert st.resolve([str(file_id)])[0].tolist() == [file_id]


def test_catalog_survives_a_reader_while_writing(tmp_path):
    with create_store(tmp_path / "idx") as st:
        st.sync_sources(records(tmp_path, 3))
        ro = sqlite3.connect(f"file:{tmp_path / 'idx' / 'catalog.sqlite'}?mode=ro", uri=True)
        assert ro.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 3
        st.commit_shard(st.pending_ids(), unit(3, 8))
        assert ro.execute("SELECT COUNT(*) FROM images WHERE status='embedded'").fetchone()[0] == 3


def test_vectors_gather_equals_row_by_row_reads(tmp_path):
    """vectors() copies runs of consecutive rows and falls back to a gather when they are
    scattered; both must equal reading each row from its shard (several shards, gaps,
    interleaved splits, an id subset in any order)."""
    X = unit(700, 8, seed=3)
    with create_store(tmp_path / "idx") as st:
        st.check_encoder({"kind": "x", "model": "m"}, 8)
        st.sync_sources(records(tmp_path, 700))
        ids = st.pending_ids()
        for s in range(0, 700, 256):  # three shards
            st.commit_shard(ids[s:s + 256], X[s:s + 256], [f"h{i}" for i in range(s, min(700, s + 256))])
        lay = st.embedded()
        by_id = {int(i): st.shard(lay.names[s])[r] for i, s, r in zip(lay.ids, lay.shard, lay.row)}
        # rows moved to the labeled split: a block (long runs with a gap: copies), then also
        # every 3rd row of another stretch (scattered: the gather)
        for moved in (ids[100:140], np.r_[ids[100:140], ids[300:600:3]]):
            st.db.execute("UPDATE images SET split='unlabeled'")
            st.db.execute(f"UPDATE images SET split='labeled' WHERE id IN ({','.join(map(str, moved.tolist()))})")
            check_splits(st, ids, moved, by_id, X)
        sub = np.sort(np.random.default_rng(0).choice(ids, 50, replace=False))
        got_ids, got = st.vectors(ids=sub)
        np.testing.assert_array_equal(got, X[np.searchsorted(ids, sub)].astype(np.float16))


def check_splits(st, ids, moved, by_id, X):
    for split in (None, "labeled", "unlabeled"):
        got_ids, got = st.vectors(split)
        want = np.sort(moved) if split == "labeled" else np.setdiff1d(ids, moved) if split == "unlabeled" else ids
        assert got_ids.tolist() == want.tolist()
        np.testing.assert_array_equal(got, np.stack([by_id[int(i)] for i in want]))
        np.testing.assert_array_equal(got, X[np.searchsorted(ids, want)].astype(np.float16))


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    from novelty._files import atomic_file, atomic_write_text

    target = tmp_path / "page.html"
    atomic_write_text(target, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(target, "w") as f:
            f.write("half of the new")
            raise KeyboardInterrupt  # Ctrl-C mid-write
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]


def test_an_index_that_holds_no_vector_yet_takes_another_encoder(tmp_path):
    """A first run killed before its first shard leaves a manifest bound to its encoder;
    with no vector in the index there is nothing to mix, so the next run's encoder is
    taken instead of refused ("holds vectors from ...", with none)."""
    with create_store(tmp_path / "idx") as st:
        st.check_encoder({"kind": "imported", "model": "imported", "pretrained": None}, 64)
    with create_store(tmp_path / "idx") as st:
        st.check_encoder({"kind": "open_clip", "model": "B", "pretrained": "t"}, 32)
        assert st.dim == 32 and st.manifest["encoder"]["model"] == "B"
        st.commit_shard(st.pending_ids(), np.empty((0, 32), np.float32))  # nothing: still no vector
        st.sync_sources([ImageRecord("/x/a.jpg", "unlabeled", 1, 1.0)])
        st.commit_shard(st.pending_ids(), unit(1, 32))
    with create_store(tmp_path / "idx") as st:
        with pytest.raises(IndexMismatchError, match="dim 32.*dim 64"):
            st.check_encoder({"kind": "imported", "model": "imported", "pretrained": None}, 64)


def test_a_catalog_from_before_file_identities_gets_the_column(tmp_path):
    """images.file came in session 14: a catalog made before it gains the column (and its
    index) when opened for writing, and a scan fills it."""
    with create_store(tmp_path / "idx") as st:
        st.db.execute("DROP INDEX images_file")
        st.db.execute("ALTER TABLE images DROP COLUMN file")
    with open_store(tmp_path / "idx") as st:  # read-only: the catalog as it is
        assert "file" not in {r[1] for r in st.db.execute("PRAGMA table_info(images)")}
    with open_store(tmp_path / "idx", writable=True) as st:
        assert "file" in {r[1] for r in st.db.execute("PRAGMA table_info(images)")}
        (tmp_path / "a.jpg").write_bytes(b"x")
        st.sync_sources([sources.record(str(tmp_path / "a.jpg"), "unlabeled")])
        (file,) = st.db.execute("SELECT file FROM images").fetchone()
        stat = os.stat(tmp_path / "a.jpg")
        assert file == f"{stat.st_dev}:{stat.st_ino}"
