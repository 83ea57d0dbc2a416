"""`duplicates --html`: the groups page against the CSV and numpy, escaping of hostile file
names, self-containment, bad arguments, and (when chromium is on PATH) a headless render."""
import csv
import json
import os
import re
import shutil

import numpy as np
import pytest

from novelty import inspect
from novelty.gallery import GalleryCfg, collect_groups, size_table
from novelty.store import open_store
from tests.conftest import TINY, copy_samples, run, screenshot, unit
from tests.test_inspect import import_split
from tests.test_report import EVIL, EVIL_DIR

EXTERNAL = ("http://", "https://", "<script", "<link", "@import", "url(")


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture
def group_index(tmp_path):
    """Groups of known make-up, 16-d: A = 3 labeled + 4 unlabeled near-copies, B = 2
    unlabeled, C = 1 labeled + 1 unlabeled, D = 5 unlabeled; 10 labeled and 20 unlabeled
    loners. -> (index, display ids, stored vectors float64, splits)."""
    rng = np.random.default_rng(7)
    base = unit(rng.normal(size=(4, 16)))

    def copies(b, n):
        return unit(base[b] + 0.01 * rng.normal(size=(n, 16)))

    lab = np.vstack([copies(0, 3), copies(2, 1), unit(rng.normal(size=(10, 16)))])
    pool = np.vstack([copies(0, 4), copies(1, 2), copies(2, 1), copies(3, 5), unit(rng.normal(size=(20, 16)))])
    idx = tmp_path / "idx"
    import_split(idx, tmp_path, "lab", lab, [f"l{i:03d}" for i in range(len(lab))], "labeled")
    import_split(idx, tmp_path, "pool", pool, [f"p{i:03d}" for i in range(len(pool))], "unlabeled")
    with open_store(idx) as st:
        ids, X = st.vectors()
        meta = st.describe(ids)
    return idx, np.array([meta[i][0] for i in ids.tolist()]), X.astype(np.float64), np.array([meta[i][2] for i in ids.tolist()])


def sections(page):
    """Per group section of the page: (header numbers, shown ids, 'and N more' or 0)."""
    out = []
    for sec in page.split('<section class="grp">')[1:]:
        h = re.match(r"<h2>group (\d+) <span>· (\d+) images · (\d+) labeled · (\d+) unlabeled · farthest shown d = ([0-9.]+)</span>", sec)
        more = re.search(r"and (-?\d+) more", sec)
        out.append(((int(h[1]), int(h[2]), int(h[3]), int(h[4]), float(h[5])), re.findall(r"<figcaption>([^<]*)<br>", sec),
                    int(more[1]) if more else 0))
    return out


