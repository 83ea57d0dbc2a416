"""Tables, label savings, the markdown section and the PIL plot of the active-learning
benchmark (numpy and PIL only: matplotlib is not a dependency)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from _al_data import DOMAINS, SEED_DOMAINS

BEGIN, END = "<!-- active_learning.py: begin -->", "<!-- active_learning.py: end -->"
COLORS = {"random": (120, 120, 120), "novelty": (230, 150, 30), "kcenter": (40, 110, 200),
          "uncertainty": (150, 70, 180), "hybrid": (210, 40, 40), "hybrid-rank": (20, 160, 120),
          "hybrid-top": (30, 30, 30), "hybrid-floor": (200, 90, 160)}
SINGLE = ("novelty", "kcenter", "uncertainty")


def curves(rows: list[dict], strategies, seeds, rounds: int) -> dict[str, np.ndarray]:
    """strategy -> [seeds, rounds + 1] mIoU."""
    out = {}
    for st in strategies:
        M = np.full((len(seeds), rounds + 1), np.nan)
        for r in rows:
            if r["strategy"] == st:
                M[list(seeds).index(r["seed"]), r["round"]] = r["miou"]
        out[st] = M
    return out


def labels_to_reach(labels: np.ndarray, curve: np.ndarray, target: float) -> float | None:
    """The first number of labels at which the curve reaches target, linearly interpolated; None if never."""
    for k in range(len(curve)):
        if curve[k] >= target:
            if k == 0:
                return float(labels[0])
            a, b = curve[k - 1], curve[k]
            return float(labels[k - 1] + (labels[k] - labels[k - 1]) * (target - a) / (b - a))
    return None


def _seed_scenes(cfg) -> str:
    """The seed's redundancy, in the setting line; nothing for the default (drawn like the pool)."""
    c = cfg.data.seed_copies
    return "" if c is None else (", all distinct scenes" if c <= 1 else f", near-copies mean {c:g}")


def _pm(m: float, s: float) -> str:
    return f"{m:.3f} ± {s:.3f}"


def _sd(x: np.ndarray, axis=0):
    return np.std(x, axis=axis, ddof=1) if x.shape[axis] > 1 else np.zeros(np.delete(x.shape, axis))


def summarise(cfg, rows: list[dict]) -> dict:
    seeds, sts, R = list(cfg.seeds), list(cfg.strategies), cfg.rounds
    labels = cfg.data.n_seed + cfg.budget * np.arange(R + 1)
    C = curves(rows, sts, seeds, R)
    s = {"labels": labels, "curves": C, "mean": {k: v.mean(0) for k, v in C.items()}, "sd": {k: _sd(v) for k, v in C.items()}}
    if "random" not in C:
        return s
    target = float(s["mean"]["random"][-1])
    s["target"] = target
    need = {k: labels_to_reach(labels, s["mean"][k], target) for k in sts}
    per_seed = {k: [labels_to_reach(labels, C[k][i], C["random"][i, -1]) for i in range(len(seeds))] for k in sts}
    s["need"], s["need_per_seed"] = need, per_seed
    aulc = {k: C[k][:, 1:].mean(1) for k in sts}  # [seeds] mean mIoU over rounds 1..R
    s["aulc"] = aulc
    if "hybrid" in C:
        s["paired"] = {k: {"final": C["hybrid"][:, -1] - C[k][:, -1], "aulc": aulc["hybrid"] - aulc[k]} for k in sts if k != "hybrid"}
    return s


def picks_table(cfg, rows: list[dict]) -> list[str]:
    lines = ["| strategy | picks in the seed's domains | distinct near-copy clusters per 100 picks | " +
             " | ".join(f"d{d}" for d in range(len(DOMAINS))) + " |",
             "|---|---|---|" + "---|" * len(DOMAINS)]
    for st in cfg.strategies:
        rr = [r for r in rows if r["strategy"] == st and r["round"] > 0]
        if not rr:
            continue
        by = np.sum([r["picked_by_domain"] for r in rr], axis=0)
        share = by / by.sum()
        clusters = 100 * np.sum([r["picked_clusters"] for r in rr]) / by.sum()
        lines.append(f"| {st} | {100 * share[list(SEED_DOMAINS)].sum():.0f}% | {clusters:.0f} | "
                     + " | ".join(f"{100 * v:.0f}%" for v in share) + " |")
    return lines


