"""Which MC-dropout image score tracks the round-0 segmenter's errors?

    python benchmarks/active_learning.py --diagnose      # on the cached round-0 models

For each seed's round-0 model (trained on the seed's 2 domains) and its pool: T passes
with only the dropout layers sampling (as `novelty uncertainty` does), per-pixel
predictive entropy and BALD (novelty.uncertainty.segmentation.pixel_maps), then several
image scores. Against the per-image error (1 - mean foreground IoU of the mean
prediction): Spearman rank correlation; the mean error of the top-N scored images
(N = one full run's labels, 750) against the pool's; the share of those N in the
domains the seed never covered; and the AUROC for telling those domains apart.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SCORES = {  # name -> (pixel map, top percent); 'novelty uncertainty --top-percent' picks the percent
    "BALD, top 5 % of pixels (novelty's default)": ("bald", 5.0),
    "BALD, top 1 %": ("bald", 1.0),
    "BALD, top 25 %": ("bald", 25.0),
    "BALD, all pixels (--top-percent 100)": ("bald", 100.0),
    "entropy, top 5 %": ("entropy", 5.0),
    "entropy, all pixels": ("entropy", 100.0),
}


def mc_probs(model, images: np.ndarray, passes: int, seed: int = 0, batch: int = 500):
    """[T, n, C, S, S] softmax maps from novelty's own MC-dropout sampler (the masks
    `novelty uncertainty --seed` draws)."""
    import torch

    from _al_model import to_tensor

    from novelty.uncertainty.mc import MCDropout
    from novelty.uncertainty.segmentation import probs_from_logits

    out = []
    with torch.inference_mode(), MCDropout(model, seed) as mc:
        for s in range(0, len(images), batch):
            x = to_tensor(images[s:s + batch]).contiguous(memory_format=torch.channels_last)
            logits = mc.sample(x, passes)  # [T*b, C, S, S], pass-major
            out.append(probs_from_logits(logits.reshape(passes, len(x), *logits.shape[1:]), class_axis=2))
    return torch.cat(out, 1)


def diagnose(work: Path, passes: int, top_n: int = 750) -> str:
    from _al_model import image_errors, load
    from active_learning import _auroc, _spearman

    from novelty.uncertainty.segmentation import pixel_maps, top_percent_mean

    rows: dict[str, list] = {k: [] for k in SCORES}
    novel_share = []
    seeds = sorted(int(p.parent.name[4:]) for p in work.glob("seed*/model_r0.pt"))
    if not seeds:
        return f"no cached round-0 model under {work}; run the benchmark first"
    for seed in seeds:
        z = np.load(work / f"seed{seed}" / "data.npz")
        X, M, dom = z["pool_images"], z["pool_masks"], z["pool_domain"]
        P = mc_probs(load(work / f"seed{seed}" / "model_r0.pt"), X, passes)
        pred = P.mean(0).argmax(1).numpy()
        err = image_errors(pred, M)
        novel = ~np.isin(dom, (0, 1))
        novel_share.append(novel.mean())
        ent, mi = pixel_maps(P)  # [n, S, S] each
        maps = {"bald": mi, "entropy": ent}
        for name, (which, pct) in SCORES.items():
            u = top_percent_mean(maps[which], pct).double().numpy()
            top = np.lexsort((np.arange(len(u)), -u))[:top_n]
            rows[name].append((_spearman(u, err), err[top].mean() - err.mean(), novel[top].mean(), _auroc(u, novel)))
        del P, ent, mi, maps
    out = [f"Round-0 segmenter, T = {passes} passes, pool of {len(err)}, seeds {', '.join(map(str, seeds))}: "
           f"mean ± sd over seeds. Top {top_n}: the images a pure uncertainty ranking would label first "
           f"(the pool's share in unseen domains is {np.mean(novel_share):.0%}).", "",
           f"| image score | Spearman with per-image error | top {top_n}: mean error − pool's | top {top_n}: share in unseen domains | AUROC unseen domain |",
           "|---|---|---|---|---|"]
    for name, v in rows.items():
        a = np.array(v)
        out.append(f"| {name} | " + " | ".join(f"{a[:, i].mean():+.2f} ± {a[:, i].std(ddof=1) if len(a) > 1 else 0:.2f}"
                                                 if i < 2 else f"{a[:, i].mean():.2f} ± {a[:, i].std(ddof=1) if len(a) > 1 else 0:.2f}"
                                                 for i in range(4)) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here.parent), str(here)]
    print(diagnose(Path(sys.argv[1]), int(json.loads((Path(sys.argv[1]) / "cfg.json").read_text())["passes"])))
