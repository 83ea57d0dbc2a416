"""The HTML report: its numbers against brute-force numpy, escaping of hostile file
names, self-containment, and (when chromium is on PATH) a headless render."""
import csv
import os
import shutil

import numpy as np
import pytest

from novelty.report import ReportCfg, collect
from novelty.store import open_store
from tests.conftest import TINY, copy_samples, run, screenshot, unit
from tests.test_labeling import record_selection

EVIL_DIR = '"><b onmouseover=x>bold<'  # with the file inside: .../"><b onmouseover=x>bold</b>.png
EVIL = '"><b onmouseover=x>bold</b>.png'


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.fixture(scope="module")
def image_index(tmp_path_factory, sample_dir):
    """6 labeled and 10 unlabeled sample images, one of them under a hostile name."""
    tmp = tmp_path_factory.mktemp("rep")
    copy_samples(tmp, sample_dir, 6, 10)
    (tmp / "unlabeled" / EVIL_DIR).mkdir()
    shutil.copy(sorted((sample_dir / "unlabeled").glob("*.jpg"))[20], tmp / "unlabeled" / EVIL_DIR / "b>.png")
    idx = tmp / "idx"
    r = run("build-index", "--index", idx, "--model", TINY, "--pretrained", "none", "--device", "cpu",
            "--labeled", tmp / "labeled", "--unlabeled", tmp / "unlabeled")
    assert r.exit_code == 0, r.output
    return idx, tmp


def test_report_escapes_names_and_is_self_contained(image_index, tmp_path):
    idx, src = image_index
    evil_path = str(src / "unlabeled" / EVIL_DIR / "b>.png")
    assert evil_path.endswith(EVIL)
    with open_store(idx) as st:
        ids, _ = st.vectors("unlabeled")
        paths = {i: p for i, (_, p, _) in st.describe(ids).items()}
    evil_id = [i for i, p in paths.items() if p == evil_path][0]
    picks = [evil_id, *[i for i in ids.tolist() if i != evil_id][:3]]
    write_csv(tmp_path / "sel.csv", [{"rank": r + 1, "id": i, "path": paths[i], "priority": 0.5, "novelty": 0.25}
                                     for r, i in enumerate(picks)])
    out = tmp_path / "r.html"
    r = run("report", "--selection", tmp_path / "sel.csv", "--out", out, "--index", idx, "--k", 2)
    assert r.exit_code == 0 and "report on 4 picks (covering radius computed)" in r.output, r.output
    page = out.read_text()
    assert "<b onmouseover" not in page and "bold</b>" not in page
    assert "&quot;&gt;&lt;b onmouseover=x&gt;bold&lt;/b&gt;.png" in page
    assert page.count('src="data:image/jpeg;base64,') >= 4 + 4 * 2 - 1  # picks and their neighbours (one may repeat)
    for external in ("http://", "https://", "<script", "<link", "@import", "url("):
        assert external not in page
    assert page.count("<svg") == 5 and page.count("<tr>") == 5  # 3 histograms, the covering curve, the map
    assert page.index(f">{evil_id}<") < page.index(f">{picks[1]}<")  # file order


def test_a_pick_deleted_since_the_selection_is_left_out_with_a_warning(tmp_path, sample_dir):
    """A picked file deleted, then build-index: the report is written on the other picks
    and says which was left out (it stopped with 'id N has no vector'); mark-labeled
    marks it, and warns that it cannot be a center until its file is back."""
    lab, unl = copy_samples(tmp_path, sample_dir, 4, 8)
    idx = tmp_path / "idx"
    build = ("build-index", "--index", idx, "--model", TINY, "--pretrained", "none", "--device", "cpu",
             "--labeled", lab, "--unlabeled", unl)
    assert run(*build).exit_code == 0
    assert run("select", "--budget", 3, "--index", idx, "--out", tmp_path / "s.csv").exit_code == 0
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    os.unlink(rows[1]["path"])
    assert run(*build).exit_code == 0
    r = run("report", "--selection", tmp_path / "s.csv", "--out", tmp_path / "r.html", "--index", idx)
    assert r.exit_code == 0 and "report on 2 picks" in r.output, r.output
    assert f"1 of the 3 picks have no vector now (deleted or failed since the selection, e.g. {rows[1]['path']})" in r.output
    page = (tmp_path / "r.html").read_text()
    assert rows[0]["path"] in page and rows[1]["path"] not in page
    r = run("mark-labeled", "--selection", tmp_path / "s.csv", "--index", idx)
    assert r.exit_code == 0 and "marked 3 image(s) labeled" in r.output, r.output
    assert f"1 of them has no vector now (e.g. {rows[1]['path']}: not found" in r.output, r.output


