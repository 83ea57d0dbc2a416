"""benchmarks/active_learning.py --quick end to end: data, build-index, MC-dropout
uncertainty through the CLI, every strategy's select and mark-labeled, retraining, and
the table, markdown and plot. The result itself is not asserted, only its form."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "active_learning.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("active_learning_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_run_end_to_end(tmp_path):
    al = load_benchmark()
    md, png = tmp_path / "AL.md", tmp_path / "al.png"
    out = al.main(["--quick", "--jobs", "1", "--work", str(tmp_path / "work"), "--md", str(md), "--png", str(png)])
    cfg = al.QUICK
    results = json.loads(out["results"].read_text())
    rows = results["rows"]
    assert len(rows) == len(cfg.seeds) * len(cfg.strategies) * (cfg.rounds + 1)
    assert {r["strategy"] for r in rows} == set(al.STRATEGIES)
    for r in rows:
        assert math.isfinite(r["miou"]) and 0.0 <= r["miou"] <= 1.0
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in r["by_domain"])
        assert r["labels"] == cfg.data.n_seed + cfg.budget * r["round"]
        if r["round"] > 0:
            assert sum(r["picked_by_domain"]) == cfg.budget  # every pick was new and revealed
    # round 0 is the same model for every strategy
    assert len({r["miou"] for r in rows if r["round"] == 0}) == 1
    an = results["prepared"][0]["analysis"]
    assert 0.0 <= an["knn10_same_domain"] <= 1.0 and 0.0 <= an["u_auroc_novel_domain"] <= 1.0

    s = out["summary"]
    for st in al.STRATEGIES:
        assert len(s["mean"][st]) == cfg.rounds + 1
        assert all(0.0 <= v <= 1.0 for v in s["mean"][st])
    assert 0.0 <= s["target"] <= 1.0
    text = md.read_text()
    assert text.startswith("## Active learning")
    for st in al.STRATEGIES:
        assert f"| {st}" in text
    with Image.open(png) as im:
        assert im.size == (960, 600)

    # a second run reuses the cached rounds and rewrites only the generated block
    md.write_text(text + "\nnotes kept\n")
    al.main(["--quick", "--jobs", "1", "--work", str(tmp_path / "work"), "--md", str(md), "--png", str(png)])
    again = md.read_text()
    assert again.count("<!-- active_learning.py: begin -->") == 1 and again.endswith("notes kept\n")

    # the other vector source: build-index's random-weight ViT instead of imported model features
    assert cfg.embedding == "model"
    clip = al.main(["--quick", "--jobs", "1", "--embedding", "clip", "--strategies", "random", "kcenter",
                    "--work", str(tmp_path / "work"), "--md", str(md), "--png", str(png)])
    crow = [r for r in json.loads(clip["results"].read_text())["rows"] if r["strategy"] == "kcenter"]
    assert [r["round"] for r in crow] == list(range(cfg.rounds + 1))
    assert sum(crow[-1]["picked_by_domain"]) == cfg.budget
    assert (tmp_path / "work" / "seed0" / "rows_kcenter.json").exists()  # cached apart from the model-feature run
    assert (tmp_path / "work" / "seed0" / "rows_kcenter_model.json").exists()

    # which uncertainty score tracks the round-0 model's errors: one row per score, numbers in range
    diag = al.main(["--quick", "--diagnose", "--work", str(tmp_path / "work")])["text"]
    from _al_diagnose import SCORES

    table = [line for line in diag.splitlines() if line.startswith("| ") and "±" in line]
    assert len(table) == len(SCORES)
    for line in table:
        cells = [float(c.split("±")[0]) for c in line.strip("|").split("|")[1:]]
        assert -1 <= cells[0] <= 1 and -1 <= cells[1] <= 1 and 0 <= cells[2] <= 1 and 0 <= cells[3] <= 1
    import re

    (bf16,) = [line for line in diag.splitlines() if line.startswith("The default score with the passes in bf16")]
    corr = float(re.search(r"rank correlation (-?[\d.]+)", bf16).group(1))
    assert -1 <= corr <= 1 and "s in fp32 and" in bf16

    # training noise: the labeled sets are read back from each run's catalog, then retrained
    from _al_retrain import labeled_sets

    sw = tmp_path / "work" / "seed0"
    for st in ("kcenter_model", "hybrid_model", "random"):
        run = sw / f"run_{st}"
        if (run / "picked_r1.txt").exists():  # model-feature runs: the catalog paths they marked
            paths = (run / "picked_r1.txt").read_text().split()
        else:  # the others marked their selection file
            with open(run / "select_r1.csv", newline="") as f:
                paths = [r["path"] for r in csv.DictReader(f)]
        picked = {int(Path(p).stem.split("_")[1]) for p in paths}
        (got,) = labeled_sets(sw / f"index_{st}", cfg.rounds, cfg.budget)
        assert len(got) == cfg.budget == len(set(got.tolist()))
        assert set(got.tolist()) == picked
    rt = al.main(["--quick", "--jobs", "1", "--retrain", "2", "--strategies", "kcenter", "random",
                  "--work", str(tmp_path / "work")])
    kc = [r for r in rows if r["strategy"] == "kcenter" and r["round"] == 1][0]
    got = {s["strategy"]: s for s in rt["sets"]}
    assert set(got) == {"kcenter", "random"} and got["kcenter"]["cached"] == kc["miou"]
    assert len(got["kcenter"]["retrained"]) == 2 and all(0.0 <= v <= 1.0 for v in got["kcenter"]["retrained"])
    assert "| kcenter | 1 |" in rt["text"]


def test_labeled_sets_split_by_round(tmp_path):
    """The catalog's mark-labeled stamps give each round's picks back, in round order."""
    al = load_benchmark()
    work = tmp_path / "work"
    al.main(["--quick", "--jobs", "1", "--rounds", "2", "--strategies", "kcenter", "--work", str(work),
             "--md", str(tmp_path / "AL.md"), "--png", str(tmp_path / "al.png")])
    from _al_retrain import labeled_sets

    run = work / "seed0" / "run_kcenter_model"
    rounds = [{int(Path(p).stem.split("_")[1]) for p in (run / f"picked_r{r}.txt").read_text().split()} for r in (1, 2)]
    assert len(rounds[0]) == len(rounds[1]) == al.QUICK.budget and not rounds[0] & rounds[1]
    first, both = labeled_sets(work / "seed0" / "index_kcenter_model", 2, al.QUICK.budget)
    assert set(first.tolist()) == rounds[0]
    assert set(both.tolist()) == rounds[0] | rounds[1] and len(both) == 2 * al.QUICK.budget
    with pytest.raises(RuntimeError, match="labeled picks"):
        labeled_sets(work / "seed0" / "index_kcenter_model", 3, al.QUICK.budget)


def test_retrain_arguments_are_checked():
    al = load_benchmark()
    for argv, msg in ((["--retrain-rounds", "1"], "only go with --retrain"), (["--retrain-steps", "10"], "only go with --retrain"),
                      (["--retrain-precision", "fp32"], "only go with --retrain"),
                      (["--retrain", "0"], "at least 1"), (["--retrain", "1", "--retrain-steps", "0"], "at least 1"),
                      (["--retrain", "1", "--retrain-rounds", "2"], r"rounds are 1\.\.1")):
        with pytest.raises(SystemExit, match=msg):
            al.main(["--quick", *argv])


def test_labels_to_reach_interpolates():
    al = load_benchmark()
    from _al_report import labels_to_reach

    import numpy as np

    labels = np.array([300, 450, 600])
    assert labels_to_reach(labels, np.array([0.2, 0.4, 0.6]), 0.5) == 525.0
    assert labels_to_reach(labels, np.array([0.2, 0.4, 0.6]), 0.1) == 300.0
    assert labels_to_reach(labels, np.array([0.2, 0.4, 0.45]), 0.5) is None
    assert al.STRATEGIES[-1] == "hybrid"


def test_variant_neighbourhoods_match_brute_force():
    """_al_variants' block-wise k-nearest helpers against a sort of the full similarity matrix."""
    import numpy as np

    load_benchmark()  # puts benchmarks/ on sys.path
    from _al_variants import knn_mean, typicality

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 8))
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float16)
    v = rng.random(300)
    Xf = X.astype(np.float32)
    S = Xf @ Xf.T
    order = np.argsort(-np.where(np.eye(300, dtype=bool), np.inf, S), axis=1, kind="stable")  # itself first
    for k in (1, 7, 40):
        np.testing.assert_allclose(knn_mean(X, v, k, block=64), v[order[:, :k]].mean(1), rtol=1e-12)
    dist = np.sqrt(np.maximum(2 - 2 * np.take_along_axis(S, order[:, 1:21], 1), 0)).mean(1)  # 20 others
    np.testing.assert_allclose(typicality(X, 20, block=64), (1 / dist) / (1 / dist).max(), rtol=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_lazy_kmedian_greedy_matches_the_plain_greedy(weighted):
    """_al_variants.kmedian_greedy (lazy, block-wise first gains) against a loop that
    recomputes every candidate's gain from the full distance matrix at every pick."""
    import numpy as np

    load_benchmark()
    from _al_variants import kmedian_greedy

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(12, 16))
    X = centres[rng.integers(0, 12, 400)] + 0.4 * rng.normal(size=(400, 16))  # clustered, like the benchmark's pool
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float16)
    L = X[:30].astype(np.float32)  # a labeled set inside a few clusters
    pool = X[30:]
    P = pool.astype(np.float64)
    c0 = (1 - P @ L.T.astype(np.float64)).min(1)
    w = rng.random(len(pool)) if weighted else np.ones(len(pool))
    picks, gain = kmedian_greedy(pool, c0, 25, w, block=64)
    D = 1 - P @ P.T
    c, want, want_gain = c0.copy(), [], []
    for _ in range(25):
        g = (w[:, None] * np.maximum(c[:, None] - D, 0)).sum(0)
        g[want] = -np.inf
        j = int(np.argmax(g))  # the first of equal maxima: the lower index
        want.append(j), want_gain.append(g[j])
        c = np.minimum(c, np.maximum(D[:, j], 0))
        c[j] = 0
    assert picks.tolist() == want
    np.testing.assert_allclose(gain, want_gain, rtol=1e-4)
    assert np.all(np.diff(gain) <= 1e-4 * gain[0])  # submodular: gains never grow


