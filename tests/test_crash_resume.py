"""Kill build-index with SIGKILL mid-run, resume, and compare with an uninterrupted run:
the index opens cleanly, nothing is duplicated, nothing is lost, vectors are identical."""
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from novelty.sample import SampleCfg, make_sample
from novelty.store import open_store

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
