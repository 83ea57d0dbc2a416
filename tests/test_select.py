"""`novelty select` and `import-uncertainty` through the CLI, checked against a
brute-force k-center written here."""
import csv
import json
import sys

import numpy as np
import pytest
import torch

from tests.conftest import run
from novelty.store import open_store



def clustered(n, d, k, seed, spread=0.15):
    rng = np.random.default_rng(seed)
    C = rng.normal(size=(k, d))
    X = C[rng.integers(0, k, n)] + spread * rng.normal(size=(n, d))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


def unit32(X):
    X = np.asarray(X, dtype=np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def brute_kcenter(pool, labeled, budget, w=None):
    """Plain numpy k-center greedy in float64 on the stored (float16) vectors."""
    P = unit32(pool).astype(np.float64)
    d = np.full(len(P), np.inf) if len(labeled) == 0 else (1 - P @ unit32(labeled).astype(np.float64).T).min(axis=1)
    w = np.ones(len(P)) if w is None else w
    picks, radii = [], []
    for _ in range(budget):
        score = w * d
        score[picks] = -np.inf
        p = int(np.flatnonzero(score == score.max())[0])
        picks.append(p)
        d = np.minimum(d, 1 - P @ P[p])
        d[picks] = 0
        radii.append(d.max())
    return picks, radii


@pytest.fixture
def index(tmp_path):
    """200 unlabeled and 40 labeled vectors (16-d), labeled from few clusters only."""
    pool = clustered(200, 16, 12, seed=1)
    lab = clustered(40, 16, 3, seed=1)
    np.save(tmp_path / "pool.npy", pool)
    np.save(tmp_path / "lab.npy", lab)
    (tmp_path / "pool.txt").write_text("\n".join(f"p{i:03d}" for i in range(200)))
    (tmp_path / "lab.txt").write_text("\n".join(f"l{i:03d}" for i in range(40)))
    idx = tmp_path / "idx"
    assert run("import-embeddings", tmp_path / "lab.npy", "--ids", tmp_path / "lab.txt", "--split", "labeled", "--index", idx).exit_code == 0
    assert run("import-embeddings", tmp_path / "pool.npy", "--ids", tmp_path / "pool.txt", "--split", "unlabeled", "--index", idx).exit_code == 0
    with open_store(idx) as st:
        _, P = st.vectors("unlabeled")
        _, L = st.vectors("labeled")
    return idx, P, L


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_kcenter_select_matches_brute_force(index, tmp_path):
    idx, P, L = index
    out = tmp_path / "sel.csv"
    r = run("select", "--budget", 25, "--index", idx, "--out", out, "--radius", 0.2)
    assert r.exit_code == 0, r.output
    rows = read(out)
    assert [int(x["rank"]) for x in rows] == list(range(1, 26))
    picks, radii = brute_kcenter(P, L, 25)
    assert [x["id"] for x in rows] == [f"p{i:03d}" for i in picks]
    assert "kcenter" in r.output and f"{radii[-1]:.4f} after" in r.output
    assert "picking: 100%" in r.output and "25/25" in r.output and "pick/s" in r.output  # a bar with its rate
    assert "nearest-labeled: 100%" in r.output and "200/200" in r.output and "img/s" in r.output  # the first pass too
    # novelty, nearest labeled and labeled_neighbors against numpy
    D = 1 - unit32(P).astype(np.float64) @ unit32(L).astype(np.float64).T
    for x in rows:
        i = int(x["id"][1:])
        assert float(x["novelty"]) == pytest.approx(D[i].min(), abs=1e-5)
        assert float(x["nearest_labeled_distance"]) == pytest.approx(D[i].min(), abs=1e-5)
        assert x["nearest_labeled_id"] == f"l{int(D[i].argmin()):03d}"
        assert int(x["labeled_neighbors"]) == int((D[i] <= 0.2).sum())
    assert len({x["id"] for x in rows}) == 25 and not any(x["id"].startswith("l") for x in rows)
    # Label Studio tasks beside it
    tasks = json.loads((tmp_path / "sel.label-studio.json").read_text())
    assert len(tasks) == 25 and tasks[0]["meta"]["id"] == rows[0]["id"]


def test_same_command_same_picks_and_runs_recorded(index, tmp_path):
    idx, _, _ = index
    for name in ("a.csv", "b.csv"):
        assert run("select", "--budget", 10, "--index", idx, "--out", tmp_path / name).exit_code == 0
    assert read(tmp_path / "a.csv") == read(tmp_path / "b.csv")
    with open_store(idx) as st:
        runs = st.db.execute("SELECT id, params FROM runs WHERE kind='select'").fetchall()
        assert len(runs) == 2 and json.loads(runs[0][1])["budget"] == 10
        picks = [st.db.execute("SELECT image, radius FROM picks WHERE run=? ORDER BY rank", (rid,)).fetchall() for rid, _ in runs]
        assert picks[0] == picks[1] and len(picks[0]) == 10
        radii = [r for _, r in picks[0]]
        assert all(b <= a + 1e-7 for a, b in zip(radii, radii[1:]))  # the radius never increases


def test_hybrid_with_imported_uncertainty_matches_weighted_brute_force(index, tmp_path):
    idx, P, L = index
    u = np.random.default_rng(5).gamma(2.0, size=len(P))
    with open(tmp_path / "u.csv", "w") as f:
        f.write("id,uncertainty\n" + "".join(f"p{i:03d},{v}\n" for i, v in enumerate(u)))
    r = run("import-uncertainty", tmp_path / "u.csv", "--index", idx)
    assert r.exit_code == 0, r.output
    out = tmp_path / "h.csv"
    r = run("select", "--budget", 15, "--index", idx, "--out", out, "--uncertainty-weight", 2.0)
    assert r.exit_code == 0 and "hybrid" in r.output, r.output  # the default once scores exist
    w = ((u - u.min()) / (u.max() - u.min())) ** 2.0
    picks, _ = brute_kcenter(P, L, 15, w)
    rows = read(out)
    assert [x["id"] for x in rows] == [f"p{i:03d}" for i in picks]
    assert float(rows[0]["uncertainty"]) == pytest.approx(u[picks[0]])
    # single-signal strategies
    r = run("select", "--budget", 5, "--index", idx, "--out", out, "--strategy", "uncertainty")
    assert [x["id"] for x in read(out)] == [f"p{i:03d}" for i in np.argsort(-u, kind="stable")[:5]]
    r = run("select", "--budget", 5, "--index", idx, "--out", out, "--strategy", "novelty")
    D = (1 - unit32(P).astype(np.float64) @ unit32(L).astype(np.float64).T).min(axis=1)
    assert [x["id"] for x in read(out)] == [f"p{i:03d}" for i in np.argsort(-D, kind="stable")[:5]]


def test_random_is_seeded(index, tmp_path):
    idx, _, _ = index
    ids = []
    for seed in (1, 1, 2):
        assert run("select", "--budget", 8, "--strategy", "random", "--seed", seed, "--index", idx, "--out", tmp_path / "r.csv").exit_code == 0
        ids.append([x["id"] for x in read(tmp_path / "r.csv")])
    assert ids[0] == ids[1] != ids[2]


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_other_formats(index, tmp_path, ext):
    idx, _, _ = index
    out = tmp_path / f"s.{ext}"
    assert run("select", "--budget", 4, "--index", idx, "--out", out).exit_code == 0
    if ext == "jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(out).to_pylist()
    assert [r["rank"] for r in rows] == [1, 2, 3, 4] and rows[0]["id"].startswith("p")


def test_budget_larger_than_pool_selects_everything_with_a_warning(index, tmp_path):
    idx, P, _ = index
    r = run("select", "--budget", 1000, "--index", idx, "--out", tmp_path / "all.csv")
    assert r.exit_code == 0 and "exceeds the 200 unlabeled images" in r.output
    rows = read(tmp_path / "all.csv")
    assert len(rows) == 200 and len({x["id"] for x in rows}) == 200


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["--budget", "0"], "--budget must be > 0", 2),
        (["--budget", "-3"], "--budget must be > 0", 2),
        (["--budget", "5", "--strategy", "best"], "unknown strategy 'best'; choose one of: kcenter, hybrid, novelty, uncertainty, random", 2),
        (["--budget", "5", "--strategy", "hybrid"], "needs uncertainty scores", 2),
        (["--budget", "5", "--out", "x.txt"], "extension must be one of .csv, .jsonl, .parquet", 2),
        (["--budget", "5", "--radius", "3"], "--radius is a cosine distance", 2),
    ],
)
def test_bad_select_arguments(index, tmp_path, args, message, code):
    idx, _, _ = index
    r = run("select", "--index", idx, *args)
    assert r.exit_code == code and message in r.output and len(r.output.strip().splitlines()) == 1, r.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_fails_before_any_work(index):
    idx, _, _ = index
    r = run("select", "--budget", 5, "--device", "cuda", "--index", idx)
    assert r.exit_code == 2 and r.output.strip() == "novelty: error: --device cuda asked for but torch sees no CUDA device"