def test_page_matches_the_csv_and_numpy(group_index, tmp_path):
    idx, names, X, split = group_index
    out, html = tmp_path / "d.csv", tmp_path / "d.html"
    r = run("duplicates", "--index", idx, "--out", out, "--html", html, "--html-groups", 3, "--html-per-group", 3)
    assert r.exit_code == 0, r.output
    by_group = {}
    for row in read_csv(out):
        by_group.setdefault(int(row["group"]), []).append(row)
    assert sorted(len(g) for g in by_group.values()) == [2, 2, 5, 7]  # the make-up the fixture built
    where = {n: i for i, n in enumerate(names)}
    Xn = unit(X)  # the page renormalises the float16 rows
    got = sections(html.read_text())
    assert len(got) == 3 and "page             3 of 4 group(s) as thumbnails" in r.output
    for (number, size, n_lab, n_unl, farthest), shown, more in got:
        members = by_group[number]
        lab = [m["id"] for m in members if m["split"] == "labeled"]
        unl = [m["id"] for m in members if m["split"] == "unlabeled"]
        want = (lab[:1] + unl + lab[1:])[:3]  # the first labeled one, then the unlabeled ones: none hidden behind labeled
        assert (size, n_lab, n_unl, more) == (len(members), len(lab), len(unl), len(members) - len(want))
        assert shown == want
        pos = [where[i] for i in want]
        assert farthest == pytest.approx((1 - Xn[pos] @ Xn[pos[0]]).max(), abs=6e-5)  # printed to 4 decimals
    page = html.read_text()
    assert [g[0][0] for g in got] == [1, 2, 3] and "The first 3 of 4 groups are shown" in page
    pool = (split == "unlabeled").sum()
    in_groups = [m for g in by_group.values() for m in g]
    grouped_pool = sum(m["split"] == "unlabeled" for m in in_groups)
    represented = sum(m["split"] == "unlabeled" for g in by_group.values() if any(x["split"] == "labeled" for x in g) for m in g)
    assert (grouped_pool, represented) == (12, 5)
    assert (f"4 near-duplicate group(s) among {len(names)} images (cosine distance &lt; 0.05, split: all); "
            f"{len(in_groups)} images in groups, the largest holds 7.") in page
    assert f"{100 * grouped_pool / pool:.1f}% of the {pool} unlabeled images are in a group; {100 * represented / pool:.1f}% are near-copies" in page
    with open_store(idx) as st:  # every group, every member: the distances themselves
        views = collect_groups(st, inspect.find_duplicates(st, inspect.DuplicatesCfg()), GalleryCfg(groups=0, per_group=100))
        ids, _ = st.vectors()
    assert [v.number for v in views] == [1, 2, 3, 4]
    for v in views:
        pos = np.searchsorted(ids, v.shown)
        assert v.size == len(v.shown) == len(by_group[v.number]) and v.labeled == (split[pos] == "labeled").sum()
        np.testing.assert_allclose(v.dist, np.maximum(1 - Xn[pos] @ Xn[pos[0]], 0), atol=1e-5)
    sizes = np.array([len(g) for g in by_group.values()])
    for label, g, m in size_table(sizes):  # the size table counts every group, not just the shown ones
        lo, hi = (int(label), int(label)) if "-" not in label else map(int, label.split("-"))
        sel = (sizes >= lo) & (sizes <= hi)
        assert (g, m) == (sel.sum(), sizes[sel].sum()) and f"<tr><td>{label}</td><td>{g}</td><td>{m}</td></tr>" in page
    assert sum(g for _, g, _ in size_table(sizes)) == 4


def test_page_of_the_labeled_split_and_a_huge_per_group(group_index, tmp_path):
    idx = group_index[0]
    html = tmp_path / "d.html"
    r = run("duplicates", "--index", idx, "--out", tmp_path / "d.csv", "--html", html, "--split", "labeled",
            "--html-per-group", 2 ** 63 - 1)
    assert r.exit_code == 0, r.output
    page = html.read_text()
    assert "unlabeled images are in a group" not in page  # no pool in scope, so no pool line
    assert [(h[:4], len(shown), more) for h, shown, more in sections(page)] == [((1, 3, 3, 0), 3, 0)]


def test_size_table_bins():
    assert size_table(np.array([2, 2, 3, 4, 5, 9, 17, 40])) == [("2", 2, 4), ("3-4", 2, 7), ("5-8", 1, 5), ("9-16", 1, 9),
                                                                 ("17-32", 1, 17), ("33-64", 1, 40)]
    assert size_table(np.array([], int)) == []


@pytest.fixture(scope="module")
def image_index(tmp_path_factory, sample_dir):
    """4 labeled and 8 unlabeled sample images, plus byte copies: one of a labeled image
    under a hostile name, one of an unlabeled image that is deleted after indexing."""
    tmp = tmp_path_factory.mktemp("gal")
    copy_samples(tmp, sample_dir, 4, 8)
    (tmp / "unlabeled" / EVIL_DIR).mkdir()
    shutil.copy(sorted((tmp / "labeled").glob("*.jpg"))[0], tmp / "unlabeled" / EVIL_DIR / "b>.png")
    gone = tmp / "unlabeled" / "gone.jpg"
    shutil.copy(sorted((tmp / "unlabeled").glob("*.jpg"))[0], gone)
    idx = tmp / "idx"
    r = run("build-index", "--index", idx, "--model", TINY, "--pretrained", "none", "--device", "cpu",
            "--labeled", tmp / "labeled", "--unlabeled", tmp / "unlabeled")
    assert r.exit_code == 0, r.output
    gone.unlink()
    return idx, tmp


