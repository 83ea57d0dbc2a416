"""Kill build-index with SIGKILL mid-run, resume, and compare with an uninterrupted run:
the index opens cleanly, nothing is duplicated, nothing is lost, vectors are identical."""
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from novelty.errors import InputError
from novelty.sample import SampleCfg, make_sample
from novelty.store import VECTOR_LOST, create_store, open_store
from tests.conftest import TINY, run

SLOW = str(Path(__file__).parent / "slow-clip.json")  # slow enough to be caught mid-run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    make_sample(root, SampleCfg(n_labeled=40, n_unlabeled=400, size=96, seed=3))
    return root


def command(images, index):
    return [sys.executable, "-m", "novelty.cli", "build-index", "--index", str(index),
            "--labeled", str(images / "labeled"), "--unlabeled", str(images / "unlabeled"),
            "--model", SLOW, "--pretrained", "none", "--device", "cpu", "--batch-size", "8", "--shard-size", "16"]


def run_to_end(images, index):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(command(images, index), check=True, capture_output=True, env=env, timeout=300)


def shards_committed(index) -> int:
    try:
        db = sqlite3.connect(f"file:{index / 'catalog.sqlite'}?mode=ro", uri=True, timeout=1)
        try:
            return db.execute("SELECT COUNT(*) FROM shards").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return -1


def snapshot(index):
    with open_store(index) as st:
        rows = st.db.execute("SELECT path, status, reason FROM images ORDER BY path").fetchall()
        ids, X = st.vectors()
        paths = {i: p for i, (_, p, _) in st.describe(ids).items()}
        vecs = {paths[i]: x for i, x in zip(ids.tolist(), X)}
        return rows, vecs, st.manifest["faiss"]["ntotal"]


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    index = tmp_path_factory.mktemp("ref") / "idx"
    run_to_end(images, index)
    return snapshot(index)


@pytest.mark.parametrize("kill_after_shards", [0, 1, 12])
def test_sigkill_then_resume_matches_an_uninterrupted_run(images, reference, tmp_path, kill_after_shards):
    index = tmp_path / "idx"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command(images, index), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        n = shards_committed(index)
        if (kill_after_shards == 0 and (index / "catalog.sqlite").exists()) or n >= kill_after_shards > 0:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "build-index finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = shards_committed(index)
    total_images = len(reference[0])
    assert committed < total_images // 16, "the kill came too late to test anything"

    # the killed index opens cleanly and holds no half-written data
    if (index / "catalog.sqlite").exists():
        with open_store(index) as st:
            ids, X = st.vectors()
            assert len(ids) == len(set(ids.tolist()))
            assert np.isfinite(X.astype(np.float32)).all()

    run_to_end(images, index)
    rows, vecs, ntotal = snapshot(index)
    ref_rows, ref_vecs, ref_ntotal = reference
    assert rows == ref_rows  # same images, same statuses and reasons, no duplicate rows
    assert vecs.keys() == ref_vecs.keys()
    for path, v in ref_vecs.items():
        np.testing.assert_array_equal(vecs[path], v, err_msg=path)
    assert ntotal == ref_ntotal == len(vecs)
    # no orphan shard files are left behind
    with open_store(index) as st:
        names = {n for (n,) in st.db.execute("SELECT name FROM shards")}
    assert {p.stem for p in (index / "shards").iterdir()} == names


def test_info_tells_a_running_build_from_a_killed_one(images, tmp_path):
    """While build-index runs, `info` names its process; once it is killed, `info` says so,
    and a resumed run that finishes leaves the killed one marked as killed."""
    index = tmp_path / "idx"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command(images, index), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and shards_committed(index) < 1:
            time.sleep(0.01)
        assert proc.poll() is None, "build-index finished before info could look at it"
        r = run("info", "--index", index)
        assert r.exit_code == 0 and f"build  (running now: pid {proc.pid})" in r.output, r.output
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    r = run("info", "--index", index)
    assert r.exit_code == 0 and "build  (not finished: killed)" in r.output and "running now" not in r.output, r.output
    run_to_end(images, index)
    r = run("info", "--index", index)
    assert r.output.count("(not finished: killed)") == 1 and "running now" not in r.output, r.output


