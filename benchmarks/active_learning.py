"""Active learning: does `novelty select` save labels? One command, on a CPU.

    python benchmarks/active_learning.py            # 3 seeds x 5 strategies x 5 rounds of 150
    python benchmarks/active_learning.py --quick    # tiny sizes, one round, 1 seed (< 1 min)
    python benchmarks/active_learning.py --retrain 3 --strategies kcenter hybrid   # training noise of cached runs

The setting (benchmarks/_al_data.py): 32 px scenes with 2 object classes and pixel
masks in 8 visual domains; a labeled seed from 2 domains, a pool from all 8 in which
the seed's domains are the most common, clusters of near-copies everywhere but the
test set, a test set that weighs all domains the same. The model (_al_model.py) is a
small U-Net with MC dropout, trained from scratch on the labeled set each round
(fixed steps, the same seed for every strategy), scored by foreground mIoU on the test set.

Each round goes through the project's own commands, in-process (typer's CliRunner):
`uncertainty --detector benchmarks/_al_model.py:factory --kind segmentation` with the
current model (uncertainty and hybrid only), `select --budget B` (no --strategy for
hybrid: the default once uncertainty exists), `mark-labeled --selection`.

Vectors (--embedding): `model` (default), the current segmenter's own features (pooled
bottleneck activations, standardised), brought in each round through
`import-embeddings` into a fresh index, with the round's uncertainty through
`import-uncertainty`; or `clip`, `build-index` with a random-weight open_clip ViT (a
32 px config written to the work dir), once per seed. Why `model`: no pretrained CLIP
weights can be fetched here, and a random-weight ViT's geometry is nearly degenerate
(median cosine distance to the seed set 0.005-0.08; it ranks the night domains as
barely novel), so it tests the encoder rather than the method; the detector's own
features are what a user without a good encoder would import (README: `import-embeddings`).
Measured on seeds 0-2, then confirmed on 3-5: k-center on model features beats k-center
on the random ViT by +0.04 mean mIoU over rounds (benchmarks/RESULTS.md). The image index
(`build-index`, clip) is still built: `uncertainty` scores the images it catalogs.

Precision (--precision): bf16 (default since session 6) trains the U-Net and runs the
MC-dropout passes (`uncertainty --precision bf16`) under torch.autocast(bfloat16), 1.4x
and 1.9x faster on this CPU; fixed labeled sets score the same as in fp32. fp32 reaches
the runs cached before (benchmarks/RESULTS.md, *bf16*).

The labeled seed (--seed-copies): drawn like the pool by default, about 30 base scenes; with 1,
300 distinct scenes, which the round-0 model learns its own domains from (RESULTS.md,
*A seed the model learns from*).

Seeds change everything: the data, the model's initialisation, the random picks.
Seeds run in parallel processes (--jobs), one torch thread each. Per-(seed, strategy)
results are cached under the work dir, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    # one thread per process, set before numpy loads its BLAS (spawned workers inherit it):
    # idle OpenBLAS threads spin and took a core from the other worker
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from _al_data import SEED_DOMAINS, DataCfg, make_data, write_pngs  # noqa: E402
from _al_variants import ORACLE, VARIANTS  # noqa: E402

STRATEGIES = ("random", "novelty", "kcenter", "uncertainty", "hybrid")
NEEDS_U = ("uncertainty", "hybrid", *(v for v in VARIANTS if v.startswith("hybrid")))
NO_VECTORS = ("random", "uncertainty")  # the same picks whatever the embedding
TOP_PERCENT = 5.0  # `novelty uncertainty --top-percent`'s default: round 0 (index0) is scored with it
ENCODER = {  # a random-weight open_clip ViT for 32 px images: 64 patches of 4 px
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 128, "patch_size": 4, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


@dataclass(frozen=True)
class BenchCfg:
    data: DataCfg = DataCfg()
    rounds: int = 5
    budget: int = 150
    seeds: tuple = (0, 1, 2)
    strategies: tuple = STRATEGIES
    # training steps per round (batch 32), the same for every labeled-set size. 1000 since session 5:
    # at 500 the U-Net often had not yet learned disc from square (train mIoU 0.57), and the test
    # mIoU of one labeled set ranged 0.42-0.68 over training seeds (RESULTS.md, *Training noise*)
    steps: int = 1000
    passes: int = 10  # MC-dropout passes
    beta: float = 1.0  # --uncertainty-weight for hybrid
    top_percent: float = TOP_PERCENT  # uncertainty --top-percent: image score = mean BALD of this % most uncertain pixels
    embedding: str = "model"  # model: the current model's features, imported each round | clip: build-index, once
    # bf16 since session 6: training steps and MC-dropout passes under torch.autocast(bfloat16),
    # 1.4x and 1.9x faster on this CPU (AVX512-BF16); fixed labeled sets score the same as in
    # fp32 (RESULTS.md, *bf16*). Test mIoU and the embedded features are computed in fp32.
    precision: str = "bf16"

    def key(self, *, data_only: bool = False) -> str:
        """Hash of the config; data_only: of what a seed's rounds depend on (the work dir,
        shared by any set of seeds: each seed has its own folder in it)."""
        d = asdict(self)
        if d["data"]["seed_copies"] in (None, d["data"]["mean_copies"]):  # the seed drawn like the pool:
            d["data"].pop("seed_copies")  # work dirs and results keep the names they had before the option
        if d["precision"] == "fp32":
            d.pop("precision")  # fp32 work dirs and results keep the names they had before the option
        if data_only:
            d = {k: d[k] for k in ("data", "rounds", "budget", "steps", "passes", "precision") if k in d}
        else:
            if d["embedding"] == "clip":
                d.pop("embedding")  # hashes as before the option existed (clip was the default)
            if d["top_percent"] == TOP_PERCENT:
                d.pop("top_percent")
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


QUICK = BenchCfg(data=DataCfg(n_seed=40, n_pool=200, n_test=80, mean_copies=4.0), rounds=1, budget=20,
                 seeds=(0,), steps=30, passes=3)


# ------------------------------------------------------------------- the CLI, in-process
def novelty(*args: str, env: dict | None = None) -> str:
    from typer.testing import CliRunner

    from novelty.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if r.exit_code != 0:
        raise RuntimeError(f"novelty {' '.join(map(str, args[:2]))} failed ({r.exit_code}): {r.output.strip()}"
                           + (f"\n{r.exception!r}" if r.exception and not isinstance(r.exception, SystemExit) else ""))
    return r.output


def score_uncertainty(index: Path, weights: Path, cfg: "BenchCfg") -> None:
    novelty("uncertainty", "--detector", f"{HERE / '_al_model.py'}:factory", "--kind", "segmentation",
            "--passes", cfg.passes, "--top-percent", cfg.top_percent, "--precision", cfg.precision, "--batch-size", 32,
            "--workers", 0, "--device", "cpu", "--index", index, env={"NOVELTY_AL_WEIGHTS": str(weights)})


def select(index: Path, strategy: str, budget: int, seed: int, beta: float, out: Path) -> list[str]:
    """-> the picked file names, best first. hybrid is asked for as the default."""
    args = ["select", "--budget", budget, "--seed", seed, "--uncertainty-weight", beta, "--out", out,
            "--device", "cpu", "--index", index]
    text = novelty(*args, *([] if strategy == "hybrid" else ["--strategy", strategy]))
    assert f" with {strategy} " in text, text  # hybrid really is the default
    with open(out, newline="") as f:  # imported vectors have no path: their id is the file name
        return [Path(r["path"]).name if r["path"] else r["id"] for r in csv.DictReader(f)]


def mc_uncertainty(index: Path) -> dict[str, float]:
    """File name -> the latest `novelty uncertainty` score in the image index."""
    from novelty.records import latest_uncertainty
    from novelty.store import open_store

    with open_store(index) as store:
        u = latest_uncertainty(store)
        meta = store.describe(u.ids)
    return {Path(meta[int(i)][1]).name: float(v) for i, v in zip(u.ids, u.values)}


def oracle_uncertainty(weights: Path, z, picked: list[int], kind: str) -> dict[str, float]:
    """File name -> the current model's true error on each unlabeled pool image, from the
    hidden masks: kind "iou", 1 - its IoU (hybrid-oracle); "pixels", how many of its pixels
    are wrong (hybrid-oracle-pixels)."""
    from _al_model import image_errors, load, predict

    rest = np.setdiff1d(np.arange(len(z["pool_images"])), np.asarray(picked, np.int64))
    pred, truth = predict(load(weights), z["pool_images"][rest]), z["pool_masks"][rest]
    err = image_errors(pred, truth) if kind == "iou" else (pred != truth).sum((1, 2))
    names = _names("pool", len(z["pool_images"]))
    return {names[i]: float(e) for i, e in zip(rest, err)}


def import_uncertainty(index: Path, folder: Path, u: dict[str, float], key=lambda name: name) -> None:
    """u (file name -> score) into `index` through `novelty import-uncertainty`; key: the name as that index knows it."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "uncertainty.csv", "w") as f:
        f.write("id,uncertainty\n" + "".join(f"{key(n)},{v!r}\n" for n, v in u.items()))
    novelty("import-uncertainty", folder / "uncertainty.csv", "--index", index)