def test_no_index_and_no_unlabeled(tmp_path):
    r = run("select", "--budget", 5, "--index", tmp_path / "none")
    assert r.exit_code == 3 and "no index at" in r.output
    np.save(tmp_path / "l.npy", clustered(5, 8, 2, 0))
    (tmp_path / "l.txt").write_text("a\nb\nc\nd\ne\n")
    run("import-embeddings", tmp_path / "l.npy", "--ids", tmp_path / "l.txt", "--split", "labeled", "--index", tmp_path / "idx")
    r = run("select", "--budget", 5, "--index", tmp_path / "idx")
    assert r.exit_code == 2 and "no embedded unlabeled images" in r.output


def test_no_labeled_images_first_pick_is_deterministic(tmp_path):
    np.save(tmp_path / "p.npy", clustered(50, 8, 4, 3))
    (tmp_path / "p.txt").write_text("\n".join(f"q{i}" for i in range(50)))
    idx = tmp_path / "idx"
    run("import-embeddings", tmp_path / "p.npy", "--ids", tmp_path / "p.txt", "--split", "unlabeled", "--index", idx)
    outs = []
    for name in ("a.csv", "b.csv"):
        r = run("select", "--budget", 6, "--index", idx, "--out", tmp_path / name)
        assert r.exit_code == 0, r.output
        outs.append([x["id"] for x in read(tmp_path / name)])
    assert outs[0] == outs[1] and len(set(outs[0])) == 6
    assert read(tmp_path / "a.csv")[0]["novelty"] == ""  # no labeled image: no novelty