def test_page_escapes_names_marks_labeled_and_is_self_contained(image_index, tmp_path):
    idx, src = image_index
    out, page_path = tmp_path / "d.csv", tmp_path / "d.html"
    r = run("duplicates", "--index", idx, "--out", out, "--html", page_path, "--threshold", 1e-4)
    assert r.exit_code == 0, r.output
    rows = read_csv(out)
    evil_path = str(src / "unlabeled" / EVIL_DIR / "b>.png")
    assert evil_path.endswith(EVIL) and evil_path in {row["path"] for row in rows}  # the copy is grouped with its labeled twin
    page = page_path.read_text()
    assert "<b onmouseover" not in page and "bold</b>" not in page
    assert "&quot;&gt;&lt;b onmouseover=x&gt;bold&lt;/b&gt;.png" in page
    for external in EXTERNAL:
        assert external not in page
    groups = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    assert page.count('<section class="grp">') == len(groups) >= 2
    shown = [row for g in groups.values() for row in g[:12]]
    gone = [row for row in shown if not row["path"] or not os.path.exists(row["path"])]
    assert len(gone) == 1 and gone[0]["path"].endswith("gone.jpg")  # deleted after indexing: its reason, no thumbnail
    assert page.count('src="data:image/jpeg;base64,') == len(shown) - 1
    assert page.count('<div class="noimg">') == 1
    assert page.count('<figure class="lab"') == sum(row["split"] == "labeled" for row in shown) >= 1
    for g in groups.values():  # a group with a labeled image shows it first
        assert g[0]["split"] == "labeled" or all(row["split"] == "unlabeled" for row in g)
    d = [float(x) for x in re.findall(r"<br>d = ([0-9.]+)", page)]
    assert len(d) == len(shown) - len(groups) and max(d) < 1e-4  # every shown distance is below the threshold here
    assert min(d) == 0  # byte copies show d = 0, not float16's norm error


def test_page_with_no_groups(image_index, tmp_path):
    idx, _ = image_index
    r = run("duplicates", "--index", idx, "--out", tmp_path / "d.csv", "--html", tmp_path / "d.html", "--threshold", 1e-9,
            "--split", "labeled")
    assert r.exit_code == 0 and "page             0 of 0 group(s)" in r.output, r.output
    page = (tmp_path / "d.html").read_text()
    assert "0 near-duplicate group(s) among 4 images" in page and "<section" not in page


@pytest.mark.parametrize(
    "args, message",
    [
        (["--html-groups", "-1"], "--html-groups must be >= 0"),
        (["--html-per-group", "1"], "--html-per-group must be >= 2"),
        (["--html", "nodir/d.html"], "is not an existing folder"),
        (["--html", "duplicates.csv"], "must end in .html or .htm"),  # would replace the CSV it had just written
    ],
)
def test_bad_page_arguments_change_nothing(group_index, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    r = run("duplicates", "--index", group_index[0], "--html", "d.html", *args)
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "d.html").exists() and not (tmp_path / "duplicates.csv").exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not on PATH")
def test_page_renders_in_headless_chromium(image_index, tmp_path):
    idx, _ = image_index
    out = tmp_path / "d.html"
    assert run("duplicates", "--index", idx, "--out", tmp_path / "d.csv", "--html", out, "--threshold", 1e-4).exit_code == 0
    shot = screenshot(out, tmp_path, 1000, 900)
    assert shot is not None and shot.shape == (900, 1000) and shot.std() > 10  # not a blank page