def feature_index(folder: Path, weights: Path, z, picked: list[int], u: dict[str, float] | None) -> Path:
    """--embedding model: a fresh index of the model's own features (import-embeddings),
    labeled = seed + picks, with the round's uncertainty `u` (file name -> score) brought
    in by import-uncertainty."""
    from _al_model import features, load

    n_seed, n_pool = len(z["seed_images"]), len(z["pool_images"])
    F = features(load(weights), np.concatenate([z["seed_images"], z["pool_images"]]))  # [n, d]
    F = (F - F.mean(0)) / (F.std(0) + 1e-6)  # standardised: ReLU features all share one direction
    names = np.array(_names("seed", n_seed) + _names("pool", n_pool))
    lab = np.zeros(len(F), bool)
    lab[:n_seed] = True
    lab[n_seed + np.asarray(picked, np.int64)] = True
    folder.mkdir(parents=True)
    for split, rows in (("labeled", lab), ("unlabeled", ~lab)):
        np.save(folder / f"{split}.npy", F[rows])
        (folder / f"{split}.txt").write_text("\n".join(names[rows]) + "\n")
        novelty("import-embeddings", folder / f"{split}.npy", "--ids", folder / f"{split}.txt", "--split", split,
                "--model", "segmenter-bottleneck", "--index", folder / "index")
    if u is not None:
        import_uncertainty(folder / "index", folder, u)
    return folder / "index"


