"""benchmarks/active_learning.py --quick end to end: data, build-index, MC-dropout
uncertainty through the CLI, every strategy's select and mark-labeled, retraining, and
the table, markdown and plot. The result itself is not asserted, only its form."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

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


def test_labels_to_reach_interpolates():
    al = load_benchmark()
    from _al_report import labels_to_reach

    import numpy as np

    labels = np.array([300, 450, 600])
    assert labels_to_reach(labels, np.array([0.2, 0.4, 0.6]), 0.5) == 525.0
    assert labels_to_reach(labels, np.array([0.2, 0.4, 0.6]), 0.1) == 300.0
    assert labels_to_reach(labels, np.array([0.2, 0.4, 0.45]), 0.5) is None
    assert al.STRATEGIES[-1] == "hybrid"