# ------------------------------------------------------------------------ neighbors --html
def test_neighbors_page_shows_the_json_hits_in_order(image_index, tmp_path):
    idx, src = image_index
    query = str(sorted((src / "labeled").glob("*.jpg"))[0])
    r = run("neighbors", query, "--k", 5, "--index", idx, "--json", "--html", tmp_path / "n.html")
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)  # stdout stays pure JSON with --html
    hits = got["neighbors"]
    assert got["query"]["split"] == "labeled"
    page = (tmp_path / "n.html").read_text()
    caps = re.findall(r"<figcaption>([^<]*)<br>#(\d+) · d = ([0-9.]+)", page)
    assert [(c[0], int(c[1]), c[2]) for c in caps] == [(h["id"], h["rank"], f"{h['distance']:.4f}") for h in hits]
    n_lab = sum(h["split"] == "labeled" for h in hits)
    assert page.count('<figure class="lab"') == 1 + n_lab and page.count("<br>labeled</figcaption>") == 1 + n_lab  # the query too
    assert "&quot;&gt;&lt;b onmouseover=x&gt;bold&lt;/b&gt;.png" in page  # the hostile byte copy is a neighbour, escaped
    assert "<b onmouseover" not in page
    assert page.count('src="data:image/jpeg;base64,') == 1 + len(hits)  # the query and each hit
    for external in EXTERNAL:
        assert external not in page


def test_neighbors_page_for_a_text_prompt_and_a_new_image(image_index, tmp_path, sample_dir):
    idx, _ = image_index
    r = run("neighbors", "--text", "<b>red</b> & blue", "--k", 3, "--index", idx, "--html", tmp_path / "t.html")
    assert r.exit_code == 0 and r.output.strip().endswith(f"page -> {tmp_path / 't.html'}"), r.output
    page = (tmp_path / "t.html").read_text()
    assert "&ldquo;&lt;b&gt;red&lt;/b&gt; &amp; blue&rdquo;" in page and "<b>red" not in page
    assert page.count('src="data:image/jpeg;base64,') == 3
    new = str(sorted((sample_dir / "unlabeled").glob("*.jpg"))[-1])  # not in this index
    r = run("neighbors", new, "--k", 2, "--index", idx, "--html", tmp_path / "i.html")
    assert r.exit_code == 0 and "query  image:" in r.output, r.output
    page = (tmp_path / "i.html").read_text()
    # the query and its 2 neighbours; gone.jpg (deleted after indexing, a byte copy that ties
    # with its original) may be one of them and shows a placeholder instead
    missing = page.count('<div class="noimg">not found</div>')
    assert page.count('src="data:image/jpeg;base64,') == 3 - missing and "<figcaption>" + os.path.basename(new) in page
    assert missing == page.count("gone.jpg") <= 1


def test_neighbors_page_into_a_missing_folder_fails_first(image_index, tmp_path):
    r = run("neighbors", "--text", "x", "--index", image_index[0], "--html", tmp_path / "nodir" / "n.html")
    assert r.exit_code == 2 and "is not an existing folder" in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_a_page_is_never_written_over_an_image_or_a_selection(image_index, tmp_path):
    idx, src = image_index
    img = tmp_path / "q.jpg"
    shutil.copy(sorted((src / "labeled").glob("*.jpg"))[0], img)
    before = img.read_bytes()
    r = run("neighbors", str(img), "--index", idx, "--html", img)
    assert r.exit_code == 2 and "must end in .html or .htm" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    (tmp_path / "sel.csv").write_text("rank,id\n1,1\n")
    r = run("report", "--selection", tmp_path / "sel.csv", "--out", tmp_path / "sel.csv", "--index", idx)
    assert r.exit_code == 2 and "must end in .html or .htm" in r.output, r.output
    assert img.read_bytes() == before and (tmp_path / "sel.csv").read_text() == "rank,id\n1,1\n"