# ------------------------------------------------------------------------- one seed
def _torch_setup() -> None:
    import torch

    from _al_variants import register

    register()  # candidate strategies, in this process's registry only
    torch.set_num_threads(1)  # seeds run in parallel processes; one thread each scales best here
    torch.set_flush_denormal(True)


@contextlib.contextmanager
def torch_restored():
    """Around in-process work (tests) that calls _torch_setup: leave torch as it was."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)


def pool_index(path) -> int:
    """pool_00042.png (or a path to it) -> 42."""
    return int(Path(path).stem.split("_")[1])


def train_round(z, lab: np.ndarray, steps: int, seed: int, r: int, k: int = 0, precision: str = "fp32"):
    """The U-Net trained on the seed plus the pool images `lab`, for round r of a seed.
    k = 0: the training the benchmark's rounds use; k >= 1: other training seeds, for --retrain."""
    from _al_model import train

    return train(np.concatenate([z["seed_images"], z["pool_images"][lab]]),
                 np.concatenate([z["seed_masks"], z["pool_masks"][lab]]), steps, seed * 1000 + r + 100000 * k,
                 precision=precision)


def _names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}_{i:05d}.png" for i in range(n)]


def prepare(cfg: BenchCfg, seed: int, work: Path) -> dict:
    """Data on disk, the index (build-index), the round-0 model and its uncertainty."""
    from _al_model import evaluate, save, train

    _torch_setup()
    sw = work / f"seed{seed}"
    done = sw / "prepared.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(sw, ignore_errors=True)
    t0, c0 = time.perf_counter(), time.process_time()
    data = make_data(replace(cfg.data, seed=seed))
    write_pngs(data["seed"], sw / "images" / "seed", "seed")
    write_pngs(data["pool"], sw / "images" / "pool", "pool")
    np.savez(sw / "data.npz", **{f"{s}_{f}": getattr(data[s], f) for s in data for f in ("images", "masks", "domain", "cluster")})
    enc = work / "al-vit-tiny.json"
    t1 = time.perf_counter()
    novelty("build-index", "--labeled", sw / "images" / "seed", "--unlabeled", sw / "images" / "pool", "--model", enc,
            "--pretrained", "none", "--device", "cpu", "--workers", 0, "--batch-size", 256, "--index", sw / "index0")
    t2 = time.perf_counter()
    model = train(data["seed"].images, data["seed"].masks, cfg.steps, seed * 1000, precision=cfg.precision)
    save(model, sw / "model_r0.pt")
    ev = evaluate(model, data["test"].images, data["test"].masks, data["test"].domain)
    t3 = time.perf_counter()
    if set(cfg.strategies) & set(NEEDS_U):
        # round 1 of uncertainty and hybrid, at TOP_PERCENT whatever cfg.top_percent (index0 is shared)
        score_uncertainty(sw / "index0", sw / "model_r0.pt", replace(cfg, top_percent=TOP_PERCENT))
    info = {"seed": seed, "round0": ev, "seconds": {"data": t1 - t0, "build_index": t2 - t1, "train": t3 - t2,
                                                   "uncertainty": time.perf_counter() - t3}}
    info["analysis"] = analyse_round0(sw, data, model)
    info["cpu_seconds"] = time.process_time() - c0
    done.write_text(json.dumps(info))
    return info