def test_oracle_uncertainty_is_each_unlabeled_images_true_error(tmp_path):
    """hybrid-oracle's u against per-image IoU and wrong-pixel counts written out in numpy."""
    import numpy as np

    al = load_benchmark()
    from _al_data import DataCfg, make_data
    from _al_model import image_errors, load, predict, save, train

    data = make_data(DataCfg(n_seed=12, n_pool=40, n_test=8, mean_copies=2.0))
    with al.torch_restored():
        save(train(data["seed"].images, data["seed"].masks, 20, 0), tmp_path / "m.pt")
        z = {"pool_images": data["pool"].images, "pool_masks": data["pool"].masks}
        picked = [3, 17, 39]
        iou, pixels = (al.oracle_uncertainty(tmp_path / "m.pt", z, picked, kind) for kind in ("iou", "pixels"))
        pred = predict(load(tmp_path / "m.pt"), z["pool_images"])
    rest = [i for i in range(40) if i not in picked]
    assert list(iou) == list(pixels) == [f"pool_{i:05d}.png" for i in rest]  # the unlabeled images only
    for i in rest:
        p, t = pred[i], z["pool_masks"][i]
        per_class = [((p == c) & (t == c)).sum() / ((p == c) | (t == c)).sum() for c in (1, 2) if ((p == c) | (t == c)).any()]
        assert iou[f"pool_{i:05d}.png"] == pytest.approx(1 - np.mean(per_class) if per_class else 0.0)
        assert pixels[f"pool_{i:05d}.png"] == int((p != t).sum())
    assert len(set(iou.values())) > 1 and len(set(pixels.values())) > 1  # a real ranking, not a constant
    blank = np.zeros((1, 8, 8), np.uint8)  # no object in the truth nor the prediction: nothing wrong
    assert image_errors(blank, blank).tolist() == [0.0] and image_errors(blank, blank + 1).tolist() == [1.0]