@pytest.mark.parametrize(
    "content, message",
    [
        ("id,uncertainty\nnope,0.5\n", "not in the index"),
        ("id,uncertainty\np001,-1\n", "finite and >= 0"),
        ("id,uncertainty\np001,nan\n", "finite and >= 0"),
        ("id,uncertainty\np001,abc\n", "is not a number"),
        ("id,uncertainty\np001,1_000\n", "is not a number"),  # float() reads it; no CSV writer means it
        ("id,uncertainty\np001,0.3,7\n", "3 fields, the header has 2"),
        ("id,uncertainty\np001,\uff11\uff12\n", "is not a number"),  # full-width digits
        ("id,uncertainty\np001\n", "1 field(s), the header has 2: no uncertainty"),
        ("name,score\np001,1\n", "must have the columns id,uncertainty"),
        ("id,uncertainty\np001,1\np001,2\n", "twice"),
    ],
)
def test_import_uncertainty_rejects_bad_files(index, tmp_path, content, message):
    idx, _, _ = index
    (tmp_path / "u.csv").write_text(content)
    r = run("import-uncertainty", tmp_path / "u.csv", "--index", idx)
    assert r.exit_code == 2 and message in r.output, r.output
    with open_store(idx) as st:
        assert st.db.execute("SELECT COUNT(*) FROM uncertainty").fetchone()[0] == 0


