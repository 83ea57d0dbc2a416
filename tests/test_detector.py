"""`novelty uncertainty` end to end: images in the index -> MC-dropout scores in the
catalog -> `select` defaults to hybrid and uses them."""
import csv
import json
import os
import textwrap

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
    r = run("info", "--index", index)  # the whole run's count, not the last session's
    assert r.exit_code == 0 and "uncertainty  73 scored" in r.output and f"uncertainty  {73 - kept} scored" not in r.output, \
        r.output


def test_a_resumed_run_that_finishes_after_an_import_is_the_one_select_uses(index, tmp_path):
    """latest = last to finish: a detector run stopped, then scores imported, then the
    detector run resumed and finished: its scores are the newer ones (QA: select took
    the import's, by run id, and did not say which run it used)."""
    cfg = DetectorCfg(spec=SPEC, kind="detection", passes=3, image_size=32, workers=0, commit_every=8, batch_size=4)
    first = score_index(index, cfg)
    with open_store(index, writable=True) as st:  # stopped after its first commits
        st.db.execute("UPDATE runs SET finished=NULL WHERE id=?", (first.run,))
        st.db.execute("DELETE FROM uncertainty WHERE run=? AND image > (SELECT MIN(image) + 30 FROM uncertainty WHERE run=?)",
                      (first.run, first.run))
        pool = [p for (p,) in st.db.execute("SELECT path FROM images WHERE split='unlabeled' AND status='embedded'")]
    with open(tmp_path / "u.csv", "w", newline="") as f:
        csv.writer(f).writerows([("id", "uncertainty"), *((p, 0.5) for p in pool)])
    r = run("import-uncertainty", tmp_path / "u.csv", "--index", index)
    assert r.exit_code == 0, r.output
    imported = int(r.output.split("(run #")[1].split(")")[0])
    assert score_index(index, cfg).run == first.run < imported  # resumed, and finished after the import
    r = run("select", "--budget", 5, "--index", index, "--out", tmp_path / "s.csv")
    assert r.exit_code == 0 and f"with hybrid (run #{imported + 1}, scores of uncertainty run #{first.run})" in r.output, \
        r.output
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert {float(x["uncertainty"]) for x in rows} != {0.5}
    r = run("import-uncertainty", tmp_path / "u.csv", "--index", index)  # now the import is the last to finish
    r = run("select", "--budget", 5, "--index", index, "--out", tmp_path / "s.csv")
    assert r.exit_code == 0 and "scores of uncertainty run #" in r.output and "(imported)" in r.output, r.output


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
    # fp32 runs keep the params they had before --precision existed, so an interrupted one still resumes;
    # likewise the default --max-pixels
    assert "precision" not in params[0] and params[1]["precision"] == "bf16"
    assert "max_pixels" not in params[0] and "max_pixels" not in params[1]


def test_segmentation_kind(index):
    r = run("uncertainty", "--detector", "tests._tiny_models:make_segmenter", "--kind", "segmentation", "--passes", 3,
            "--image-size", 32, "--index", index, "--workers", 0)
    if "has no attribute" in r.output:
        pytest.skip("no segmenter factory in tests/_tiny_models.py")
    assert r.exit_code == 0, r.output
    assert len(scores(index)) == 73
    assert "mean of the top 5% of pixels" in r.output and "aggregation" not in r.output