def analyse_round0(sw: Path, data: dict, model) -> dict:
    """Is the embedding's geometry about domains and near-copies? Is uncertainty about errors?"""
    from _al_model import image_errors, predict

    from novelty.store import open_store

    with open_store(sw / "index0") as store:
        ids, X = store.vectors("unlabeled")
        paths = store.describe(ids)
    order = np.array([pool_index(paths[int(i)][1]) for i in ids])
    X = np.asarray(X, np.float32)
    dom, clu = data["pool"].domain[order], data["pool"].cluster[order]
    S = X @ X.T
    np.fill_diagonal(S, -np.inf)
    nn = np.argsort(-S, axis=1)[:, :10]  # [n, 10]
    out = {"knn10_same_domain": float(np.mean(dom[nn] == dom[:, None])),
           "nn1_same_cluster": float(np.mean(clu[nn[:, 0]] == clu))}
    with open_store(sw / "index0") as store:
        rows = store.db.execute("SELECT i.path, u.value FROM uncertainty u JOIN images i ON i.id = u.image "
                                "WHERE u.run = (SELECT MAX(id) FROM runs WHERE kind='uncertainty')").fetchall()
    if rows:
        idx = np.array([pool_index(p) for p, _ in rows])
        u = np.array([v for _, v in rows], np.float64)
        pred = predict(model, data["pool"].images[idx])
        err = image_errors(pred, data["pool"].masks[idx])
        novel = ~np.isin(data["pool"].domain[idx], SEED_DOMAINS)
        out["u_spearman_error"] = _spearman(u, err)
        out["u_auroc_novel_domain"] = _auroc(u, novel)
        out["u_mean_seed_domains"], out["u_mean_novel_domains"] = float(u[~novel].mean()), float(u[novel].mean())
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _auroc(score: np.ndarray, positive: np.ndarray) -> float:
    r = np.argsort(np.argsort(score)) + 1.0
    n1, n0 = positive.sum(), (~positive).sum()
    return float((r[positive].sum() - n1 * (n1 + 1) / 2) / max(n1 * n0, 1))