def strict_json(text):
    """json.loads that refuses NaN and Infinity, as JSON.parse and most other parsers do."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def no_labeled_index(tmp_path):
    np.save(tmp_path / "p.npy", clustered(50, 8, 4, 3))
    (tmp_path / "p.txt").write_text("\n".join(f"q{i}" for i in range(50)))
    idx = tmp_path / "idx"
    assert run("import-embeddings", tmp_path / "p.npy", "--ids", tmp_path / "p.txt", "--split", "unlabeled", "--index", idx).exit_code == 0
    return idx


@pytest.mark.parametrize("strategy", ["kcenter", "novelty"])
def test_no_labeled_images_write_valid_json_and_say_so(no_labeled_index, tmp_path, strategy):
    # the first k-center pick, and every novelty pick, is infinitely far from a labeled set that is empty
    r = run("select", "--budget", 4, "--strategy", strategy, "--index", no_labeled_index, "--out", tmp_path / "s.jsonl")
    assert r.exit_code == 0, r.output
    rows = [strict_json(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    tasks = strict_json((tmp_path / "s.label-studio.json").read_text())
    assert rows[0]["priority"] is None and tasks[0]["meta"]["priority"] is None and tasks[0]["data"]["novelty_priority"] is None
    if strategy == "kcenter":
        assert rows[0]["distance_at_pick"] is None and rows[1]["distance_at_pick"] > 0  # later picks have a finite distance
    assert ("novelty ranks nothing and takes the first images by id" in r.output) == (strategy == "novelty"), r.output
    assert "no labeled image yet" in r.output and "inf" not in r.output
    assert run("select", "--budget", 4, "--strategy", strategy, "--index", no_labeled_index, "--out", tmp_path / "s.csv").exit_code == 0
    assert read(tmp_path / "s.csv")[0]["priority"] == ""  # empty, as `export` of the run writes it


def test_select_prints_the_label_studio_path_with_its_folder(index, tmp_path):
    idx, _, _ = index
    r = run("select", "--budget", 3, "--index", idx, "--out", tmp_path / "sel.csv")
    assert r.exit_code == 0 and f"-> {tmp_path / 'sel.csv'}, {tmp_path / 'sel.label-studio.json'}\n" in r.output, r.output


def test_parquet_without_pyarrow_fails_before_any_work(index, tmp_path, monkeypatch):
    idx, _, _ = index
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    r = run("select", "--budget", 3, "--index", idx, "--out", tmp_path / "s.parquet")
    assert r.exit_code == 2 and "writing .parquet needs pyarrow" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    with open_store(idx) as st:
        assert st.db.execute("SELECT COUNT(*) FROM runs WHERE kind='select'").fetchone()[0] == 0
    assert list(tmp_path.glob("s.*")) == []


def test_select_warns_about_images_not_embedded_yet(index, tmp_path):
    idx, _, _ = index
    with open_store(idx, writable=True) as st, st.transaction() as db:
        # what a killed build-index leaves: scanned images, no vector yet
        db.executemany("INSERT INTO images(path, split, size, mtime, status, added) VALUES (?,?,1,0,'pending',0)",
                       [(f"/nowhere/u{i}.jpg", "unlabeled") for i in range(7)] + [("/nowhere/l0.jpg", "labeled")])
    r = run("select", "--budget", 3, "--index", idx, "--out", tmp_path / "s.csv")
    assert r.exit_code == 0, r.output
    assert "warning: 7 unlabeled image(s) are not embedded yet and are not in the pool" in r.output, r.output
    assert "1 labeled image(s) are not embedded yet" in r.output and "re-run build-index" in r.output
    assert "of 200 unlabeled images" in r.output


def write_scores(path, ids, values):
    path.write_text("id,uncertainty\n" + "".join(f"{i},{v}\n" for i, v in zip(ids, values)))


def test_images_without_a_score_have_no_uncertainty_in_the_output(index, tmp_path):
    idx, P, L = index
    u = np.random.default_rng(3).gamma(2.0, size=100)
    write_scores(tmp_path / "u.csv", [f"p{i:03d}" for i in range(100)], u)  # half the pool
    assert run("import-uncertainty", tmp_path / "u.csv", "--index", idx).exit_code == 0
    out = tmp_path / "h.csv"
    r = run("select", "--budget", 30, "--index", idx, "--out", out)
    assert r.exit_code == 0 and "hybrid" in r.output, r.output
    assert "100 unlabeled image(s) have no uncertainty score" in r.output
    rows = read(out)
    assert {x["id"] for x in rows} & {f"p{i:03d}" for i in range(100, 200)}, "test needs an unscored pick"
    for x in rows:
        i = int(x["id"][1:])
        if i < 100:
            assert float(x["uncertainty"]) == pytest.approx(u[i])
        else:
            assert x["uncertainty"] == ""  # not the mean it was ranked with


def test_only_strategies_that_use_uncertainty_warn_about_missing_scores(index, tmp_path):
    idx, _, _ = index
    write_scores(tmp_path / "u.csv", [f"p{i:03d}" for i in range(100)], np.linspace(0, 1, 100))  # half the pool
    assert run("import-uncertainty", tmp_path / "u.csv", "--index", idx).exit_code == 0
    out = tmp_path / "s.csv"
    for strategy in ("kcenter", "novelty", "random"):
        r = run("select", "--budget", 5, "--strategy", strategy, "--index", idx, "--out", out)
        assert r.exit_code == 0 and "uncertainty" not in r.output, r.output
    r = run("select", "--budget", 5, "--strategy", "uncertainty", "--index", idx, "--out", out)
    assert r.exit_code == 0 and "100 unlabeled image(s) have no uncertainty score" in r.output


def test_import_uncertainty_of_labeled_images(index, tmp_path):
    idx, _, _ = index
    write_scores(tmp_path / "lab.csv", [f"l{i:03d}" for i in range(40)], np.linspace(0, 1, 40))
    r = run("import-uncertainty", tmp_path / "lab.csv", "--index", idx)
    assert r.exit_code == 2 and "none of the 40 id(s)" in r.output and "40 labeled" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "hybrid" not in r.output
    with open_store(idx) as st:
        assert st.db.execute("SELECT COUNT(*) FROM uncertainty").fetchone()[0] == 0
        assert st.db.execute("SELECT COUNT(*) FROM runs WHERE kind='uncertainty'").fetchone()[0] == 0
    # some labeled: accepted, and the labeled ones are counted out
    write_scores(tmp_path / "mix.csv", ["l000", "l001", "p000", "p001", "p002"], [1, 2, 3, 4, 5])
    r = run("import-uncertainty", tmp_path / "mix.csv", "--index", idx)
    assert r.exit_code == 0 and "stored 3 uncertainty scores" in r.output and "ignored 2 score(s) of labeled images" in r.output, r.output
    with open_store(idx) as st:
        assert st.db.execute("SELECT COUNT(*) FROM uncertainty").fetchone()[0] == 3


def test_scores_only_of_excluded_images_are_refused_and_counted_when_mixed(index, tmp_path):
    idx, _, _ = index
    (tmp_path / "x.txt").write_text("p000\np001\np002\n")
    assert run("exclude", tmp_path / "x.txt", "--index", idx).exit_code == 0
    write_scores(tmp_path / "ex.csv", ["p000", "p001", "p002"], [1, 2, 3])
    r = run("import-uncertainty", tmp_path / "ex.csv", "--index", idx)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "none of the 3 id(s)" in r.output and "not excluded (0 labeled, 0 unlabeled but not embedded, 3 excluded)" in r.output
    write_scores(tmp_path / "mix.csv", ["p000", "p003", "p004"], [1, 2, 3])
    r = run("import-uncertainty", tmp_path / "mix.csv", "--index", idx)
    assert r.exit_code == 0 and "stored 3 uncertainty scores" in r.output, r.output
    assert "1 score(s) are of images exclude keeps out of selection" in r.output
    r = run("select", "--budget", 2, "--strategy", "hybrid", "--index", idx, "--out", tmp_path / "h.csv")
    assert r.exit_code == 0 and "(3 excluded)" in r.output, r.output
    assert not {x["id"] for x in read(tmp_path / "h.csv")} & {"p000", "p001", "p002"}


def test_select_export_and_neighbors_give_one_distance(index, tmp_path):
    """One convention everywhere: the cosine distance of the renormalised float16 rows.
    (export and neighbors once used the rows as stored and differed by up to ~1e-4.)"""
    idx, _, _ = index
    sel, exp = tmp_path / "s.csv", tmp_path / "e.csv"
    assert run("select", "--budget", 10, "--index", idx, "--out", sel).exit_code == 0
    assert run("export", "--latest", "--index", idx, "--out", exp).exit_code == 0
    for a, b in zip(read(sel), read(exp)):
        assert a["id"] == b["id"] and a["nearest_labeled_id"] == b["nearest_labeled_id"]
        assert float(a["novelty"]) == pytest.approx(float(b["novelty"]), abs=1e-6)
        r = run("neighbors", a["id"], "--split", "labeled", "--k", 1, "--index", idx, "--json")
        hit = json.loads(r.output)["neighbors"][0]
        assert hit["id"] == a["nearest_labeled_id"] and hit["distance"] == pytest.approx(float(a["novelty"]), abs=1e-6)


def test_hybrid_says_when_it_passed_over_the_most_novel_images_for_their_zero_score(index, tmp_path):
    """The images farthest from the labeled set, scored the pool's lowest (a detector
    blind to their domain: no box in any pass scores 0), weigh 0 under hybrid and are not
    picked: select says so and points at kcenter, which picks them."""
    idx, P, L = index
    d = (1 - unit32(P) @ unit32(L).T).min(axis=1)
    far = np.argsort(-d)[:40]
    u = np.random.default_rng(0).uniform(0.2, 1.0, len(P))
    u[far] = 0.0
    with open(tmp_path / "u.csv", "w") as f:
        f.write("id,uncertainty\n" + "".join(f"p{i:03d},{v}\n" for i, v in enumerate(u)))
    assert run("import-uncertainty", tmp_path / "u.csv", "--index", idx).exit_code == 0
    r = run("select", "--budget", 20, "--index", idx, "--out", tmp_path / "h.csv")
    picked = {int(row["id"][1:]) for row in csv.DictReader(open(tmp_path / "h.csv"))}
    top20 = set(np.argsort(-d)[:20].tolist())
    assert r.exit_code == 0 and "with hybrid" in r.output and not picked & top20, r.output
    assert "20 of the 20 unlabeled images farthest from the labeled set have the pool's lowest uncertainty (0)" in r.output
    r = run("select", "--budget", 20, "--strategy", "kcenter", "--index", idx, "--out", tmp_path / "k.csv")
    assert r.exit_code == 0 and "farthest from the labeled set" not in r.output, r.output
    assert {int(row["id"][1:]) for row in csv.DictReader(open(tmp_path / "k.csv"))} & top20
    u[far] = 0.1  # scored low, not lowest: weighed, and no warning (one image, p000, holds the pool's minimum)
    u[0] = 0.0
    with open(tmp_path / "u.csv", "w") as f:
        f.write("id,uncertainty\n" + "".join(f"p{i:03d},{v}\n" for i, v in enumerate(u)))
    assert run("import-uncertainty", tmp_path / "u.csv", "--index", idx).exit_code == 0
    r = run("select", "--budget", 20, "--index", idx, "--out", tmp_path / "h2.csv")
    assert r.exit_code == 0 and "farthest from the labeled set" not in r.output, r.output