def test_a_nan_or_inf_score_is_a_failure_with_its_reason(index, tmp_path):
    """A model whose outputs are NaN or inf for some images: those images are failed,
    "non-finite score", not stored as scores of nothing (SQLite keeps NaN as NULL), which
    were counted as scored, never retried, and filled with the mean by select."""
    f = tmp_path / "nanseg.py"
    f.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Seg(nn.Module):
            def __init__(self, bad):
                super().__init__()
                self.c1, self.d, self.c2, self.bad = nn.Conv2d(3, 4, 3, padding=1), nn.Dropout(0.5), nn.Conv2d(4, 3, 1), bad
            def forward(self, x):
                y = self.c2(self.d(self.c1(x)))
                some = x.mean(dim=(1, 2, 3)) > 0.45
                return torch.where(some[:, None, None, None], torch.full_like(y, self.bad), y)

        def nan():
            torch.manual_seed(0)
            return Seg(float("nan"))

        def inf():
            torch.manual_seed(0)
            return Seg(float("inf"))
    """))
    for kind in ("nan", "inf"):
        r = run("uncertainty", "--detector", f"{f}:{kind}", "--kind", "segmentation", "--passes", 3, "--image-size", 32,
                "--index", index, "--workers", 0)
        got = scores(index)
        bad = [i for i, v in got.items() if v is None]
        assert r.exit_code == 0 and 0 < len(bad) < len(got) == 73, (kind, r.output)
        assert f"{len(bad)} failed" in r.output and f"failed: non-finite score: {len(bad)}" in r.output, r.output
        with open_store(index) as st:
            reasons = {x for (x,) in st.db.execute("SELECT reason FROM uncertainty WHERE value IS NULL AND run = "
                                                   "(SELECT MAX(id) FROM runs WHERE kind='uncertainty')")}
        assert reasons == {"non-finite score: the model's outputs gave NaN or inf for this image"}


@pytest.mark.parametrize("field", ["scores", "boxes", "probs"])
def test_a_detector_giving_nan_is_failed_not_scored(index, tmp_path, field):
    """NaN scores passed no threshold and scored 0 (the pool's 'blind detector' score),
    NaN boxes matched nothing and scored 1; both were stored as scores (QA 14c D7)."""
    f = tmp_path / "nandet.py"
    f.write_text(textwrap.dedent(f"""
        import torch
        from tests._tiny_models import make_detector

        class NaNs(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = make_detector()
            def forward(self, images):
                out = self.inner(images)
                x = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
                for d, img in zip(out, x):
                    if img.mean() > 0.45:
                        d[{field!r}] = torch.full_like(d[{field!r}], float("nan"))
                return out

        def build():
            return NaNs()
    """))
    r = run("uncertainty", "--detector", f"{f}:build", "--kind", "detection", "--passes", 3, "--image-size", 32,
            "--index", index, "--workers", 0)
    got = scores(index)
    bad = [i for i, v in got.items() if v is None]
    assert r.exit_code == 0 and 0 < len(bad) < len(got) == 73, r.output
    assert f"failed: non-finite score: {len(bad)}" in r.output, r.output


def test_a_model_that_fails_on_every_batch_warns_three_times_and_names_the_error(index, tmp_path):
    """A forward that raises: each batch is retried image by image, as before, but only
    the first 3 batches are warned about (a million images made 125,000 lines), and the
    summary shows the whole error once, not only its type."""
    f = tmp_path / "broken.py"
    f.write_text(textwrap.dedent("""
        from torch import nn

        class Broken(nn.Module):
            def __init__(self):
                super().__init__()
                self.d = nn.Dropout(0.5)
            def forward(self, x):
                raise RuntimeError("Couldn't load custom C++ ops. This can happen if your torch and torchvision differ")

        def build():
            return Broken()
    """))
    r = run("uncertainty", "--detector", f"{f}:build", "--kind", "segmentation", "--passes", 3, "--image-size", 32,
            "--batch-size", 8, "--index", index, "--workers", 0)
    assert r.exit_code == 1 and "0 images scored, 73 failed" in r.output, r.output
    assert r.output.count("retrying image by image") == 3, r.output
    bar_and_warning = [x for x in r.output.replace("\r", "\n").splitlines() if "img/s" in x and "novelty:" in x]
    assert not bar_and_warning, bar_and_warning  # each warning on its own line, not at the end of the bar's
    assert "further failing batches are retried without a warning each" in r.output
    assert "failed: RuntimeError: 73" in r.output and "e.g. RuntimeError: Couldn't load custom C++ ops." in r.output


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
        (["--detector", SPEC, "--kind", "detection", "--passes", "1"], "passes (--passes) must be >= 2"),
        (["--detector", SPEC, "--kind", "detection", "--aggregation", "median"], "median"),
        (["--detector", SPEC, "--kind", "detection", "--device", "cpu", "--precision", "fp16"], "fp16 runs on CUDA only"),
        (["--detector", SPEC, "--kind", "detection", "--precision", "fp8"], "fp8"),
        (["--detector", SPEC, "--kind", "detection", "--max-pixels", "0"], "--max-pixels must be >= 1, got 0"),
        (["--detector", SPEC, "--kind", "detection", "--max-pixels", "1000"],
         "--image-size 32 makes inputs of 1024 pixels, over --max-pixels 1000"),
    ],
)
def test_bad_uncertainty_arguments(index, args, message):
    r = run("uncertainty", "--index", index, "--image-size", 32, "--workers", 0, *args)
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


@pytest.fixture
def big_index(tmp_path):
    """Four 32x32 unlabeled images (1,024 px) and one 100x60 (6,000 px), over a cap of 5,000."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, sizes in (("labeled", [(32, 32)] * 2), ("unlabeled", [(32, 32)] * 4 + [(100, 60)])):
        (tmp_path / split).mkdir()
        for i, size in enumerate(sizes):
            a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / split / f"{'big' if size[0] == 100 else 'img'}{i}.png")
    idx = tmp_path / "idx"
    r = run("build-index", "--index", idx, "--model", TINY, "--pretrained", "none",
            "--labeled", tmp_path / "labeled", "--unlabeled", tmp_path / "unlabeled")
    assert r.exit_code == 0, r.output
    return idx


def _reasons(idx) -> dict:
    """path -> (value, reason) in the latest uncertainty run."""
    with open_store(idx) as st:
        q = ("SELECT i.path, u.value, u.reason FROM uncertainty u JOIN images i ON i.id = u.image "
             "WHERE u.run=(SELECT MAX(id) FROM runs WHERE kind='uncertainty')")
        return {os.path.basename(p): (v, why) for p, v, why in st.db.execute(q)}


def test_image_over_max_pixels_is_failed_once_and_the_run_goes_on(big_index):
    args = ("uncertainty", "--detector", SPEC, "--kind", "detection", "--passes", 3, "--index", big_index,
            "--workers", 0, "--max-pixels", 5000)
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert "4 images scored, 1 failed" in r.output and "failed: too large: 1" in r.output
    assert "too large: over --max-pixels 5000" in r.output and "use --image-size S or raise --max-pixels" in r.output
    got = _reasons(big_index)
    assert got["big4.png"] == (None, "too large: 100x60 exceeds the 5000 pixel limit of uncertainty (--max-pixels); "
                                     "score it with --image-size S or raise the limit")
    assert len(got) == 5 and all(v is not None for name, (v, _) in got.items() if name != "big4.png")
    with open_store(big_index, writable=True) as st:
        (run_id, params), = st.db.execute("SELECT id, params FROM runs WHERE kind='uncertainty'").fetchall()
        assert json.loads(params)["max_pixels"] == 5000  # it changes what is scored: another cap is another run
        # killed after the commit that held the failure: the resume does not try the image again
        st.db.execute("UPDATE runs SET finished=NULL WHERE id=?", (run_id,))
        st.db.execute("DELETE FROM uncertainty WHERE run=? AND value IS NOT NULL", (run_id,))
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert f"run #{run_id}: 4 images scored, 0 failed" in r.output, r.output
    assert "(and 1 before the run was interrupted: 4 scored, 1 failed in all)" in r.output, r.output
    assert _reasons(big_index) == got


def test_max_pixels_applies_to_the_input_the_model_gets(big_index, tmp_path):
    base = ("uncertainty", "--detector", SPEC, "--kind", "detection", "--passes", 3, "--index", big_index,
            "--workers", 0, "--max-pixels", 5000)
    # resized to 32x32 first: the 100x60 image is decoded (under PIL's bomb limit) and scored
    r = run(*base, "--image-size", 32)
    assert r.exit_code == 0 and "5 images scored, 0 failed" in r.output, r.output
    # a factory's own preprocess that keeps the size: its tensor is what is checked
    f = tmp_path / "as_is.py"
    f.write_text(textwrap.dedent("""
        import numpy as np
        import torch

        from tests._tiny_models import make_detector

        def as_is(img):
            return torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255)

        def build():
            return make_detector(), as_is
    """))
    r = run(*base[:2], f"{f}:build", *base[3:])
    assert r.exit_code == 0 and "4 images scored, 1 failed" in r.output, r.output
    assert _reasons(big_index)["big4.png"] == (None, "too large: the preprocess made a 100x60 input, over the 5000 pixel "
                                                     "limit of uncertainty (--max-pixels); resize it there or raise the limit")


def test_preprocess_of_the_wrong_shape_is_named(index, tmp_path):
    # a grey [H, W] tensor instead of [3, H, W]: one image's T=3 passes used to reach the
    # segmenter as one unbatched RGB image, and after torch's Dropout2d warning the error
    # blamed the model's output
    f = tmp_path / "grey.py"
    f.write_text(textwrap.dedent("""
        import numpy as np
        import torch
        from torch import nn

        def grey(img):
            return torch.from_numpy(np.asarray(img.convert("L").resize((32, 32)), dtype=np.float32) / 255)

        def build():
            return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Dropout2d(0.5), nn.Conv2d(4, 3, 1)), grey
    """))
    r = run("uncertainty", "--detector", f"{f}:build", "--kind", "segmentation", "--passes", 3, "--batch-size", 1,
            "--index", index, "--workers", 0)
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    said = [line for line in r.output.strip().splitlines() if not line.startswith("mc-dropout:")]  # the bar, then the error
    assert said == ["novelty: error: the preprocess returned a tensor of shape [32, 32] for an image; "
                    "it must return a float tensor [3, H, W]"], r.output
    history = run("info", "--index", index).output.splitlines()
    line = [x for x in history if " uncertainty" in x][-1]  # the run says why it stopped
    assert "(stopped: ModelError: the preprocess returned a tensor of shape [32, 32]" in line, history


def _backbone_features(paths) -> np.ndarray:
    """The tiny detector's own backbone, mean-pooled: the vectors a user would export
    from their detector to index with (no CLIP involved)."""
    import torch
    from PIL import Image

    from tests._tiny_models import SIZE, make_detector

    model = make_detector().eval()
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE)), np.float32) / 255)
                     .permute(2, 0, 1) for p in paths])
    with torch.no_grad():
        return model.backbone(x).mean((2, 3)).numpy()


