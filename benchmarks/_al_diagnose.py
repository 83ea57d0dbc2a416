"""Which MC-dropout image score tracks the round-0 segmenter's errors?

    python benchmarks/active_learning.py --diagnose      # on the cached round-0 models

For each seed's round-0 model (trained on the seed's 2 domains) and its pool: T passes
with only the dropout layers sampling (as `novelty uncertainty` does), per-pixel
predictive entropy and BALD (novelty.uncertainty.segmentation.pixel_maps), then several
image scores. Against the per-image error (1 - mean foreground IoU of the mean
prediction): Spearman rank correlation; the mean error of the top-N scored images
(N = one full run's labels, 750) against the pool's; the share of those N in the
domains the seed never covered; and the AUROC for telling those domains apart.
Then the default score of the same model with its passes in bf16 (`novelty uncertainty
--precision bf16`) against fp32: rank correlation, differences, and the passes' time.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

DEFAULT = "BALD, top 5 % of pixels (novelty's default)"
SCORES = {  # name -> (pixel map, top percent); 'novelty uncertainty --top-percent' picks the percent
    DEFAULT: ("bald", 5.0),
    "BALD, top 1 %": ("bald", 1.0),
    "BALD, top 25 %": ("bald", 25.0),
    "BALD, all pixels (--top-percent 100)": ("bald", 100.0),
    "entropy, top 5 %": ("entropy", 5.0),
    "entropy, all pixels": ("entropy", 100.0),
}


def mc_probs(model, images: np.ndarray, passes: int, seed: int = 0, batch: int = 500, precision: str = "fp32"):
    """[T, n, C, S, S] softmax maps from novelty's own MC-dropout sampler (the masks
    `novelty uncertainty --seed` draws), the passes under novelty's autocast for `precision`."""
    import torch

    from _al_model import to_tensor

    from novelty.uncertainty.mc import MCDropout
    from novelty.uncertainty.runner import autocast
    from novelty.uncertainty.segmentation import probs_from_logits

    out = []
    with torch.inference_mode(), MCDropout(model, seed) as mc:
        for s in range(0, len(images), batch):
            x = to_tensor(images[s:s + batch]).contiguous(memory_format=torch.channels_last)
            with autocast(precision, torch.device("cpu")):
                logits = mc.sample(x, passes)  # [T*b, C, S, S], pass-major
            out.append(probs_from_logits(logits.reshape(passes, len(x), *logits.shape[1:]), class_axis=2))
    return torch.cat(out, 1)


def diagnose(work: Path, passes: int, top_n: int = 750) -> str:
    import torch
    from _al_data import SEED_DOMAINS
    from _al_model import image_errors, load
    from active_learning import _auroc, _spearman

    from novelty.uncertainty.segmentation import pixel_maps, top_percent_mean

    rows: dict[str, list] = {k: [] for k in SCORES}
    novel_share, prec = [], []
    seeds = sorted(int(p.parent.name[4:]) for p in work.glob("seed*/model_r0.pt"))
    if not seeds:
        return f"no cached round-0 model under {work}; run the benchmark first"
    for seed in seeds:
        z = np.load(work / f"seed{seed}" / "data.npz")
        X, M, dom = z["pool_images"], z["pool_masks"], z["pool_domain"]
        model = load(work / f"seed{seed}" / "model_r0.pt")
        t0 = time.perf_counter()
        P = mc_probs(model, X, passes)
        t1 = time.perf_counter()
        pred = P.mean(0).argmax(1).numpy()
        err = image_errors(pred, M)
        novel = ~np.isin(dom, SEED_DOMAINS)
        novel_share.append(novel.mean())
        ent, mi = pixel_maps(P)  # [n, S, S] each
        maps = {"bald": mi, "entropy": ent}
        for name, (which, pct) in SCORES.items():
            u = top_percent_mean(maps[which], pct).double().numpy()
            if name == DEFAULT:
                u_default = u
            top = np.lexsort((np.arange(len(u)), -u))[:top_n]
            rows[name].append((_spearman(u, err), err[top].mean() - err.mean(), novel[top].mean(), _auroc(u, novel)))
        del P, ent, mi, maps
        t2 = time.perf_counter()
        P16 = mc_probs(model, X, passes, precision="bf16")
        t3 = time.perf_counter()
        u16 = top_percent_mean(pixel_maps(P16)[1], SCORES[DEFAULT][1]).double().numpy()
        d = np.abs(u16 - u_default)
        prec.append((_spearman(u16, u_default), d.max(), d.mean(), u_default.mean(), t1 - t0, t3 - t2))
        del P16
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
    a = np.array(prec)
    out += ["", f"The default score with the passes in bf16 against fp32 (the same model and masks), mean over seeds: "
                f"rank correlation {a[:, 0].mean():.4f} (lowest {a[:, 0].min():.4f}); largest difference "
                f"{a[:, 1].max():.4f} and mean difference {a[:, 2].mean():.4f}, on a mean score of {a[:, 3].mean():.3f}; "
                f"the passes took {a[:, 4].mean():.1f} s in fp32 and {a[:, 5].mean():.1f} s in bf16 "
                f"({a[:, 4].mean() / a[:, 5].mean():.1f}x; {torch.get_num_threads()} torch threads)."]
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here.parent), str(here)]
    print(diagnose(Path(sys.argv[1]), int(json.loads((Path(sys.argv[1]) / "cfg.json").read_text())["passes"])))
