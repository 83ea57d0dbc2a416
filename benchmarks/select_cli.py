"""`novelty select` end to end through the CLI, against the plain loop on the same vectors.

    python benchmarks/select_cli.py --case clustered-200k    # 200k pool, 20k labeled, budget 2,000
    python benchmarks/select_cli.py --case clustered-1m      # 1M pool, 20k labeled, budget 5,000
    python benchmarks/select_cli.py --case uniform-200k

The vectors are select_scale.py's (cached under benchmarks/_work/select/). They enter
an index through `novelty import-embeddings` (not timed), then `novelty select` runs as
a user runs it, in its own process: it reads the catalog and the float16 shards, runs
the exact nearest-labeled pass and k-center greedy, writes the CSV and Label Studio
file and records the run. Its wall time and peak RSS are measured from outside.
The plain loop (kcenter_plain: chunked float32 matmul for the first pass, then one
matrix-vector product over the pool per pick) runs in another process on the same
vectors; at 1M it is extrapolated from its first --plain-picks picks.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from select_scale import data  # noqa: E402

WORK = Path(__file__).parent / "_work" / "select_cli"
CASES = {
    "clustered-200k": ("clustered", 200_000, 20_000, 2_000),
    "clustered-1m": ("clustered", 1_000_000, 20_000, 5_000),
    "uniform-200k": ("uniform", 200_000, 20_000, 2_000),
}


def novelty(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "novelty.cli", *args], capture_output=True, text=True, check=True)


def make_index(kind: str, n: int, m: int) -> Path:
    pool_f, lab_f = data(kind, n, m)
    idx = WORK / f"{kind}_{n}_{m}"
    if (idx / "catalog.sqlite").exists():
        return idx
    shutil.rmtree(idx, ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)
    for split, f, count, prefix in (("labeled", lab_f, m, "l"), ("unlabeled", pool_f, n, "u")):
        ids = WORK / f"{prefix}_{count}.txt"
        ids.write_text("".join(f"{prefix}{i}\n" for i in range(count)))
        novelty("import-embeddings", str(f), "--ids", str(ids), "--split", split, "--index", str(idx))
    return idx


def timed_select(idx: Path, budget: int, device: str) -> dict:
    """One `novelty select` process: its wall time, its own peak RSS (os.wait4 reports the
    child's rusage alone, unlike RUSAGE_CHILDREN, which keeps the largest child so far),
    and the run's summary as recorded in the catalog (full-precision radii)."""
    out = WORK / "selection.csv"
    log = tempfile.TemporaryFile()
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "novelty.cli", "select", "--budget", str(budget), "--index", str(idx),
                             "--out", str(out), "--device", device], stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)  # (Popen.wait would reap it without the rusage)
    wall = time.perf_counter() - t
    log.seek(0)
    stdout = log.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"novelty select failed ({proc.returncode}):\n{stdout}")
    with closing(sqlite3.connect(idx / "catalog.sqlite")) as db:
        (summary,) = db.execute("SELECT summary FROM runs WHERE kind='select' ORDER BY id DESC LIMIT 1").fetchone()
    summary = json.loads(summary)
    with open(out) as f:
        picks = [row["id"] for row in csv.DictReader(f)]
    return {"wall": wall, "rss_mb": usage.ru_maxrss / 1024, "radius": summary["covering_radius_after"],
            "seconds": summary["seconds"], "picks": picks, "output": stdout}


def plain(kind: str, n: int, m: int, budget: int, plain_picks: int) -> dict:
    pool_f, lab_f = data(kind, n, m)
    code = f"""
import json, time, numpy as np
from novelty.kcenter import kcenter_plain
pool = np.load({str(pool_f)!r}); lab = np.load({str(lab_f)!r})
b = min({budget}, {plain_picks})
t = time.perf_counter(); r = kcenter_plain(pool, lab, b); dt = time.perf_counter() - t
print(json.dumps({{"seconds": dt, "picks": b, "first_pass": r.stats.get("first_pass_s"), "radius": float(r.radius_trace[-1]),
                   "ids": ["u%d" % i for i in r.picks.tolist()]}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=list(CASES), default="clustered-200k")
    p.add_argument("--device", default="auto")
    p.add_argument("--plain-picks", type=int, default=0, help="picks of the plain loop to time (0: the whole budget)")
    args = p.parse_args()
    kind, n, m, budget = CASES[args.case]
    idx = make_index(kind, n, m)
    sel = timed_select(idx, budget, args.device)
    pl = plain(kind, n, m, budget, args.plain_picks or budget)
    fp = pl.get("first_pass") or 0.0
    if pl["picks"] < budget:  # extrapolate the greedy part linearly in picks
        plain_total = fp + (pl["seconds"] - fp) * budget / pl["picks"]
        note = f"extrapolated from {pl['picks']} picks"
        same = sel["picks"][: pl["picks"]] == pl["ids"]
    else:
        plain_total, note, same = pl["seconds"], "measured", sel["picks"] == pl["ids"]
    first = next((i for i, (a, b) in enumerate(zip(sel["picks"], pl["ids"])) if a != b), None)
    sec = sel["seconds"]
    print(f"case {args.case}: pool {n:,} x 512, labeled {m:,}, budget {budget:,}, {os.cpu_count()} cores")
    print("| run | seconds | first pass s | greedy s | peak RSS MB | covering radius |\n|---|---|---|---|---|---|")
    print(f"| `novelty select` (CLI process, whole run) | {sel['wall']:.1f} | {sec['first_pass']:.1f} | {sec['select']:.1f} "
          f"| {sel['rss_mb']:.0f} | {sel['radius']:.6f} |")
    rad = f"{pl['radius']:.6f}" if pl["picks"] == budget else "-"
    print(f"| plain loop (kernel only, {note}) | {plain_total:.1f} | {fp:.1f} | {plain_total - fp:.1f} | - | {rad} |")
    rel = abs(sel["radius"] - pl["radius"]) / pl["radius"] if pl["picks"] == budget else float("nan")
    print(f"speed-up {plain_total / sel['wall']:.1f}x; same picks as the plain loop: {same}"
          f"{'' if first is None else f' (first difference at pick {first + 1})'}; radius relative difference {rel:.1e}; "
          f"float16 vectors {n * 512 * 2 / 2**20:.0f} MB, + 1 GB = {n * 512 * 2 / 2**20 + 1024:.0f} MB")
    print(sel["output"])


if __name__ == "__main__":
    main()