def run_tag(cfg: BenchCfg, strategy: str) -> str:
    """What tells this config's runs of `strategy` apart in a seed's folder (rows_<strategy><tag>.json)."""
    return (f"_beta{cfg.beta:g}" if strategy in NEEDS_U and cfg.beta != 1.0 else "") + \
        (f"_top{cfg.top_percent:g}" if strategy in NEEDS_U and cfg.top_percent != TOP_PERCENT else "") + \
        ("_model" if cfg.embedding == "model" and strategy not in NO_VECTORS else "")


def run_strategy(cfg: BenchCfg, seed: int, strategy: str, work: Path) -> list[dict]:
    """Rounds 1..R of one strategy from the seed's round 0; -> one row per round (0..R)."""
    from _al_model import evaluate, save

    from novelty.store import open_store

    _torch_setup()
    sw = work / f"seed{seed}"
    tag = run_tag(cfg, strategy)
    cache = sw / f"rows_{strategy}{tag}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    info = json.loads((sw / "prepared.json").read_text())
    z = np.load(sw / "data.npz")
    seed_n, pool_dom, pool_clu = len(z["seed_images"]), z["pool_domain"], z["pool_cluster"]
    where = {n: i for i, n in enumerate(_names("pool", len(pool_dom)))}
    index, run = sw / f"index_{strategy}{tag}", sw / f"run_{strategy}{tag}"
    shutil.rmtree(index, ignore_errors=True), shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(sw / "index0", index, ignore=shutil.ignore_patterns(".lock"))
    run.mkdir()
    with open_store(index) as store:  # the paths as the catalog holds them
        catalog_path = {Path(p).name: p for (p,) in store.db.execute("SELECT path FROM images WHERE split='unlabeled'")}
    rows = [{"seed": seed, "strategy": strategy, "beta": cfg.beta if strategy in NEEDS_U else None, "round": 0, "labels": seed_n, "miou": info["round0"]["miou"],
             "by_domain": info["round0"]["by_domain"], "seconds": 0.0}]
    picked: list[int] = []
    weights = sw / "model_r0.pt"
    for r in range(1, cfg.rounds + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        u = None
        if strategy in ORACLE:
            u = oracle_uncertainty(weights, z, picked, ORACLE[strategy])
        elif strategy in NEEDS_U:
            if r > 1 or cfg.top_percent != TOP_PERCENT:  # round 1: index0 was scored at TOP_PERCENT
                score_uncertainty(index, weights, cfg)
            if cfg.embedding == "model" and strategy not in NO_VECTORS:  # carried into the feature index
                u = mc_uncertainty(index)
        out = run / f"select_r{r}.csv"
        if cfg.embedding == "model" and strategy not in NO_VECTORS:
            fi = feature_index(run / f"features_r{r}", weights, z, picked, u)
            names = select(fi, strategy, cfg.budget, seed * 1000 + r, cfg.beta, out)
            (run / f"picked_r{r}.txt").write_text("".join(f"{catalog_path[n]}\n" for n in names))
            novelty("mark-labeled", run / f"picked_r{r}.txt", "--index", index)
        else:
            if strategy in ORACLE:  # the image index knows the pool images by path
                import_uncertainty(index, run / f"oracle_r{r}", u, key=catalog_path.__getitem__)
            names = select(index, strategy, cfg.budget, seed * 1000 + r, cfg.beta, out)
            novelty("mark-labeled", "--selection", out, "--index", index)
        new = [where[n] for n in names]
        assert not set(new) & set(picked), "a labeled image was picked again"
        picked += new
        t1 = time.perf_counter()
        lab = np.asarray(picked)
        model = train_round(z, lab, cfg.steps, seed, r, precision=cfg.precision)
        weights = run / f"model_r{r}.pt"
        save(model, weights)
        ev = evaluate(model, z["test_images"], z["test_masks"], z["test_domain"])
        new_a = np.asarray(new)
        rows.append({"seed": seed, "strategy": strategy, "beta": rows[0]["beta"], "round": r, "labels": seed_n + len(picked), "miou": ev["miou"],
                     "by_domain": ev["by_domain"],
                     "picked_by_domain": np.bincount(pool_dom[new_a], minlength=len(ev["by_domain"])).tolist(),
                     "picked_clusters": int(len(np.unique(pool_clu[new_a]))),
                     "seconds": time.perf_counter() - t0, "select_seconds": t1 - t0, "cpu_seconds": time.process_time() - c0})
    cache.write_text(json.dumps(rows))
    return rows


# ----------------------------------------------------------------------------- main
def run_all(cfg: BenchCfg, work: Path, jobs: int) -> tuple[list[dict], list[dict]]:
    work.mkdir(parents=True, exist_ok=True)
    (work / "al-vit-tiny.json").write_text(json.dumps(ENCODER))
    (work / "cfg.json").write_text(json.dumps(asdict(cfg), indent=1))
    # expensive strategies first, so the pool's workers finish together
    tasks = sorted(((s, st) for s in cfg.seeds for st in cfg.strategies), key=lambda t: (t[1] not in NEEDS_U, t))
    if jobs <= 1:
        with torch_restored():
            infos = [prepare(cfg, s, work) for s in cfg.seeds]
            rows = [row for s, st in tasks for row in run_strategy(cfg, s, st, work)]
        return infos, rows
    import multiprocessing as mp
    from concurrent.futures import as_completed

    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
        preps = {ex.submit(prepare, cfg, s, work): s for s in cfg.seeds}
        futs = []
        for f in as_completed(preps):  # a seed's strategies start as soon as its round 0 is ready
            futs += [ex.submit(run_strategy, cfg, s, st, work) for s, st in tasks if s == preps[f]]
        infos = sorted((f.result() for f in preps), key=lambda i: cfg.seeds.index(i["seed"]))
        rows = [row for f in futs for row in f.result()]
    return infos, rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round, one seed: a smoke test")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES + tuple(VARIANTS),
                   help="default: the five product strategies; benchmarks/_al_variants.py holds candidates")
    p.add_argument("--rounds", type=int)
    p.add_argument("--budget", type=int)
    p.add_argument("--pool", type=int)
    p.add_argument("--seed-copies", type=float, metavar="C",
                   help="mean near-copies per base scene in the labeled seed (default: the pool's 10); 1: 300 distinct "
                        "scenes, a seed the round-0 model learns its domains from")
    p.add_argument("--pool-copies", type=float, metavar="C",
                   help="mean near-copies per base scene in the pool (default 10: about 600 scenes in 6000 images, "
                        "and 750 picks reach most of them); only the pool: the seed keeps its own (10, or --seed-copies)")
    p.add_argument("--steps", type=int)
    p.add_argument("--beta", type=float, help="--uncertainty-weight for hybrid")
    p.add_argument("--top-percent", type=float, help="uncertainty --top-percent (default 5: mean BALD of the 5%% most "
                                                     "uncertain pixels; 100: of all pixels)")
    p.add_argument("--precision", choices=("bf16", "fp32"),
                   help="training and MC-dropout passes (default bf16); fp32 reaches the runs cached before session 6")
    p.add_argument("--embedding", choices=("clip", "model"),
                   help="model (default): the current segmenter's pooled bottleneck features, import-embeddings "
                        "into a fresh index each round; clip: build-index with a random-weight open_clip ViT, once")
    p.add_argument("--compare", action="store_true",
                   help="only print a table of every cached run in the work dir (strategies, embeddings, variants)")
    p.add_argument("--diagnose", action="store_true",
                   help="only print which uncertainty image score tracks the cached round-0 models' errors")
    p.add_argument("--retrain", type=int, metavar="K",
                   help="only retrain each cached round's labeled set K more times (other training seeds) and print "
                        "how much of the spread is training noise; with --seeds and --strategies")
    p.add_argument("--retrain-steps", type=int, metavar="N",
                   help="--retrain: train N steps instead of the cached runs' own --steps")
    p.add_argument("--retrain-precision", choices=("bf16", "fp32"),
                   help="--retrain: train at this precision instead of the cached runs' own --precision")
    p.add_argument("--retrain-rounds", type=int, nargs="+", metavar="R", help="--retrain: only these rounds (default all)")
    p.add_argument("--against", default="random",
                   help="--compare: the cached run to pair against (e.g. kcenter_model); default random")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel processes over seeds and strategies")
    p.add_argument("--work", type=Path, help="work dir (default benchmarks/_work/al/<config hash>)")
    p.add_argument("--md", type=Path, help="markdown file to write the section into (default benchmarks/RESULTS.md)")
    p.add_argument("--png", type=Path, help="plot (default benchmarks/active_learning.png)")
    p.add_argument("--fresh", action="store_true", help="discard cached results in the work dir")
    return p.parse_args(argv)