@pytest.fixture
def vec_index(tmp_path):
    rng = np.random.default_rng(5)
    idx = tmp_path / "idx"
    for name, n, split in (("l", 25, "labeled"), ("p", 90, "unlabeled")):
        np.save(tmp_path / f"{name}.npy", unit(rng.normal(size=(n, 10))).astype(np.float32))
        (tmp_path / f"{name}.txt").write_text("\n".join(f"{name}{i:03d}" for i in range(n)))
        assert run("import-embeddings", tmp_path / f"{name}.npy", "--ids", tmp_path / f"{name}.txt", "--split", split,
                   "--index", idx).exit_code == 0
    return idx


def brute(idx, picked):
    """k-nearest labeled, pool and leave-one-out novelty, covering curve: plain numpy."""
    with open_store(idx) as st:
        pid, P = st.vectors("unlabeled")
        lid, L = st.vectors("labeled")
    keep = ~np.isin(lid, picked)  # the labeled set as it was at selection time
    pool = np.concatenate([pid, lid[~keep]])
    X = unit(np.concatenate([P, L[~keep]]))  # the renormalised rows every path uses
    L, lid = unit(L[keep]), lid[keep]
    DL = 1 - X @ L.T
    d = DL.min(axis=1, initial=np.inf)
    S = X[[int(np.flatnonzero(pool == i)[0]) for i in picked]]
    Dsel = 1 - S @ L.T
    LL = 1 - L @ L.T
    np.fill_diagonal(LL, np.inf)
    LL = np.concatenate([LL, np.full((len(LL), 1), np.inf)], axis=1)  # min of nothing is inf
    cover, curve = d.copy(), [d.max()]
    for s in S:
        cover = np.minimum(cover, 1 - X @ s)
        curve.append(max(cover.max(), 0.0))
    return Dsel, lid, np.sort(d), np.sort(LL.min(axis=1)), np.array(curve)


def test_report_numbers_match_brute_force(vec_index, tmp_path):
    rid, picked, rows = record_selection(vec_index, 12, tmp_path / "sel.csv")
    with open_store(vec_index) as st:
        data = collect(st, rows, ReportCfg(k=3))
    Dsel, lid, pool_nov, lab_nov, curve = brute(vec_index, picked)
    order = np.argsort(Dsel, axis=1)[:, :3]
    np.testing.assert_array_equal(data.near_I, lid[order])
    np.testing.assert_allclose(data.near_D, np.take_along_axis(Dsel, order, 1), atol=1e-5)
    np.testing.assert_allclose(np.sort(data.pool_novelty), pool_nov, atol=1e-5)
    np.testing.assert_allclose(np.sort(data.labeled_novelty), lab_nov, atol=1e-5)
    assert data.radius_source == f"run #{rid}" and data.run == rid  # the recorded trace
    np.testing.assert_allclose(data.radius, curve, atol=1e-5)
    # the same images in another order match no run: the curve is computed, for that order
    rev = rows[::-1]
    with open_store(vec_index) as st:
        data = collect(st, rev, ReportCfg(k=3))
    assert data.radius_source == "computed" and data.run is None
    np.testing.assert_allclose(data.radius, brute(vec_index, picked[::-1])[4], atol=1e-5)
    # after mark-labeled the page still shows the index as it was at selection time
    assert run("mark-labeled", "--selection", tmp_path / "sel.csv", "--index", vec_index).exit_code == 0
    with open_store(vec_index) as st:
        after = collect(st, rows, ReportCfg(k=3))
    np.testing.assert_array_equal(after.near_I, lid[order])
    np.testing.assert_allclose(np.sort(after.pool_novelty), pool_nov, atol=1e-5)
    assert after.radius_source == f"run #{rid}"