def test_seed_copies_gives_a_seed_of_distinct_scenes():
    """--seed-copies 1: a seed of distinct scenes from the seed's domains, and a work dir of
    its own; the default's work dirs keep their names."""
    import numpy as np
    from dataclasses import replace

    al = load_benchmark()
    from _al_data import SEED_DOMAINS, DataCfg, make_data

    small = DataCfg(n_seed=60, n_pool=120, n_test=40)
    base, distinct = make_data(small), make_data(replace(small, seed_copies=1.0))
    assert len(np.unique(distinct["seed"].cluster)) == 60  # one image per base scene
    assert len(np.unique(base["seed"].cluster)) < 30  # the default: clusters of near-copies (mean 10)
    assert set(distinct["seed"].domain.tolist()) <= set(SEED_DOMAINS)
    assert len(distinct["pool"].images) == 120 and len(np.unique(distinct["pool"].cluster)) < 60

    cfg = al.BenchCfg()
    assert cfg.data.seed_copies is None
    one = replace(cfg, data=replace(cfg.data, seed_copies=1.0))
    assert one.key(data_only=True) != cfg.key(data_only=True) and one.key() != cfg.key()
    # the names of the work dirs cached before the option (RESULTS.md reads from them)
    assert cfg.key(data_only=True) == "b3c0a1a02d" and replace(cfg, precision="fp32").key(data_only=True) == "e3338c0fd6"
    with pytest.raises(SystemExit, match="at least 1"):
        al.main(["--quick", "--seed-copies", "0.5"])