def config(a: argparse.Namespace) -> BenchCfg:
    """The run's config from the parsed arguments; a bad value exits with a one-line message."""
    cfg = QUICK if a.quick else BenchCfg()
    over = {k: v for k, v in (("rounds", a.rounds), ("budget", a.budget), ("steps", a.steps), ("beta", a.beta), ("top_percent", a.top_percent),
                              ("embedding", a.embedding), ("precision", a.precision),
                              ("seeds", tuple(a.seeds) if a.seeds else None),
                              ("strategies", tuple(a.strategies) if a.strategies else None)) if v is not None}
    data = {k: v for k, v in (("n_pool", a.pool), ("seed_copies", a.seed_copies)) if v is not None}
    if a.seed_copies is not None and a.seed_copies < 1:
        raise SystemExit("--seed-copies must be at least 1")
    if a.pool_copies is not None:
        if a.pool_copies < 1:
            raise SystemExit("--pool-copies must be at least 1")
        # mean_copies is the pool's and, unless --seed-copies says otherwise, the seed's: pin the seed's
        data = {**data, "mean_copies": a.pool_copies, "seed_copies": data.get("seed_copies", cfg.data.mean_copies)}
    cfg = replace(cfg, **over, **({"data": replace(cfg.data, **data)} if data else {}))
    return cfg


