"""k-center greedy and nearest-labeled at scale: the pruned exact path against the plain loop.

    python benchmarks/select_scale.py            # every case (several minutes)
    python benchmarks/select_scale.py --quick    # small sizes
    python benchmarks/select_scale.py --case clustered-200k

Data (generated once under benchmarks/_work/select/, float16, unit rows, 512-d):
  clustered  CLIP-like: 2,000 categories in 100 super-categories, each category a mix of
             12 modes (lognormal sizes). Cosine similarity: same category 0.7-0.95
             (median ~0.82), same super-category ~0.45, unrelated 0.1-0.3 (median 0.2).
             The labeled rows come from 90% of the categories: the rest are novel.
  uniform    uniform on the sphere: no structure for the bounds to use.

Each case runs in a fresh subprocess per method, so peak RSS (ru_maxrss) is its own;
"alg MB" is the peak minus the RSS right before the call (vectors loaded, torch and
faiss imported), i.e. what the algorithm itself allocated. The plain loop holds a
float32 copy of the pool (its documented fast mode); at 1M it is extrapolated from
its first --plain-picks picks, and the 1M radius check recomputes the covering
radius of the fast picks from scratch instead.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORK = Path(__file__).parent / "_work" / "select"
D = 512


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def make_clustered(n: int, m: int, d: int = D, categories: int = 2000, modes: int = 12, novel: float = 0.1,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pool [n, d], labeled [m, d]) float16; see the module docstring."""
    rng = np.random.default_rng(seed)
    g = _unit(rng.standard_normal(d))  # the direction every embedding shares
    sup = _unit(rng.standard_normal((max(1, categories // 20), d)))
    cat = _unit(np.sqrt(0.4) * sup[rng.integers(0, len(sup), categories)]
                + np.sqrt(0.6) * _unit(rng.standard_normal((categories, d))))
    mode_cat = np.repeat(np.arange(categories), modes)
    mode_dir = _unit(rng.standard_normal((categories * modes, d)))
    spread = rng.uniform(0.5, 1.5, categories)  # per-category tightness
    p = rng.lognormal(0, 1, categories)[mode_cat] * rng.lognormal(0, 1, len(mode_cat))
    p /= p.sum()
    known = (rng.random(categories) >= novel)[mode_cat]
    pk = p * known / (p * known).sum()

    def draw(count: int, probs: np.ndarray) -> np.ndarray:
        out = np.empty((count, d), np.float16)
        modes_drawn = rng.choice(len(probs), count, p=probs)
        for s in range(0, count, 65536):
            md = modes_drawn[s:s + 65536]
            k = mode_cat[md]
            sp = spread[k][:, None]
            noise = rng.standard_normal((len(md), d), dtype=np.float32) / np.sqrt(d)
            x = (np.sqrt(0.2) * g + np.sqrt(0.6) * cat[k] + np.sqrt(0.12 * sp) * mode_dir[md]
                 + np.sqrt(0.06 * sp) * noise)
            out[s:s + len(md)] = _unit(x)
        return out

    return draw(n, p), draw(m, pk)


def make_uniform(n: int, m: int, d: int = D, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)

    def draw(count):
        out = np.empty((count, d), np.float16)
        for s in range(0, count, 65536):
            out[s:s + 65536] = _unit(rng.standard_normal((min(65536, count - s), d), dtype=np.float32))
        return out

    return draw(n), draw(m)


def data(kind: str, n: int, m: int) -> tuple[Path, Path]:
    """Paths of the cached pool and labeled .npy files."""
    WORK.mkdir(parents=True, exist_ok=True)
    pool_f, lab_f = WORK / f"{kind}_{n}_{m}_pool.npy", WORK / f"{kind}_{n}_{m}_lab.npy"
    if not pool_f.exists():
        pool, lab = (make_clustered if kind == "clustered" else make_uniform)(n, m)
        np.save(lab_f, lab)
        np.save(pool_f, pool)
    return pool_f, lab_f


# ----------------------------------------------------------------------------- workers
# Each method runs in a fresh interpreter so that its peak RSS is its own.

def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(spec: dict) -> dict:
    import gc

    import faiss  # noqa: F401  (imported before the baseline, as the CLI would have)
    import torch  # noqa: F401

    from novelty.kcenter import KCenterCfg, kcenter_greedy, kcenter_plain
    from novelty.scores import NearestCfg, covering_radius, nearest_labeled, nearest_recall

    pool = np.load(spec["pool"])
    lab = np.load(spec["lab"])
    gc.collect()
    base = _rss_mb()
    out: dict = {}
    t0 = time.perf_counter()
    what, B = spec["what"], spec["budget"]
    if what == "fast":
        r = kcenter_greedy(pool, lab, B, cfg=KCenterCfg(device="cpu"))
        out.update(radius=float(r.radius_trace[-1]), stats=r.stats)
        np.save(spec["picks_out"], r.picks)
    elif what == "plain":
        r = kcenter_plain(pool, lab, B)
        out.update(radius=float(r.radius_trace[-1]), stats=r.stats, trace=r.radius_trace.tolist())
        np.save(spec["picks_out"], r.picks)
    elif what == "fast-approx":
        near = nearest_labeled(pool, lab, cfg=NearestCfg(approximate=True))
        t1 = time.perf_counter()
        r = kcenter_greedy(pool, lab, B, cfg=KCenterCfg(device="cpu"), nearest=near)
        out.update(radius=float(r.radius_trace[-1]), first_pass_s=t1 - t0,
                   radius_before=float(r.radius_before), stats=r.stats)
        np.save(spec["picks_out"], r.picks)
    elif what == "nearest-exact":
        near = nearest_labeled(pool, lab)
        out.update(radius_before=float(near.dist.max()))
    elif what == "recall":
        out.update(nearest_recall(pool, lab, NearestCfg(approximate=True), sample=spec.get("sample", 10000)))
    elif what == "cover":
        out.update(radius=covering_radius(pool, lab, np.load(spec["picks_in"])))
    out["seconds"] = time.perf_counter() - t0
    out["load"] = os.getloadavg()[0]
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["base_mb"] = base
    out["vectors_mb"] = (pool.nbytes + lab.nbytes) / 2**20
    return out


THREADS: dict = {}  # environment for the workers (--threads)


def spawn(**spec) -> dict:
    """Run worker(spec) in a fresh interpreter; -> its result."""
    env = {**os.environ, **THREADS, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec, default=str)],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"worker {spec['what']} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- cases

SIZES = {  # name: (kind, n, m, budget), full and --quick
    "clustered-200k": (("clustered", 200_000, 20_000, 2000), ("clustered", 20_000, 2_000, 200)),
    "uniform-200k": (("uniform", 200_000, 20_000, 2000), ("uniform", 20_000, 2_000, 200)),
    "clustered-1m": (("clustered", 1_000_000, 20_000, 5000), ("clustered", 100_000, 5_000, 500)),
    "first-pass-ivf": (("clustered", 200_000, 20_000, 2000), ("clustered", 20_000, 2_000, 200)),
}


def run_case(name: str, quick: bool, plain_picks: int) -> dict:
    kind, n, m, B = SIZES[name][1 if quick else 0]
    pool_f, lab_f = data(kind, n, m)
    common = dict(pool=str(pool_f), lab=str(lab_f), budget=B)
    row = {"case": name, "n": n, "m": m, "budget": B}
    out = lambda tag: str(WORK / f"picks_{name}_{tag}{'_q' if quick else ''}.npy")
    if name == "first-pass-ivf":
        ex = spawn(what="nearest-exact", **common)
        fa = spawn(what="fast", picks_out=out("fast"), **common)
        ap = spawn(what="fast-approx", picks_out=out("approx"), **common)
        rc = spawn(what="recall", **common)
        row.update(time_fast=ap["first_pass_s"], time_plain=ex["seconds"], radius_fast=ap["radius"],
                   radius_plain=fa["radius"], peak_mb=ap["peak_mb"], alg_mb=ap["peak_mb"] - ap["base_mb"],
                   load_fast=ap["load"], load_plain=ex["load"],
                   note=(f"time fast = IVF first pass (nlist ~4 sqrt(m), nprobe 16), time plain = exact pruned "
                         f"first pass; recall@1 {rc['recall']:.4f} on {rc['sample']} rows; radius before "
                         f"{ap['radius_before']:.5f} (IVF) vs {ex['radius_before']:.5f} (exact); radius fast/plain = "
                         f"after {B} picks of the greedy seeded with the IVF / the exact first pass"))
        return _finish(row)
    fa = spawn(what="fast", picks_out=out("fast"), **common)
    extrapolate = name == "clustered-1m" and not quick
    pl = spawn(what="plain", picks_out=out("plain"), **{**common, "budget": plain_picks if extrapolate else B})
    row.update(time_fast=fa["seconds"], radius_fast=fa["radius"], peak_mb=fa["peak_mb"],
               load_fast=fa["load"], load_plain=pl["load"],
               alg_mb=fa["peak_mb"] - fa["base_mb"], vectors_mb=fa["vectors_mb"],
               fast_first_pass_s=fa["stats"]["first_pass_s"], fast_loop_s=fa["stats"]["loop_s"],
               fast_method=fa["stats"]["method"] + (f" (plain from pick {fa['stats']['fell_back_at']})"
                                                    if "fell_back_at" in fa["stats"] else ""),
               plain_first_pass_s=pl["stats"]["first_pass_s"], plain_loop_s=pl["stats"]["loop_s"])
    fast_picks, plain_picks_arr = np.load(out("fast")), np.load(out("plain"))
    k = len(plain_picks_arr)
    same = int(np.argmax(fast_picks[:k] != plain_picks_arr)) if (fast_picks[:k] != plain_picks_arr).any() else k
    if extrapolate:
        per_pick = pl["stats"]["loop_s"] / plain_picks
        row["time_plain"] = pl["stats"]["first_pass_s"] + per_pick * B
        cover = spawn(what="cover", picks_in=out("fast"), **common)
        row["radius_plain"] = cover["radius"]
        row["note"] = (f"plain: first pass measured, loop extrapolated from {plain_picks} picks "
                       f"({per_pick * 1e3:.0f} ms/pick); radius plain = covering radius of the fast picks "
                       f"recomputed from scratch; picks equal plain's for the first {same} of {k}")
    else:
        row["time_plain"] = pl["seconds"]
        row["radius_plain"] = pl["radius"]
        row["note"] = f"picks equal plain's for the first {same} of {B}"
    return _finish(row)


def _finish(row: dict) -> dict:
    row["speedup"] = row["time_plain"] / row["time_fast"]
    row["rel_diff"] = abs(row["radius_fast"] - row["radius_plain"]) / max(abs(row["radius_plain"]), 1e-12)
    return row


COLUMNS = [("case", "{}"), ("n", "{:,}"), ("m", "{:,}"), ("budget", "{:,}"), ("time_fast", "{:.1f}s"),
           ("time_plain", "{:.1f}s"), ("speedup", "{:.1f}x"), ("radius_fast", "{:.5f}"),
           ("radius_plain", "{:.5f}"), ("rel_diff", "{:.1e}"), ("peak_mb", "{:,.0f} MB"), ("alg_mb", "{:,.0f} MB")]


def table(rows: list[dict]) -> str:
    head = [c for c, _ in COLUMNS]
    body = [[f.format(r[c]) if c in r else "-" for c, f in COLUMNS] for r in rows]
    w = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = [" | ".join(h.ljust(w[i]) for i, h in enumerate(head)), "-+-".join("-" * x for x in w)]
    lines += [" | ".join(b[i].ljust(w[i]) for i in range(len(head))) for b in body]
    for r in rows:
        extra = {k: v for k, v in r.items() if k not in dict(COLUMNS) and k != "note"}
        lines.append(f"{r['case']}: {r.get('note', '')}; " + ", ".join(
            f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--case", action="append", choices=list(SIZES), help="run only this case (repeatable)")
    ap.add_argument("--plain-picks", type=int, default=300, help="plain-loop picks measured at 1M")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--threads", type=int, help="threads for numpy's BLAS and torch (default: theirs)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    if a.threads:
        THREADS.update(OMP_NUM_THREADS=str(a.threads), OPENBLAS_NUM_THREADS=str(a.threads),
                       MKL_NUM_THREADS=str(a.threads))
    rows = []
    for name in a.case or list(SIZES):
        t = time.perf_counter()
        rows.append(run_case(name, a.quick, a.plain_picks))
        print(f"[{name}: {time.perf_counter() - t:.0f}s, load average {os.getloadavg()[0]:.1f}]", file=sys.stderr)
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
