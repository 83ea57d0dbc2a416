"""`novelty uncertainty` end to end: images in the index -> MC-dropout scores in the
catalog -> `select` defaults to hybrid and uses them."""
import csv
import json
import sqlite3

import numpy as np
import pytest

from novelty.detector import DetectorCfg, score_index
from novelty.store import open_store
from tests.conftest import TINY, run

SPEC = "tests._tiny_models:make_detector"


@pytest.fixture
def index(tmp_path, sample_dir):
    idx = tmp_path / "idx"
    r = run("build-index", "--index", idx, "--model", TINY, "--pretrained", "none",
            "--labeled", sample_dir / "labeled", "--unlabeled", sample_dir / "unlabeled")
    assert r.exit_code == 0, r.output
    return idx


def scores(idx, run_id=None):
    with open_store(idx) as st:
        q = "SELECT image, value FROM uncertainty WHERE run=(SELECT MAX(id) FROM runs WHERE kind='uncertainty')"
        return dict(st.db.execute(q).fetchall())


def test_uncertainty_then_hybrid_select(index, tmp_path):
    # an untrained detector has a flickering box in every image, so `max` saturates at 1;
    # `mean` ranks the images
    r = run("uncertainty", "--detector", SPEC, "--kind", "detection", "--passes", 4, "--image-size", 32, "--index", index,
            "--workers", 0, "--aggregation", "mean")
    assert r.exit_code == 0, r.output
    assert "73 images scored, 0 failed" in r.output
    first = scores(index)
    assert len(first) == 73 and all(v is not None and v >= 0 for v in first.values())
    assert len(set(first.values())) > 1  # the detector really disagrees with itself, differently per image
    # the same command gives the same scores (seeded masks)
    assert run("uncertainty", "--detector", SPEC, "--kind", "detection", "--passes", 4, "--image-size", 32,
               "--index", index, "--workers", 0, "--aggregation", "mean").exit_code == 0
    assert scores(index) == first
    out = tmp_path / "sel.csv"
    r = run("select", "--budget", 10, "--index", index, "--out", out)
    assert r.exit_code == 0 and "with hybrid" in r.output, r.output
    rows = list(csv.DictReader(open(out)))
    with open_store(index) as st:
        by_id = {str(i): v for i, v in first.items()}
    assert all(float(x["uncertainty"]) == pytest.approx(by_id[x["id"]]) for x in rows)


def test_unshared_trunk_gives_the_same_scores(index):
    args = ("uncertainty", "--detector", SPEC, "--kind", "detection", "--passes", 4, "--image-size", 32,
            "--index", index, "--workers", 0, "--aggregation", "mean")
    assert run(*args).exit_code == 0
    shared = scores(index)
    r = run(*args, "--no-share-trunk")
    assert r.exit_code == 0, r.output
    unshared = scores(index)
    assert shared.keys() == unshared.keys()
    assert max(abs(shared[k] - unshared[k]) for k in shared) < 1e-5


def test_killed_scoring_resumes_the_open_run(index):
    cfg = DetectorCfg(spec=SPEC, kind="detection", passes=3, image_size=32, workers=0, commit_every=8, batch_size=4)
    full = score_index(index, cfg)
    want = scores(index)
    # simulate a run killed after its first commits: an open run holding part of the scores
    with open_store(index, writable=True) as st:
        st.db.execute("UPDATE runs SET finished=NULL WHERE id=?", (full.run,))
        st.db.execute("DELETE FROM uncertainty WHERE run=? AND image > (SELECT MIN(image) + 30 FROM uncertainty WHERE run=?)",
                      (full.run, full.run))
        kept = st.db.execute("SELECT COUNT(*) FROM uncertainty WHERE run=?", (full.run,)).fetchone()[0]
    again = score_index(index, cfg)
    assert again.run == full.run and again.resumed == kept and again.scored == 73 - kept
    assert scores(index) == want