def main(argv=None) -> dict:
    from _al_report import report

    a = parse_args(argv)
    cfg = config(a)
    work = a.work or HERE / "_work" / "al" / cfg.key(data_only=True)
    if a.diagnose:
        import torch

        from _al_diagnose import diagnose

        torch.set_num_threads(os.cpu_count() or 1)  # one process here, not one per seed
        text = diagnose(work, cfg.passes)
        print(text)
        return {"text": text}
    if (a.retrain_rounds or a.retrain_steps is not None or a.retrain_precision) and a.retrain is None:
        raise SystemExit("--retrain-rounds, --retrain-steps and --retrain-precision only go with --retrain K")
    if a.retrain is not None:
        from _al_retrain import retrain

        if a.retrain < 1 or (a.retrain_steps is not None and a.retrain_steps < 1):
            raise SystemExit("--retrain K and --retrain-steps N must be at least 1")
        res = retrain(cfg, work, {st: run_tag(cfg, st) for st in cfg.strategies}, a.retrain, a.jobs, a.retrain_rounds,
                      a.retrain_steps, a.retrain_precision)
        print(res["text"])
        return res
    if a.compare:
        from _al_report import compare

        text = compare(work, a.against)
        print(text)
        return {"text": text}
    if a.fresh:
        shutil.rmtree(work, ignore_errors=True)
    default_out = work if a.quick else HERE
    md, png = a.md or default_out / "RESULTS.md", a.png or default_out / "active_learning.png"
    t0 = time.perf_counter()
    infos, rows = run_all(cfg, work, a.jobs)
    seconds = time.perf_counter() - t0
    results = work / f"results-{cfg.key()}.json"
    results.write_text(json.dumps({"cfg": asdict(cfg), "prepared": infos, "rows": rows, "seconds": seconds}))
    command = "python benchmarks/active_learning.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = report(cfg, infos, rows, seconds, command.strip(), md, png, a.jobs)
    print(summary["text"])
    return {**summary, "results": results}


if __name__ == "__main__":
    main()