def _decodable(folder) -> list:
    from PIL import Image

    out = []
    for p in sorted(folder.iterdir()):
        try:
            with Image.open(p) as im:
                im.load()
            out.append(p)
        except Exception:  # the sample's broken files: a user has no vectors for them either
            pass
    return out


def test_detector_features_imported_under_paths(tmp_path, sample_dir, monkeypatch):
    """import-embeddings --paths: the detector's own features index the images, and every
    command that opens an image (uncertainty, report, mark-labeled and neighbors by path) works."""
    idx = tmp_path / "idx"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for split in ("labeled", "unlabeled"):
        files = _decodable(sample_dir / split)
        np.save(tmp_path / f"{split}.npy", _backbone_features(files))
        # relative paths, read against the list's folder (as build-index reads a list), not the current one
        (tmp_path / f"{split}.txt").write_text("\n".join(os.path.relpath(p, tmp_path) for p in files))
        r = run("import-embeddings", tmp_path / f"{split}.npy", "--ids", tmp_path / f"{split}.txt", "--split", split,
                "--paths", "--index", idx, "--model", "tiny-detector-backbone")
        assert r.exit_code == 0, r.output
        assert f"imported {len(files)} vectors" in r.output and "under their image paths" in r.output
    n_pool = len(_decodable(sample_dir / "unlabeled"))
    with open_store(idx) as st:
        ids, X = st.vectors()
        got = {p: x for (_, p, _), x in zip((st.describe(ids)[i] for i in ids.tolist()), X)}
    first = _decodable(sample_dir / "unlabeled")[0]
    assert str(first) in got  # stored as an absolute path
    ref = _backbone_features([first])[0]
    np.testing.assert_allclose(got[str(first)].astype(np.float32), ref / np.linalg.norm(ref), atol=2e-3)

    # the detector runs on the imported images: every one is scored, none skipped for lack of a file
    r = run("uncertainty", "--detector", SPEC, "--kind", "detection", "--passes", 3, "--image-size", 32,
            "--aggregation", "mean", "--index", idx, "--workers", 0)
    assert r.exit_code == 0, r.output
    assert f"{n_pool} images scored, 0 failed" in r.output
    assert sum(v is not None for v in scores(idx).values()) == n_pool
    r = run("select", "--budget", 5, "--index", idx, "--out", tmp_path / "sel.csv")
    assert r.exit_code == 0 and "with hybrid" in r.output, r.output
    rows = list(csv.DictReader(open(tmp_path / "sel.csv")))
    assert len(rows) == 5 and all(row["path"].startswith(str(sample_dir / "unlabeled")) for row in rows)

    # the report shows thumbnails, where vectors imported under ids have none
    r = run("report", "--selection", tmp_path / "sel.csv", "--out", tmp_path / "r.html", "--index", idx)
    assert r.exit_code == 0, r.output
    page = (tmp_path / "r.html").read_text()
    assert 'class="noimg"' not in page and page.count('src="data:image/jpeg;base64,') >= 5

    # by path: mark-labeled and neighbors
    (tmp_path / "done.txt").write_text("\n".join(row["path"] for row in rows[:2]))
    r = run("mark-labeled", tmp_path / "done.txt", "--index", idx)
    assert r.exit_code == 0, r.output
    with open_store(idx) as st:
        moved, _ = st.resolve([rows[0]["path"], rows[1]["path"]])
        assert {s for _, (_, _, s) in st.describe(moved).items()} == {"labeled"}
    r = run("neighbors", rows[2]["path"], "--k", 3, "--json", "--index", idx)
    assert r.exit_code == 0, r.output
    hits = json.loads(r.output)["neighbors"]
    assert len(hits) == 3 and all(h["path"] != rows[2]["path"] for h in hits)