def test_excluded_images_leave_the_report_pool_but_picks_stay(vec_index, tmp_path):
    rid, picked, rows = record_selection(vec_index, 5, tmp_path / "sel.csv")
    with open_store(vec_index) as st:
        before = collect(st, rows, ReportCfg(k=1, sample=10 ** 6))
        unl = st.embedded("unlabeled").ids
        shown = st.describe(unl)
    others = [i for i in unl.tolist() if i not in set(picked.tolist())][:7]
    (tmp_path / "x.txt").write_text("\n".join([shown[i][0] for i in others] + [rows[0]["id"]]))  # a pick skipped too
    assert run("exclude", tmp_path / "x.txt", "--index", vec_index).exit_code == 0
    with open_store(vec_index) as st:
        after = collect(st, rows, ReportCfg(k=1, sample=10 ** 6))
    assert after.counts["pool"] == before.counts["pool"] - 7 and after.counts["picks"] == 5
    assert len(after.pool_novelty) == len(before.pool_novelty) - 7
    # the run's recorded curve is of its own pool: this one is computed, and matches numpy on the pool shown
    assert before.radius_source == f"run #{rid}" and after.radius_source == "computed"
    with open_store(vec_index) as st:
        pool = np.union1d(st.pool_ids()[0], picked)
        X = unit(st.vectors(ids=pool)[1])
        lid, L = st.vectors("labeled")
    L = unit(L[~np.isin(lid, picked)])
    cover = (1 - X @ L.T).min(axis=1)
    curve = [cover.max()]
    for i in picked:
        cover = np.minimum(cover, 1 - X @ X[np.searchsorted(pool, i)])
        curve.append(max(cover.max(), 0.0))
    np.testing.assert_allclose(after.radius, curve, atol=1e-5)


def test_the_embedding_map_is_numpys_pca_of_the_same_rows(vec_index, tmp_path):
    rid, picked, rows = record_selection(vec_index, 12, tmp_path / "sel.csv")
    with open_store(vec_index) as st:
        data = collect(st, rows, ReportCfg(k=1))
        pool = np.union1d(st.embedded("unlabeled").ids, picked)
        lab = st.embedded("labeled").ids
        lab = lab[~np.isin(lab, picked)]
        P, L, S = (unit(st.vectors(ids=i)[1]) for i in (pool, lab, np.sort(picked)))
    S = S[np.argsort(np.argsort(picked))]  # back to rank order
    fit = np.concatenate([P, L])
    mean = fit.mean(axis=0)
    cov = (fit - mean).T @ (fit - mean)
    w, V = np.linalg.eigh(cov)  # ascending
    axes = V[:, ::-1][:, :2].T
    axes *= np.sign(axes[np.arange(2), np.abs(axes).argmax(axis=1)])[:, None]
    m = data.embedding_map
    np.testing.assert_allclose(m["pool"], (P - mean) @ axes.T, atol=1e-4)
    np.testing.assert_allclose(m["labeled"], (L - mean) @ axes.T, atol=1e-4)
    np.testing.assert_allclose(m["picks"], (S - mean) @ axes.T, atol=1e-4)
    assert m["explained"] == pytest.approx(w[::-1][:2].sum() / w.sum(), rel=1e-6)
    page = (tmp_path / "r.html")
    assert run("report", "--selection", tmp_path / "sel.csv", "--out", page, "--index", vec_index).exit_code == 0
    svg = page.read_text().split("embedding map")[1].split("</svg>")[0]
    assert svg.count("<circle") == len(P) + len(L) + len(S) + 3  # every point, and the legend's 3
    assert f"the axes hold {100 * m['explained']:.0f}% of the variance" in svg


def test_report_on_imported_vectors_shows_ids_without_thumbnails(vec_index, tmp_path):
    record_selection(vec_index, 5, tmp_path / "sel.csv")
    out = tmp_path / "r.html"
    r = run("report", "--selection", tmp_path / "sel.csv", "--out", out, "--index", vec_index)
    assert r.exit_code == 0 and "(covering radius from run #" in r.output, r.output
    page = out.read_text()
    assert "<img" not in page and page.count('class="noimg"') == 5 * 4
    assert ">p0" in page and ">l0" in page
    # --limit: the table stops after the first N picks, best first; the plots still count all
    r = run("report", "--selection", tmp_path / "sel.csv", "--out", out, "--index", vec_index, "--limit", 2)
    assert r.exit_code == 0 and "; the table shows the first 2) ->" in r.output, r.output
    page = out.read_text()
    assert page.count('class="noimg"') == 2 * 4 and "first 2 of 5 picks" in page
    assert page.count("<tr>") == 1 + 2  # header and two picks
    r = run("report", "--selection", tmp_path / "sel.csv", "--out", out, "--index", vec_index, "--limit", 0)
    assert r.exit_code == 0 and out.read_text().count('class="noimg"') == 5 * 4 and "first " not in out.read_text()