def markdown(cfg, infos: list[dict], rows: list[dict], seconds: float, command: str, png: Path | None,
             jobs: int = 1) -> tuple[str, dict]:
    s = summarise(cfg, rows)
    L, sts = s["labels"], list(cfg.strategies)
    cpu = sum(i.get("cpu_seconds", 0.0) for i in infos) + sum(r.get("cpu_seconds", 0.0) for r in rows)
    cached = seconds < 0.05 * cpu / max(jobs, 1)  # nothing (or almost nothing) was recomputed
    wall = (f"regenerated from the cached rounds in {seconds:.0f} s" if cached else
            f"wall time {seconds / 60:.1f} min in {jobs} process{'es' * (jobs > 1)} (one torch thread each)")
    out = [f"Command: `{command}`  ", f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()}, "
           f"CPU only; {wall}; the rounds took {cpu / 60:.1f} CPU-minutes in all, i.e. "
           f"{cpu / 60 / max(1, os.cpu_count() or 1):.1f} min on {os.cpu_count()} idle cores.",
           "", f"Setting: 32 px images, 2 classes with masks, 8 domains; seed {cfg.data.n_seed} labels (domains "
           f"{', '.join(map(str, SEED_DOMAINS))} only{_seed_scenes(cfg)}), pool {cfg.data.n_pool} (all domains, clusters of near-copies, "
           f"mean {cfg.data.mean_copies:g}), test {cfg.data.n_test} (all domains equally); {cfg.rounds} rounds of "
           f"{cfg.budget}; U-Net retrained from scratch for {cfg.steps} steps each round; T = {cfg.passes} MC-dropout "
           f"passes; training and passes in {cfg.precision}; hybrid with --uncertainty-weight {cfg.beta:g}; seeds {', '.join(map(str, cfg.seeds))}.", "",
           "Test mIoU (foreground classes), mean ± sd over seeds, against the number of labels:", "",
           "| strategy | " + " | ".join(str(int(x)) for x in L) + " |", "|---|" + "---|" * len(L)]
    for st in sts:
        out.append(f"| {st}{' (default)' if st == 'hybrid' else ''} | "
                   + " | ".join(_pm(m, d) for m, d in zip(s["mean"][st], s["sd"][st])) + " |")
    if png is not None:
        out += ["", f"![mIoU against labels]({png.name})"]
    if "target" in s:
        added = L[-1] - L[0]
        out += ["", f"Labels to reach random's final score ({s['target']:.3f} at {int(L[-1])} labels, {int(added)} added): "
                    "interpolated on the mean curve, and per seed (against that seed's random run).", "",
                "| strategy | labels added (mean curve) | share of random's | per seed | mean mIoU over rounds 1-" + f"{cfg.rounds} |",
                "|---|---|---|---|---|"]
        for st in sts:
            n = s["need"][st]
            txt = "not reached" if n is None else f"{n - L[0]:.0f}"
            share = "-" if n is None else f"{100 * (n - L[0]) / added:.0f}%"
            ps = ", ".join("n/r" if v is None else f"{v - L[0]:.0f}" for v in s["need_per_seed"][st])
            out.append(f"| {st} | {txt} | {share} | {ps} | {_pm(s['aulc'][st].mean(), _sd(s['aulc'][st][:, None], 0)[0] if len(cfg.seeds) > 1 else 0.0)} |")
    if "paired" in s:
        out += ["", "Hybrid minus each other strategy, paired by seed (mean ± sd over seeds; wins = seeds where hybrid is higher):", "",
                "| vs | final mIoU | wins | mean mIoU over rounds | wins |", "|---|---|---|---|---|"]
        for st, d in s["paired"].items():
            out.append(f"| {st} | {_pm(d['final'].mean(), _sd(d['final'][:, None])[0])} | {int((d['final'] > 0).sum())}/{len(d['final'])} "
                       f"| {_pm(d['aulc'].mean(), _sd(d['aulc'][:, None])[0])} | {int((d['aulc'] > 0).sum())}/{len(d['aulc'])} |")
    out += ["", "What each strategy picked (all rounds and seeds): share in the seed's domains, and how many distinct "
            "base scenes per 100 picks (100 = no two picks are near-copies of each other); then the share per domain "
            "(" + "; ".join(f"d{i} {b}/{li}/{sc}" for i, (b, li, sc) in enumerate(DOMAINS)) + "):", ""]
    out += picks_table(cfg, rows)
    out += ["", "Final test mIoU per domain (mean over seeds):", "",
            "| strategy | " + " | ".join(f"d{d}" for d in range(len(DOMAINS))) + " |", "|---|" + "---|" * len(DOMAINS)]
    r0 = np.mean([i["round0"]["by_domain"] for i in infos], axis=0)
    out.append("| round 0 (seed only) | " + " | ".join(f"{v:.2f}" for v in r0) + " |")
    for st in sts:
        fin = [r["by_domain"] for r in rows if r["strategy"] == st and r["round"] == cfg.rounds]
        out.append(f"| {st} | " + " | ".join(f"{v:.2f}" for v in np.mean(fin, axis=0)) + " |")
    an = [i.get("analysis", {}) for i in infos]
    if an and all(an):
        def avg(k):
            v = [a[k] for a in an if k in a]
            return f"{np.mean(v):.2f}" if v else "-"
        out += ["", "Diagnostics at round 0 (mean over seeds): in the build-index embedding (the random-weight ViT), "
                f"{avg('knn10_same_domain')} of each pool image's 10 nearest neighbours share its domain and "
                f"{avg('nn1_same_cluster')} of nearest neighbours are a near-copy of it. The round-0 model's uncertainty "
                f"has Spearman {avg('u_spearman_error')} with its per-image error (1 - IoU) and AUROC "
                f"{avg('u_auroc_novel_domain')} for telling a novel-domain image from a seed-domain one (mean score "
                f"{avg('u_mean_seed_domains')} in the seed's domains, {avg('u_mean_novel_domains')} in the others)."]
    rr = [r for r in rows if r["round"] > 0]
    if rr:
        out += ["", f"Time per round (mean): {np.mean([r['seconds'] for r in rr]):.1f}s, of which "
                    f"{np.mean([r['select_seconds'] for r in rr]):.1f}s uncertainty + select + mark-labeled."]
    return "\n".join(out), s