def test_import_under_paths_refuses_what_it_cannot_place(tmp_path, sample_dir):
    idx = tmp_path / "idx"
    files = _decodable(sample_dir / "unlabeled")[:4]
    np.save(tmp_path / "v.npy", _backbone_features(files))
    np.save(tmp_path / "v2.npy", _backbone_features(files[:2]))

    def imp(lines, vectors="v.npy"):
        (tmp_path / "ids.txt").write_text("\n".join(map(str, lines)))
        return run("import-embeddings", tmp_path / vectors, "--ids", tmp_path / "ids.txt", "--split", "unlabeled",
                   "--paths", "--index", idx)

    # a list written for another folder: nothing exists, one line, nothing written
    r = imp([f"elsewhere/{p.name}" for p in files])
    assert r.exit_code == 2 and "none of the 4 paths" in r.output and len(r.output.strip().splitlines()) == 1
    # two spellings of one file
    r = imp([files[0], f"{files[0].parent}/./{files[0].name}"], "v2.npy")
    assert r.exit_code == 2 and "are the same file" in r.output
    assert not idx.exists()  # both refused before anything was written
    r = imp([files[0], f"{files[1]}\0"], "v2.npy")
    assert r.exit_code == 2 and "NUL byte" in r.output and "Traceback" not in r.output
    assert not idx.exists()  # all three refused before anything was written
    # a file that has gone since the vectors were made, and a folder: imported, with a warning
    gone = tmp_path / "gone.png"
    r = imp([*files[:2], gone, tmp_path])
    assert r.exit_code == 0, r.output
    assert "2 of 4 paths are not image files now" in r.output and str(gone) in r.output
    # the same paths again
    r = imp(files[:2], "v2.npy")
    assert r.exit_code == 2 and "2 path(s) already in the index" in r.output
    with open_store(idx) as st:
        assert st.db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 4
        assert st.db.execute("SELECT COUNT(*) FROM images WHERE path IS NOT NULL AND size IS NULL").fetchone()[0] == 2


def test_one_image_is_one_row_whether_imported_under_an_id_or_a_path(tmp_path, sample_dir):
    idx = tmp_path / "idx"
    f = _decodable(sample_dir / "unlabeled")[:2]
    np.save(tmp_path / "v.npy", _backbone_features(f))
    (tmp_path / "ids.txt").write_text("\n".join(map(str, f)))
    base = ("import-embeddings", tmp_path / "v.npy", "--ids", tmp_path / "ids.txt", "--split", "unlabeled", "--index", idx)
    assert run(*base).exit_code == 0  # the paths as opaque ids
    r = run(*base, "--paths")
    assert r.exit_code == 2 and "2 of these are already in the index as imported ids" in r.output
    idx2 = tmp_path / "idx2"
    base2 = ("import-embeddings", tmp_path / "v.npy", "--ids", tmp_path / "ids.txt", "--split", "unlabeled", "--index", idx2)
    assert run(*base2, "--paths").exit_code == 0
    r = run(*base2)
    assert r.exit_code == 2 and "already in the index as image paths" in r.output
    for i in (idx, idx2):
        with open_store(i) as st:
            assert st.db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 2
