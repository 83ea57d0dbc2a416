"""How much of the benchmark's spread is training noise, not selection?

    python benchmarks/active_learning.py --retrain 3 --seeds 0 1 2 --strategies kcenter hybrid

For each cached (seed, strategy) run and each round, the round's labeled set (seed plus
the picks so far, read back from the run's own catalog) is trained on again from scratch,
K more times, with other training seeds (seed * 1000 + round + 100000 * k, k = 1..K), and
scored on the test set. Nothing is selected again: the picks are the run's. The table
gives the spread of test mIoU over trainings of one fixed labeled set, next to the spread
over benchmark seeds that the comparison tables report.
"""
from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import numpy as np


def labeled_sets(run_index: Path, n_rounds: int, budget: int) -> list[np.ndarray]:
    """Pool indices labeled by rounds 1..r, for r = 1..n_rounds, from the catalog of a
    run's image index: mark-labeled stamps every image it moves (labeled_at), one
    stamp per call, so the stamps' order is the rounds' order."""
    from active_learning import pool_index

    with sqlite3.connect(f"file:{run_index / 'catalog.sqlite'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT path FROM images WHERE split = 'labeled' AND labeled_at IS NOT NULL "
                          "ORDER BY labeled_at, id").fetchall()
    pool = np.array([pool_index(p) for (p,) in rows], np.int64)
    if len(pool) < n_rounds * budget:
        raise RuntimeError(f"{run_index}: {len(pool)} labeled picks, expected {n_rounds * budget}")
    return [pool[: r * budget] for r in range(1, n_rounds + 1)]


def retrain_run(cfg, work: Path, seed: int, strategy: str, tag: str, k: int, rounds: tuple, steps: int,
                precision: str) -> list[dict]:
    """One cached (seed, strategy) run: -> [{seed, strategy, round, cached, retrained: [K]}] per round in `rounds`,
    each retraining `steps` steps long, at `precision`."""
    from _al_model import evaluate
    from active_learning import _torch_setup, train_round

    _torch_setup()
    sw = work / f"seed{seed}"
    cache = sw / f"rows_{strategy}{tag}.json"
    if not cache.exists():
        return []
    z = np.load(sw / "data.npz")
    cached = {r["round"]: r["miou"] for r in json.loads(cache.read_text())}
    out = []
    for r, lab in enumerate(labeled_sets(sw / f"index_{strategy}{tag}", cfg.rounds, cfg.budget), 1):
        if r not in rounds:
            continue
        got = [evaluate(train_round(z, lab, steps, seed, r, j, precision), z["test_images"], z["test_masks"], z["test_domain"])["miou"]
               for j in range(1, k + 1)]
        out.append({"seed": seed, "strategy": strategy, "round": r, "cached": cached[r], "retrained": got})
        print(f"seed {seed} {strategy} round {r}: cached {cached[r]:.3f}, retrained "
              f"{', '.join(f'{v:.3f}' for v in got)}", file=sys.stderr, flush=True)
    return out


def retrain(cfg, work: Path, tags: dict[str, str], k: int, jobs: int = 1, rounds: tuple | None = None,
            steps: int | None = None, precision: str | None = None) -> dict:
    """Every cached run of cfg.seeds x tags, in `jobs` processes -> {'sets': [...], 'text': markdown}.
    rounds: which rounds to retrain (default all); steps: how long each retraining is (default
    the cached runs' own cfg.steps; another value asks how the spread depends on it); precision:
    the retrainings' (default the cached runs' own; another asks whether it changes the scores)."""
    steps, precision = steps or cfg.steps, precision or cfg.precision
    rounds = tuple(rounds or range(1, cfg.rounds + 1))
    if not set(rounds) <= set(range(1, cfg.rounds + 1)):
        raise SystemExit(f"--retrain-rounds: rounds are 1..{cfg.rounds}")

    tasks = [(cfg, work, seed, st, tag, k, rounds, steps, precision) for seed in cfg.seeds for st, tag in tags.items()]
    if jobs <= 1:
        from active_learning import torch_restored

        with torch_restored():
            sets = [s for t in tasks for s in retrain_run(*t)]
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
            sets = [s for f in [ex.submit(retrain_run, *t) for t in tasks] for s in f.result()]
    return {"sets": sets, "text": table(cfg, sets, k, rounds, steps, precision)}


def table(cfg, sets: list[dict], k: int, rounds: tuple, steps: int, precision: str) -> str:
    if not sets:
        return "no cached run matches those seeds and strategies"
    strategies = list(dict.fromkeys(s["strategy"] for s in sets))
    seeds = sorted({s["seed"] for s in sets})
    same = steps == cfg.steps and precision == cfg.precision
    out = [f"Cached runs trained {cfg.steps} steps per round in {cfg.precision}; {k} more trainings of {steps} steps "
           f"in {precision} of each "
           f"cached round's labeled set{'' if same else ' (the cached score is not among them)'}; seeds "
           f"{', '.join(map(str, seeds))}.", "",
           "Test mIoU of one labeled set over its trainings: the mean, the sd within a set (pooled over seeds), "
           "the mean range (best − worst training), and the sd over seeds of one training's score and of the "
           "mean of the trainings, per round:", "",
           "| strategy | round | mean | sd within a set | mean range | sd over seeds, one training | sd over seeds, mean of trainings |",
           "|---|---|---|---|---|---|---|"]

    def trainings(s):  # the cached score counts as one training only when it had the same length
        return [s["cached"], *s["retrained"]] if same else s["retrained"]
    for st in strategies:
        for r in rounds:
            rows = [s for s in sets if s["strategy"] == st and s["round"] == r]
            if not rows:
                continue
            v = np.array([trainings(s) for s in rows])  # [seeds, trainings]
            within = float(np.sqrt(np.mean(np.var(v, axis=1, ddof=1)))) if v.shape[1] > 1 else float("nan")
            out.append(f"| {st} | {r} | {v.mean():.3f} | {within:.3f} | {np.mean(v.max(1) - v.min(1)):.3f} | "
                       f"{np.std(v[:, 0], ddof=1) if len(v) > 1 else float('nan'):.3f} | "
                       f"{np.std(v.mean(1), ddof=1) if len(v) > 1 else float('nan'):.3f} |")
    if len(strategies) == 2:
        a, b = strategies
        paired = {(s["seed"], s["round"], s["strategy"]): s for s in sets}
        both = [sd for sd in seeds if all((sd, r, x) in paired for r in rounds for x in (a, b))]
        if len(both) > 1:
            def over_rounds(x, use):
                return np.array([np.mean([use(paired[(sd, r, x)]) for r in rounds]) for sd in both])
            one = over_rounds(a, lambda s: trainings(s)[0]) - over_rounds(b, lambda s: trainings(s)[0])
            avg = over_rounds(a, lambda s: np.mean(trainings(s))) - over_rounds(b, lambda s: np.mean(trainings(s)))
            what = f"mIoU at round {rounds[0]}" if len(rounds) == 1 else \
                f"mean mIoU over rounds {', '.join(map(str, rounds))}"
            out += ["", f"{a} − {b}, {what}, paired by seed ({len(both)} seeds): with one "
                        f"training {one.mean():+.3f} ± {one.std(ddof=1):.3f} ({int((one > 0).sum())}/{len(one)} wins); "
                        f"with the mean of {len(trainings(sets[0]))} trainings {avg.mean():+.3f} ± {avg.std(ddof=1):.3f} "
                        f"({int((avg > 0).sum())}/{len(avg)} wins)."]
    return "\n".join(out)