def test_pool_copies_changes_the_pool_not_the_seed():
    """--pool-copies C: a pool of more distinct scenes at the same size; the seed keeps its
    own redundancy (the default's 10, or --seed-copies), and the run has a work dir of its own."""
    from dataclasses import replace

    import numpy as np

    al = load_benchmark()
    from _al_data import make_data

    default = al.config(al.parse_args([]))
    cfg = al.config(al.parse_args(["--pool-copies", "3"]))
    assert cfg.data.mean_copies == 3 and cfg.data.seed_copies == default.data.mean_copies
    assert cfg.key(data_only=True) != default.key(data_only=True)
    # the same data as the default, so the same work dir: nothing is computed twice
    assert al.config(al.parse_args(["--pool-copies", "10"])).key() == default.key()
    assert al.config(al.parse_args(["--seed-copies", "10"])).key(data_only=True) == default.key(data_only=True)
    both = al.config(al.parse_args(["--pool-copies", "3", "--seed-copies", "1"]))
    assert both.data.mean_copies == 3 and both.data.seed_copies == 1
    def small(c):
        return make_data(replace(c.data, n_seed=200, n_pool=600, n_test=40))

    def scenes(split):
        return len(np.unique(split.cluster))

    base, less = small(default), small(cfg)
    assert scenes(less["pool"]) > 2 * scenes(base["pool"])  # mean 3 near-copies against 10
    assert len(less["pool"].images) == len(base["pool"].images) == 600
    assert scenes(less["seed"]) < 200 / 4  # the seed is still drawn with mean 10 near-copies
    with pytest.raises(SystemExit, match="at least 1"):
        al.main(["--quick", "--pool-copies", "0.5"])