def test_bf16_run_is_its_own_run(index):
    args = ("uncertainty", "--detector", SPEC, "--kind", "detection", "--passes", 4, "--image-size", 32,
            "--index", index, "--workers", 0, "--aggregation", "mean")
    assert run(*args).exit_code == 0
    fp32 = scores(index)
    r = run(*args, "--precision", "bf16")
    assert r.exit_code == 0 and "mean, bf16)" in r.output, r.output
    bf16 = scores(index)
    assert fp32.keys() == bf16.keys() and fp32 != bf16
    # an untrained detector's boxes sit near the score threshold, so rounding flips some of
    # them: close on average (0.026 against a mean of 0.61 when written), not image by image
    d = np.array([abs(fp32[k] - bf16[k]) for k in fp32])
    assert d.mean() < 0.1 * np.mean(list(fp32.values()))
    with open_store(index) as st:
        params = [json.loads(p) for (p,) in st.db.execute("SELECT params FROM runs WHERE kind='uncertainty' ORDER BY id")]
    # fp32 runs keep the params they had before --precision existed, so an interrupted one still resumes
    assert "precision" not in params[0] and params[1]["precision"] == "bf16"


def test_segmentation_kind(index):
    r = run("uncertainty", "--detector", "tests._tiny_models:make_segmenter", "--kind", "segmentation", "--passes", 3,
            "--image-size", 32, "--index", index, "--workers", 0)
    if "has no attribute" in r.output:
        pytest.skip("no segmenter factory in tests/_tiny_models.py")
    assert r.exit_code == 0, r.output
    assert len(scores(index)) == 73
    assert "mean of the top 5% of pixels" in r.output and "aggregation" not in r.output


def test_run_that_scores_nothing_fails_and_select_ignores_it(index, sample_dir, tmp_path):
    # the images were moved after indexing: every one fails, the run says so and exits non-zero
    moved = tmp_path / "moved"
    (sample_dir / "unlabeled").rename(moved)
    try:
        r = run("uncertainty", "--detector", SPEC, "--kind", "detection", "--passes", 3, "--image-size", 32,
                "--index", index, "--workers", 0)
    finally:
        moved.rename(sample_dir / "unlabeled")
    assert r.exit_code == 1, r.output
    assert "0 images scored" in r.output and "no image could be scored" in r.output
    assert "select now defaults" not in r.output and "Traceback" not in r.output
    assert set(scores(index).values()) == {None}  # every image recorded, with its reason
    r = run("select", "--budget", 5, "--index", index, "--out", tmp_path / "sel.csv")
    assert r.exit_code == 0 and "with kcenter" in r.output, r.output
    # after a good run, a later run that scores nothing does not hide it
    args = ("uncertainty", "--detector", SPEC, "--kind", "detection", "--passes", 3, "--image-size", 32, "--index", index, "--workers", 0)
    assert run(*args).exit_code == 0
    (sample_dir / "unlabeled").rename(moved)
    try:
        assert run(*args, "--seed", 1).exit_code == 1
    finally:
        moved.rename(sample_dir / "unlabeled")
    r = run("select", "--budget", 5, "--index", index, "--out", tmp_path / "sel.csv")
    assert r.exit_code == 0 and "with hybrid" in r.output, r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--detector", "nocolon", "--kind", "detection"], "expected 'package.module:factory'"),
        (["--detector", "tests._tiny_models:make_plain_cnn", "--kind", "detection"], "dropout"),
        (["--detector", SPEC, "--kind", "detection", "--passes", "1"], "passes must be >= 2"),
        (["--detector", SPEC, "--kind", "detection", "--aggregation", "median"], "median"),
        (["--detector", SPEC, "--kind", "detection", "--device", "cpu", "--precision", "fp16"], "fp16 runs on CUDA only"),
        (["--detector", SPEC, "--kind", "detection", "--precision", "fp8"], "fp8"),
    ],
)
def test_bad_uncertainty_arguments(index, args, message):
    r = run("uncertainty", "--index", index, "--image-size", 32, "--workers", 0, *args)
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