def test_sigterm_to_the_process_group_stops_like_ctrl_c_and_resumes(images, reference, tmp_path):
    """What slurm does at a time limit: SIGTERM to every process of the job, decode workers
    included. The run stops cleanly (exit 143, one line saying what was kept, the reason
    in `info`) instead of dying silently, and the same command then finishes it."""
    index = tmp_path / "idx"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command(images, index) + ["--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and shards_committed(index) < 1:
        time.sleep(0.01)
    assert proc.poll() is None, "build-index finished before it could be stopped"
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    lines = proc.stderr.read().strip().splitlines()
    assert lines[-1] == "novelty: stopped (SIGTERM); finished shards are kept; re-run the same command to resume", lines
    assert not any("Traceback" in line for line in lines), lines
    r = run("info", "--index", index)
    assert r.exit_code == 0 and "build  (stopped: SIGTERM)" in r.output, r.output
    run_to_end(images, index)
    rows, vecs, ntotal = snapshot(index)
    assert rows == reference[0] and ntotal == reference[2]
    for path, v in reference[1].items():
        np.testing.assert_array_equal(vecs[path], v, err_msg=path)


def test_a_first_import_stopped_by_sigterm_leaves_no_index(tmp_path):
    """SIGTERM gets the clean-up Ctrl-C gets: a first import leaves no folder, whose dim
    would bind the next import (before, it left one, and orphan shards)."""
    np.save(tmp_path / "v.npy", np.random.default_rng(0).normal(size=(400_000, 32)).astype(np.float32))
    (tmp_path / "ids.txt").write_text("".join(f"x{i}\n" for i in range(400_000)))
    index = tmp_path / "idx"
    proc = subprocess.Popen([sys.executable, "-m", "novelty", "import-embeddings", str(tmp_path / "v.npy"), "--ids",
                             str(tmp_path / "ids.txt"), "--split", "unlabeled", "--index", str(index)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not any((index / "shards").glob("*.npy")):
        time.sleep(0.005)
    assert proc.poll() is None, "the import finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert proc.stderr.read().strip().splitlines()[-1] == "novelty: stopped (SIGTERM); nothing was imported"
    assert not index.exists()


# ----------------------------------------------------- a shard lost after the run
# A shard file deleted or damaged later (a disk error, a careless `rm`): build-index
# checks every shard before it scans, and embeds the images of a lost one again.

def build_tiny(sample_dir, index):
    return run("build-index", "--index", index, "--labeled", sample_dir / "labeled", "--unlabeled", sample_dir / "unlabeled",
               "--model", TINY, "--pretrained", "none", "--device", "cpu", "--batch-size", "8", "--shard-size", "16")


@pytest.fixture(scope="module")
def tiny_reference(sample_dir, tmp_path_factory):
    """An uninterrupted build of sample_dir in 16-image shards, and its snapshot."""
    index = tmp_path_factory.mktemp("tiny-ref") / "idx"
    r = build_tiny(sample_dir, index)
    assert r.exit_code == 0, r.output
    return index, snapshot(index)


def copy_of(reference, tmp_path):
    index = tmp_path / "idx"
    shutil.copytree(reference, index)
    return index


def biggest_shard(index) -> tuple[str, int]:
    """(name, images pointing into it) of the shard most images point into."""
    with open_store(index) as st:
        return st.db.execute("SELECT shard, COUNT(*) c FROM images WHERE shard IS NOT NULL "
                             "GROUP BY shard ORDER BY c DESC, shard LIMIT 1").fetchone()


def last_build(index) -> dict:
    with open_store(index) as st:
        (summary,) = st.db.execute("SELECT summary FROM runs WHERE kind='build' ORDER BY id DESC LIMIT 1").fetchone()
        return json.loads(summary)


def catalog_state(index) -> tuple[int, set[str], set[str]]:
    """(vectors_version, shards the catalog lists, shard files on disk)."""
    with open_store(index) as st:
        names = {n for (n,) in st.db.execute("SELECT name FROM shards")}
        return st.vectors_version, names, {p.stem for p in (index / "shards").iterdir()}


def damage(path: Path, how: str) -> None:
    if how == "deleted":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "row-short":  # a sound .npy, one row fewer than the catalog points into
        np.save(path, np.load(path)[:-1])
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["deleted", "truncated", "garbage", "empty", "row-short"])
def test_a_lost_shard_is_embedded_again(sample_dir, tiny_reference, tmp_path, how):
    reference, (ref_rows, ref_vecs, ref_ntotal) = tiny_reference
    index = copy_of(reference, tmp_path)
    name, n = biggest_shard(index)
    version, _, _ = catalog_state(index)
    damage(index / "shards" / f"{name}.npy", how)
    r = run("select", "--budget", "3", "--index", index, "--out", tmp_path / "before.csv")
    assert r.exit_code == 3 and "re-run build-index" in r.output, r.output  # the error says what helps

    r = build_tiny(sample_dir, index)
    assert r.exit_code == 0, r.output
    assert name in r.output  # the warning names the shard
    assert f"embedded  {n} " in r.output and f"{len(ref_rows) - n} unchanged, {n} from missing or damaged shards" in r.output
    assert f"requeued  {n} image(s) of 1 missing or damaged shard(s): embedded again" in r.output, r.output
    s = last_build(index)
    assert s["requeued"] == n and s["lost_shards"] == [name] and s["resumed"] == 0 and s["failed"] == 0
    rows, vecs, ntotal = snapshot(index)
    assert rows == ref_rows  # same images, statuses and reasons
    assert vecs.keys() == ref_vecs.keys()
    for path, v in ref_vecs.items():  # embedded again in other batches: equal up to float16 rounding
        np.testing.assert_allclose(vecs[path].astype(np.float32), v.astype(np.float32), atol=2e-3, err_msg=path)
    assert ntotal == ref_ntotal == len(vecs)
    new_version, listed, files = catalog_state(index)
    assert new_version > version and name not in listed and listed == files  # the damaged file is gone too
    r = run("select", "--budget", "3", "--index", index, "--out", tmp_path / "after.csv")
    assert r.exit_code == 0, r.output


def test_imported_vectors_of_a_lost_shard_are_recorded_as_lost(sample_dir, tiny_reference, tmp_path):
    reference, (ref_rows, ref_vecs, ref_ntotal) = tiny_reference
    index = copy_of(reference, tmp_path)
    keys = [f"ext-{k}" for k in range(5)]
    X = np.random.default_rng(1).normal(size=(5, 32)).astype(np.float32)  # [5, 32]
    with create_store(index) as st:  # vectors imported under ids, beside the built ones
        st.add_imported(keys, [X / np.linalg.norm(X, axis=1, keepdims=True)], "unlabeled")
        (name,) = st.db.execute("SELECT DISTINCT shard FROM images WHERE ext_id IS NOT NULL").fetchone()
    (index / "shards" / f"{name}.npy").unlink()

    r = build_tiny(sample_dir, index)
    assert r.exit_code == 0, r.output
    assert "embedded  0 " in r.output and "vector lost: 5" in r.output, r.output
    s = last_build(index)
    assert s["requeued"] == 0 and s["lost_shards"] == [name] and s["failed_by_reason"] == {"vector lost": 5}
    with open_store(index) as st:
        lost = st.db.execute("SELECT ext_id, status, reason, shard FROM images WHERE ext_id IS NOT NULL ORDER BY ext_id").fetchall()
    assert lost == [(k, "failed", VECTOR_LOST.format(name), None) for k in keys]
    rows, vecs, ntotal = snapshot(index)
    assert [row for row in rows if row[0] is not None] == ref_rows  # the built images are untouched
    assert vecs.keys() == ref_vecs.keys()
    for path, v in ref_vecs.items():
        np.testing.assert_array_equal(vecs[path], v, err_msg=path)
    assert ntotal == ref_ntotal
    r = run("select", "--budget", "3", "--index", index, "--out", tmp_path / "x.csv")
    assert r.exit_code == 0, r.output
    # imported again under their ids, they take their rows back (no new row); once back, an id clashes again
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    with create_store(index) as st:
        before = st.db.execute("SELECT ext_id, id FROM images WHERE ext_id IS NOT NULL ORDER BY ext_id").fetchall()
        st.add_imported(keys, [U], "unlabeled")
        after = st.db.execute("SELECT ext_id, id, status, reason FROM images WHERE ext_id IS NOT NULL ORDER BY ext_id").fetchall()
        _, got = st.vectors(ids=np.array([i for _, i in before]))
        with pytest.raises(InputError, match="already in the index"):
            st.add_imported(keys[:1], [U[:1]], "unlabeled")
    assert after == [(k, i, "embedded", None) for k, i in before]
    np.testing.assert_allclose(got.astype(np.float32), U, atol=1e-3)
    r = run("select", "--budget", "3", "--index", index, "--out", tmp_path / "y.csv")
    assert r.exit_code == 0 and "of " in r.output, r.output


def test_an_intact_index_is_left_alone(sample_dir, tiny_reference, tmp_path):
    reference, (ref_rows, ref_vecs, _) = tiny_reference
    index = copy_of(reference, tmp_path)
    before = catalog_state(index)
    faiss_file = index / "vectors.faiss"
    stat = (faiss_file.stat().st_ino, faiss_file.stat().st_mtime_ns)
    with open_store(index) as st:
        faiss_manifest = st.manifest["faiss"]

    r = build_tiny(sample_dir, index)
    assert r.exit_code == 0 and "embedded  0 " in r.output, r.output
    s = last_build(index)
    assert s["requeued"] == 0 and s["lost_shards"] == []
    assert catalog_state(index) == before  # no version bump, no shard dropped
    assert (faiss_file.stat().st_ino, faiss_file.stat().st_mtime_ns) == stat  # not rebuilt
    with open_store(index) as st:
        assert st.manifest["faiss"] == faiss_manifest
    rows, vecs, _ = snapshot(index)
    assert rows == ref_rows and vecs.keys() == ref_vecs.keys()


# ------------------------------------------- a shard lost from an import-made index
# An index made only by import-embeddings embeds nothing again: the import repairs the
# lost shard (its vectors are recorded as lost) and --skip-existing imports the same
# files again for just those rows.

def import_files(tmp_path, paths: bool, sample_dir) -> dict[str, tuple[Path, Path, list[str]]]:
    """split -> (vectors.npy, ids.txt, keys as the catalog stores them): ids, or the
    absolute paths of the sample's files (written relative to the list's folder)."""
    rng = np.random.default_rng(7)
    out = {}
    for split in ("labeled", "unlabeled"):
        if paths:
            files = sorted(p for p in (sample_dir / split).iterdir() if p.is_file())
            lines, keys = [os.path.relpath(p, tmp_path) for p in files], [str(p) for p in files]
        else:
            lines = keys = [f"{split[:3]}{i}" for i in range(20 if split == "labeled" else 50)]
        np.save(tmp_path / f"{split}.npy", rng.normal(size=(len(keys), 24)).astype(np.float32))
        (tmp_path / f"{split}.txt").write_text("\n".join(lines))
        out[split] = (tmp_path / f"{split}.npy", tmp_path / f"{split}.txt", keys)
    return out


def imported_vectors(index) -> dict[str, np.ndarray]:
    """key (ext_id or path) -> its float16 vector, for every embedded row."""
    with open_store(index) as st:
        ids, X = st.vectors()
        keys = dict(st.db.execute("SELECT id, COALESCE(ext_id, path) FROM images"))
    return {keys[i]: x for i, x in zip(ids.tolist(), X)}


def catalog_rows(index) -> list[tuple]:
    with open_store(index) as st:
        return st.db.execute("SELECT id, COALESCE(ext_id, path), split, status, reason FROM images ORDER BY id").fetchall()


def import_cli(files, split, index, *extra):
    npy, txt, _ = files[split]
    return run("import-embeddings", npy, "--ids", txt, "--split", split, "--index", index, *extra)


@pytest.mark.parametrize("paths,how", [(False, "deleted"), (True, "truncated")])
def test_an_import_made_index_recovers_from_a_lost_shard(sample_dir, tmp_path, paths, how):
    files = import_files(tmp_path, paths, sample_dir)
    keys = files["unlabeled"][2]
    flag = ["--paths"] if paths else []
    index = tmp_path / "idx"
    assert import_cli(files, "labeled", index, *flag).exit_code == 0
    # the unlabeled file grows: its first 30 rows, then the whole file with --skip-existing
    head_npy, head_txt = tmp_path / "head.npy", tmp_path / "head.txt"
    np.save(head_npy, np.load(files["unlabeled"][0])[:30])
    head_txt.write_text("\n".join(files["unlabeled"][1].read_text().splitlines()[:30]))
    r = run("import-embeddings", head_npy, "--ids", head_txt, "--split", "unlabeled", "--index", index, *flag)
    assert r.exit_code == 0, r.output
    r = import_cli(files, "unlabeled", index, *flag, "--skip-existing")
    assert r.exit_code == 0 and f"imported {len(keys) - 30} vectors" in r.output and "skipped 30 already" in r.output, r.output
    ref_vecs, ref_rows = imported_vectors(index), catalog_rows(index)
    assert len(ref_vecs) == len(ref_rows) == len(files["labeled"][2]) + len(keys)
    with open_store(index) as st:  # the shard of the first 30 unlabeled rows
        (name,) = st.db.execute("SELECT shard FROM images WHERE COALESCE(ext_id, path)=?", (keys[0],)).fetchone()
    damage(index / "shards" / f"{name}.npy", how)

    r = run("select", "--budget", "3", "--index", index, "--out", tmp_path / "before.csv")
    assert r.exit_code == 3 and "re-run build-index" in r.output and "--skip-existing" in r.output, r.output

    # without --skip-existing: the lost shard is repaired, the import refused in one line
    version, _, _ = catalog_state(index)
    r = import_cli(files, "unlabeled", index, *flag)
    assert r.exit_code == 2 and name in r.output and "30 imported vector(s)" in r.output, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("novelty: error")]
    assert len(errors) == 1 and "already in the index" in errors[0] and "--skip-existing" in errors[0], r.output
    lost_rows = [(i, k, s, "failed", VECTOR_LOST.format(name)) if k in keys[:30] else (i, k, s, st, why)
                 for i, k, s, st, why in ref_rows]
    assert catalog_rows(index) == lost_rows  # nothing imported
    after_repair = catalog_state(index)
    assert after_repair[0] == version + 1 and name not in after_repair[1] and after_repair[1] == after_repair[2]
    r = run("select", "--budget", "3", "--index", index, "--out", tmp_path / "between.csv")
    assert r.exit_code == 0 and "older than the catalog" not in r.output, r.output  # FAISS was rebuilt
    r = import_cli(files, "unlabeled", index, *flag)  # refused again, and now it changes nothing at all
    assert r.exit_code == 2 and name not in r.output, r.output
    assert catalog_rows(index) == lost_rows and catalog_state(index) == after_repair

    # with --skip-existing: the 30 lost vectors go back into their rows, the 20 others are skipped
    r = import_cli(files, "unlabeled", index, *flag, "--skip-existing")
    assert r.exit_code == 0, r.output
    assert f"imported 30 vectors into {index} as unlabeled" in r.output and f"skipped {len(keys) - 30} already" in r.output
    assert catalog_rows(index) == ref_rows  # same rows, same catalog ids, all embedded again
    vecs = imported_vectors(index)
    assert vecs.keys() == ref_vecs.keys()
    for k, v in ref_vecs.items():  # the same float32 rows, normalised and stored as float16 again
        np.testing.assert_array_equal(vecs[k], v, err_msg=k)
    with open_store(index) as st:
        assert st.manifest["faiss"]["ntotal"] == len(ref_vecs)
        (params, summary), = st.db.execute("SELECT params, summary FROM runs WHERE kind='import' ORDER BY id DESC LIMIT 1")
    assert json.loads(params)["skip_existing"] is True and json.loads(params)["paths"] is paths
    assert json.loads(summary)["imported"] == 30 and json.loads(summary)["skipped"] == len(keys) - 30
    r = run("select", "--budget", "3", "--index", index, "--out", tmp_path / "after.csv")
    assert r.exit_code == 0, r.output
    r = run("info", "--index", index)
    assert r.exit_code == 0 and "vector lost" not in r.output, r.output

    # --skip-existing on an intact index: nothing imported, nothing changed (no shard, no version, no run)
    before, faiss_stat = catalog_state(index), (index / "vectors.faiss").stat().st_mtime_ns
    with open_store(index) as st:
        runs = st.db.execute("SELECT COUNT(*) FROM runs").fetchone()
    r = import_cli(files, "unlabeled", index, *flag, "--skip-existing")
    assert r.exit_code == 0 and "imported 0 vectors" in r.output and f"skipped {len(keys)} already" in r.output, r.output
    assert catalog_state(index) == before and catalog_rows(index) == ref_rows
    assert (index / "vectors.faiss").stat().st_mtime_ns == faiss_stat
    with open_store(index) as st:
        assert st.db.execute("SELECT COUNT(*) FROM runs").fetchone() == runs


def test_a_lost_row_that_mark_labeled_moved_stays_labeled(tmp_path):
    from novelty.importer import import_embeddings

    keys = [f"ext{i}" for i in range(6)]
    np.save(tmp_path / "u.npy", np.random.default_rng(2).normal(size=(6, 8)).astype(np.float32))
    (tmp_path / "u.txt").write_text("\n".join(keys))
    (tmp_path / "done.txt").write_text("ext1\n")
    index = tmp_path / "idx"
    import_embeddings(index, tmp_path / "u.npy", tmp_path / "u.txt", "unlabeled")
    assert run("mark-labeled", tmp_path / "done.txt", "--index", index).exit_code == 0
    (shard,) = [p for p in (index / "shards").iterdir()]
    shard.unlink()
    r = import_embeddings(index, tmp_path / "u.npy", tmp_path / "u.txt", "unlabeled", skip_existing=True)
    assert (r.n, r.skipped, r.lost.lost) == (6, 0, 6)
    with open_store(index) as st:
        splits = dict(st.db.execute("SELECT ext_id, split FROM images WHERE status='embedded'"))
    assert splits == {k: "labeled" if k == "ext1" else "unlabeled" for k in keys}


def test_skip_existing_refuses_a_key_failed_for_another_reason(tmp_path):
    from novelty.importer import import_embeddings

    np.save(tmp_path / "u.npy", np.random.default_rng(3).normal(size=(3, 8)).astype(np.float32))
    (tmp_path / "u.txt").write_text("a\nb\nc\n")
    index = tmp_path / "idx"
    import_embeddings(index, tmp_path / "u.npy", tmp_path / "u.txt", "unlabeled")
    with create_store(index) as st, st.transaction() as db:
        db.execute("UPDATE images SET status='failed', reason='unreadable: odd', shard=NULL, row=NULL WHERE ext_id='b'")
    before = catalog_rows(index)
    with pytest.raises(InputError, match=r"1 id\(s\) are in the index but failed \(unreadable: odd\), e.g. 'b'"):
        import_embeddings(index, tmp_path / "u.npy", tmp_path / "u.txt", "unlabeled", skip_existing=True)
    assert catalog_rows(index) == before


def test_kept_blocks_match_a_mask_of_the_whole_array():
    from novelty.importer import kept_blocks

    rng = np.random.default_rng(4)
    X = rng.normal(size=(103, 5)).astype(np.float32)  # [103, 5]
    for p in (0.0, 0.3, 0.9, 1.0):
        keep = rng.random(len(X)) < p
        got = list(kept_blocks((X[s:s + 17] for s in range(0, len(X), 17)), keep, block=10))
        assert all(len(b) == 10 for b in got[:-1]) and all(0 < len(b) <= 10 for b in got)
        np.testing.assert_array_equal(np.concatenate(got) if got else X[:0], X[keep])
