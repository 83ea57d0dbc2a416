"""`duplicates --html`: the groups page against the CSV and numpy, escaping of hostile file
names, self-containment, bad arguments, and (when chromium is on PATH) a headless render."""
import csv
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from novelty import inspect
from novelty.gallery import GalleryCfg, collect_groups, size_table
from novelty.store import open_store
from tests.conftest import TINY, run
from tests.test_inspect import vec_index  # noqa: F401  (a fixture)
from tests.test_report import EVIL, EVIL_DIR

EXTERNAL = ("http://", "https://", "<script", "<link", "@import", "url(")


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_groups_shown_match_the_csv_and_numpy(vec_index, tmp_path):  # noqa: F811
    idx, names, X, split = vec_index
    out = tmp_path / "d.csv"
    r = run("duplicates", "--index", idx, "--out", out, "--html", tmp_path / "d.html", "--html-groups", 3, "--html-per-group", 2)
    assert r.exit_code == 0, r.output
    rows = read_csv(out)
    by_group = {}
    for row in rows:
        by_group.setdefault(int(row["group"]), []).append(row)
    where = {n: i for i, n in enumerate(names)}
    with open_store(idx) as st:
        ids, _ = st.vectors()
        groups = inspect.find_duplicates(st, inspect.DuplicatesCfg())
        views = collect_groups(st, groups, GalleryCfg(groups=0, per_group=3))
    assert [v.number for v in views] == sorted(by_group) == list(range(1, len(by_group) + 1))
    for v in views:
        members = by_group[v.number]
        assert v.size == len(members)
        assert v.labeled == sum(m["split"] == "labeled" for m in members)
        pos = [where[m["id"]] for m in members[:3]]
        assert v.shown.tolist() == ids[pos].tolist()  # the CSV's order: labeled first, then by id
        np.testing.assert_allclose(v.dist, np.maximum(1 - X[pos] @ X[pos[0]], 0), atol=2e-3)  # float16 at rest
        assert v.dist[0] == 0 and (v.labeled == 0 or split[pos[0]] == "labeled")
    page = (tmp_path / "d.html").read_text()
    assert page.count('<section class="grp">') == 3
    assert f"page             3 of {len(by_group)} group(s) as thumbnails" in r.output
    for n in (1, 2, 3):
        more = len(by_group[n]) - 2
        assert (f"group {n} <span>· {len(by_group[n])} images" in page) and ((f"and {more} more" in page) if more else True)
    assert f"The first 3 of {len(by_group)} groups are shown" in page
    sizes = np.array([len(g) for g in by_group.values()])
    for label, g, m in size_table(sizes):  # the size table counts every group, not just the shown ones
        lo, hi = (int(label), int(label)) if "-" not in label else map(int, label.split("-"))
        sel = (sizes >= lo) & (sizes <= hi)
        assert (g, m) == (sel.sum(), sizes[sel].sum()) and f"<tr><td>{label}</td><td>{g}</td><td>{m}</td></tr>" in page
    assert sum(g for _, g, _ in size_table(sizes)) == len(by_group)


def test_size_table_bins():
    assert size_table(np.array([2, 2, 3, 4, 5, 9, 17, 40])) == [("2", 2, 4), ("3-4", 2, 7), ("5-8", 1, 5), ("9-16", 1, 9),
                                                                 ("17-32", 1, 17), ("33-64", 1, 40)]
    assert size_table(np.array([], int)) == []


@pytest.fixture(scope="module")
def image_index(tmp_path_factory, sample_dir):
    """4 labeled and 8 unlabeled sample images, plus byte copies: one of a labeled image
    under a hostile name, one of an unlabeled image that is deleted after indexing."""
    tmp = tmp_path_factory.mktemp("gal")
    for split, n in (("labeled", 4), ("unlabeled", 8)):
        (tmp / split).mkdir()
        for f in sorted((sample_dir / split).glob(f"{split}_*.jpg"))[:n]:
            shutil.copy(f, tmp / split / f.name)
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
    ],
)
def test_bad_page_arguments_change_nothing(vec_index, tmp_path, monkeypatch, args, message):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    r = run("duplicates", "--index", vec_index[0], "--html", "d.html", *args)
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "d.html").exists() and not (tmp_path / "duplicates.csv").exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not on PATH")
def test_page_renders_in_headless_chromium(image_index, tmp_path):
    idx, _ = image_index
    out = tmp_path / "d.html"
    assert run("duplicates", "--index", idx, "--out", tmp_path / "d.csv", "--html", out, "--threshold", 1e-4).exit_code == 0
    png = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={png}", "--window-size=1000,900", out.resolve().as_uri()],
        check=False, capture_output=True, timeout=50,
    )
    assert png.exists() and png.stat().st_size > 10_000
    from PIL import Image

    shot = np.asarray(Image.open(png).convert("L"))
    assert shot.shape == (900, 1000) and shot.std() > 10  # not a blank page


# ------------------------------------------------------------------------ neighbors --html
def test_neighbors_page_shows_the_json_hits_in_order(image_index, tmp_path):
    idx, src = image_index
    query = str(sorted((src / "labeled").glob("*.jpg"))[0])
    r = run("neighbors", query, "--k", 5, "--index", idx, "--json", "--html", tmp_path / "n.html")
    assert r.exit_code == 0, r.output
    hits = json.loads(r.output)["neighbors"]  # stdout stays pure JSON with --html
    page = (tmp_path / "n.html").read_text()
    caps = re.findall(r"<figcaption>([^<]*)<br>#(\d+) · d = ([0-9.]+)", page)
    assert [(c[0], int(c[1]), c[2]) for c in caps] == [(h["id"], h["rank"], f"{h['distance']:.4f}") for h in hits]
    assert page.count('<figure class="lab"') == sum(h["split"] == "labeled" for h in hits)
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
    assert page.count('src="data:image/jpeg;base64,') == 3 and "<figcaption>" + os.path.basename(new) in page


def test_neighbors_page_into_a_missing_folder_fails_first(image_index, tmp_path):
    r = run("neighbors", "--text", "x", "--index", image_index[0], "--html", tmp_path / "nodir" / "n.html")
    assert r.exit_code == 2 and "is not an existing folder" in r.output and len(r.output.strip().splitlines()) == 1, r.output