def test_a_pick_listed_twice_is_reported_once_at_its_first_rank(vec_index, tmp_path):
    rid, picked, rows = record_selection(vec_index, 6, tmp_path / "sel.csv")
    twice = rows[:4] + [rows[1], rows[0]] + rows[4:]  # rows 1 and 0 again, after row 3
    write_csv(tmp_path / "twice.csv", twice)
    out = tmp_path / "r.html"
    r = run("report", "--selection", tmp_path / "twice.csv", "--out", out, "--index", vec_index)
    assert r.exit_code == 0 and "report on 6 picks" in r.output, r.output
    assert "warning: 2 row(s)" in r.output and "repeat an earlier pick" in r.output
    with open_store(vec_index) as st:
        once, dup = collect(st, rows, ReportCfg(k=3)), collect(st, twice, ReportCfg(k=3))
    np.testing.assert_array_equal(dup.image, once.image)  # the original order: the recorded run still matches
    assert dup.run == rid and dup.counts["picks"] == 6 and dup.counts["repeated"] == 2
    np.testing.assert_allclose(dup.radius, once.radius)
    np.testing.assert_array_equal(dup.near_I, once.near_I)


def test_report_without_labeled_images(tmp_path):
    rng = np.random.default_rng(2)
    np.save(tmp_path / "p.npy", unit(rng.normal(size=(30, 6))).astype(np.float32))
    (tmp_path / "p.txt").write_text("\n".join(f"q{i}" for i in range(30)))
    idx = tmp_path / "idx"
    assert run("import-embeddings", tmp_path / "p.npy", "--ids", tmp_path / "p.txt", "--split", "unlabeled", "--index", idx).exit_code == 0
    rid, picked, rows = record_selection(idx, 4, tmp_path / "sel.csv")
    r = run("report", "--selection", tmp_path / "sel.csv", "--out", tmp_path / "r.html", "--index", idx, "--k", 0)
    assert r.exit_code == 0 and f"(covering radius from run #{rid})" in r.output, r.output
    with open_store(idx) as st:
        data = collect(st, rows, ReportCfg(k=0))
    assert np.isinf(data.radius[0]) and np.all(np.isinf(data.near_D)) and len(data.labeled_novelty) == 0
    np.testing.assert_allclose(data.radius[1:], brute(idx, picked)[4][1:], atol=1e-5)


@pytest.mark.parametrize(
    "content, args, message",
    [
        (None, [], "selection file MISSING does not exist"),
        ("id,rank\np001,1\nzz9,2\n", [], "1 of 2 id(s) are not in the index: 'zz9'; is the selection from this index?"),
        ("id,rank\np001,1\n", ["--k", "-1"], "--k must be >= 0"),
        ("id,rank\np001,1\n", ["--limit", "-1"], "--limit must be >= 0"),
        ("rank\n1\n", [], "needs an id or a path column"),
        ("id\n", [], "holds no rows"),
    ],
)
def test_bad_report_input(vec_index, tmp_path, content, args, message):
    sel = tmp_path / "sel.csv"
    if content is not None:
        sel.write_text(content)
    r = run("report", "--selection", sel, "--out", tmp_path / "r.html", "--index", vec_index, *args)
    message = message.replace("MISSING", str(sel))
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "r.html").exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not on PATH")
def test_report_renders_in_headless_chromium(image_index, tmp_path):
    idx, _ = image_index
    with open_store(idx) as st:
        ids, _ = st.vectors("unlabeled")
        paths = {i: p for i, (_, p, _) in st.describe(ids).items()}
    write_csv(tmp_path / "sel.csv", [{"rank": r + 1, "id": i, "path": paths[i]} for r, i in enumerate(ids.tolist()[:6])])
    out = tmp_path / "r.html"
    assert run("report", "--selection", tmp_path / "sel.csv", "--out", out, "--index", idx).exit_code == 0
    shot = screenshot(out, tmp_path, 1200, 2000, min_bytes=20_000)
    assert shot is not None and shot.shape == (2000, 1200) and shot.std() > 10  # not a blank page