def write_section(md: Path, body: str) -> None:
    """Replace the generated block of md (between the markers), keep the rest."""
    block = f"{BEGIN}\n{body}\n{END}"
    text = md.read_text() if md.exists() else "## Active learning\n\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    md.parent.mkdir(parents=True, exist_ok=True)
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, md)


def plot(s: dict, path: Path, title: str) -> None:
    """mIoU against labels: mean line per strategy and a ±sd band; random's final score dashed."""
    from PIL import Image, ImageDraw, ImageFont

    W, H, l, r, t, b = 960, 600, 84, 190, 50, 60
    img = Image.new("RGBA", (W, H), "white")
    font = ImageFont.load_default(size=15)
    small = ImageFont.load_default(size=13)
    L = s["labels"].astype(float)
    lo = min(float(np.nanmin(s["mean"][k] - s["sd"][k])) for k in s["mean"])
    hi = max(float(np.nanmax(s["mean"][k] + s["sd"][k])) for k in s["mean"])
    lo, hi = max(0.0, np.floor(lo * 20) / 20), min(1.0, np.ceil(hi * 20) / 20 + 1e-9)
    if hi - lo < 0.05:
        hi = lo + 0.05

    def X(v):
        return l + (v - L[0]) / max(L[-1] - L[0], 1) * (W - l - r)

    def Y(v):
        return H - b - (v - lo) / (hi - lo) * (H - t - b)

    d = ImageDraw.Draw(img)
    for v in np.arange(lo, hi + 1e-9, 0.05):
        d.line([(l, Y(v)), (W - r, Y(v))], fill=(225, 225, 225))
        d.text((l - 8, Y(v)), f"{v:.2f}", fill="black", font=small, anchor="rm")
    for x in L:
        d.line([(X(x), t), (X(x), H - b)], fill=(240, 240, 240))
        d.text((X(x), H - b + 8), str(int(x)), fill="black", font=small, anchor="mt")
    d.rectangle([l, t, W - r, H - b], outline="black")
    d.text(((l + W - r) / 2, H - 22), "labeled images (seed + picks)", fill="black", font=font, anchor="mm")
    label = Image.new("RGBA", (120, 24), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((60, 12), "test mIoU", fill="black", font=font, anchor="mm")
    label = label.rotate(90, expand=True)
    img.alpha_composite(label, (8, int((t + H - b) / 2 - label.height / 2)))
    d.text((W / 2, 22), title, fill="black", font=font, anchor="mm")
    for k, m in s["mean"].items():  # bands first, lines on top
        band = Image.new("RGBA", img.size, (0, 0, 0, 0))
        pts = [(X(x), Y(v)) for x, v in zip(L, m + s["sd"][k])] + [(X(x), Y(v)) for x, v in zip(L[::-1], (m - s["sd"][k])[::-1])]
        ImageDraw.Draw(band).polygon(pts, fill=(*COLORS.get(k, (0, 0, 0)), 40))
        img = Image.alpha_composite(img, band)
    d = ImageDraw.Draw(img)
    if "target" in s:
        y = Y(s["target"])
        for x0 in np.arange(l, W - r, 12):
            d.line([(x0, y), (min(x0 + 6, W - r), y)], fill=COLORS["random"], width=1)
    for k, m in s["mean"].items():
        c = COLORS.get(k, (0, 0, 0))
        pts = [(X(x), Y(v)) for x, v in zip(L, m)]
        d.line(pts, fill=c, width=4 if k == "hybrid" else 2)
        for p in pts:
            d.ellipse([p[0] - 4, p[1] - 4, p[0] + 4, p[1] + 4], fill=c)
    for i, k in enumerate(s["mean"]):
        y = t + 14 + 24 * i
        d.line([(W - r + 16, y), (W - r + 46, y)], fill=COLORS.get(k, (0, 0, 0)), width=4 if k == "hybrid" else 2)
        d.text((W - r + 54, y), k + (" (default)" if k == "hybrid" else ""), fill="black", font=font, anchor="lm")
    if "target" in s:
        y = t + 14 + 24 * len(s["mean"])
        d.text((W - r + 16, y + 6), "- - random's final", fill=COLORS["random"], font=small, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    img.convert("RGB").save(tmp)
    os.replace(tmp, path)


def report(cfg, infos, rows, seconds, command, md: Path, png: Path, jobs: int = 1) -> dict:
    body, s = markdown(cfg, infos, rows, seconds, command, png, jobs)
    n = len(cfg.seeds)
    plot(s, png, f"Active learning on synthetic segmentation: mean ± sd over {n} seed{'s' * (n > 1)}")
    write_section(md, body)
    return {"text": body, "summary": s, "md": md, "png": png}


def compare(work: Path, base: str = "random") -> str:
    """Every cached result in a work dir: strategy x embedding (and beta, top-percent),
    each over the seeds it has, against `base` (a cached run's tag, e.g. random or
    kcenter_model) paired by seed. -> a markdown table."""
    import json

    runs: dict[str, dict[int, list[dict]]] = {}
    for f in sorted(work.glob("seed*/rows_*.json")):
        seed = int(f.parent.name[4:])
        runs.setdefault(f.stem[5:], {})[seed] = json.loads(f.read_text())
    if base not in runs:
        return f"no cached {base} run to compare with; cached: {', '.join(sorted(runs))}"

    def per_seed(tag, seeds):
        fin = np.array([runs[tag][s][-1]["miou"] for s in seeds])
        mean = np.array([np.mean([r["miou"] for r in runs[tag][s][1:]]) for s in seeds])
        return fin, mean

    def sd(x):
        return f"{x.std(ddof=1):.3f}" if len(x) > 1 else "-"

    out = [f"Every cached run in `{os.path.relpath(work)}`; `_model`: the segmenter's own features (`--embedding model`), else the "
           "random-weight ViT (`--embedding clip`); `_top100`: uncertainty from the mean BALD of all pixels (`--top-percent 100`), "
           f"else of the top 5 %; random and uncertainty do not use vectors. Each row over the seeds it has; differences "
           f"against {base} paired by seed (mean ± sd over seeds) and wins.", "",
           f"| strategy | seeds | final mIoU | mean mIoU over rounds | final − {base} | wins | mean over rounds − {base} | wins |",
           "|---|---|---|---|---|---|---|---|"]
    table = []
    for tag in runs:
        seeds = sorted(set(runs[tag]) & set(runs[base]))
        if not seeds:
            continue
        f, m = per_seed(tag, seeds)
        rf, rm = per_seed(base, seeds)
        table.append((-m.mean(), f"| {tag} | {','.join(map(str, seeds))} | {f.mean():.3f} ± {sd(f)} | {m.mean():.3f} ± {sd(m)} | "
                                 f"{(f - rf).mean():+.3f} ± {sd(f - rf)} | {int(((f - rf) > 0).sum())}/{len(seeds)} | "
                                 f"{(m - rm).mean():+.3f} ± {sd(m - rm)} | {int(((m - rm) > 0).sum())}/{len(seeds)} |"))
    return "\n".join(out + [row for _, row in sorted(table)])
