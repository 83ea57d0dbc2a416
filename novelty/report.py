"""`novelty report`: one self-contained HTML page about a selection. Thumbnails are
embedded as small JPEG data URIs, plots are inline SVG drawn here; nothing is fetched
from the network and there is no script. Every id and path is HTML-escaped.

The page shows the index as it was when the selection was made: the pool is the
unlabeled images (less those `exclude` keeps out of selection) plus the selected ones,
the labeled set leaves the selected ones out (so a report still makes sense after
`mark-labeled`). The covering-radius curve is the one the run recorded while that pool
and labeled set count what the run's did; once images were excluded, added or labeled
since, it is computed on the pool shown, so every plot describes the same pool.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._files import atomic_write_text
from .config import ReaderCfg
from .errors import ConfigError, InputError
from .export import COLUMNS
from .inspect import knn_blocks, unit32
from .labeling import match_select_run, read_selection, selection_ids
from .store import Store, open_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportCfg:
    k: int = 3  # nearest labeled images shown per pick
    thumb: int = 128  # thumbnail size in pixels (longest side)
    sample: int = 20000  # pool and labeled images the histograms are drawn from, at most
    limit: int = 500  # picks shown as table rows (the plots use all of them); 0: every pick
    seed: int = 0


@dataclass
class ReportData:
    rows: list[dict]  # the selection file's rows (an image listed twice: its first row only)
    image: np.ndarray  # [B] catalog ids of the picks, in file order
    near_D: np.ndarray  # [B, max(k, 1)] cosine distance to the nearest labeled images
    near_I: np.ndarray  # [B, max(k, 1)] their catalog ids (-1 past the end)
    pool_novelty: np.ndarray  # [s] nearest-labeled distance over a sample of the pool
    labeled_novelty: np.ndarray  # [s] leave-one-out nearest-labeled distance over a sample of the labeled set
    radius: np.ndarray  # [B + 1] covering radius before any pick, then after each
    radius_source: str  # "run #N" or "computed"
    run: int | None
    counts: dict = field(default_factory=dict)
    embedding_map: dict | None = None  # a 2-D PCA view of samples of the pool and labeled set and of the picks (pca_map)


def _sample(ids: np.ndarray, n: int, seed: int) -> np.ndarray:
    return ids if len(ids) <= n else np.sort(np.random.default_rng(seed).choice(ids, n, replace=False))


MAP_POOL, MAP_LABELED = 3000, 1500  # points drawn on the map, at most (the picks: up to MAP_PICKS)
MAP_PICKS = 2000


def pca_map(pool: np.ndarray, labeled: np.ndarray, picks: np.ndarray) -> dict:
    """Project unit rows on the first two principal axes of pool and labeled together
    (their mean removed). -> {"pool", "labeled", "picks": [*, 2] float32, "explained": the
    share of the variance the two axes hold}. Each axis's sign is fixed so that its
    largest loading is positive: the same data draws the same map."""
    fit = np.concatenate([pool, labeled]).astype(np.float64)
    if len(fit) < 2:
        return {"pool": np.zeros((len(pool), 2)), "labeled": np.zeros((len(labeled), 2)),
                "picks": np.zeros((len(picks), 2)), "explained": 0.0}
    mean = fit.mean(axis=0)
    _, S, Vt = np.linalg.svd(fit - mean, full_matrices=False)
    axes = Vt[:2]
    axes *= np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])[:, None]
    if len(axes) < 2:
        axes = np.vstack([axes, np.zeros_like(axes)])

    def project(X):
        return ((X.astype(np.float64) - mean) @ axes.T).astype(np.float32) if len(X) else np.zeros((0, 2), np.float32)

    total = float((S ** 2).sum())
    return {"pool": project(pool), "labeled": project(labeled), "picks": project(picks),
            "explained": float((S[:2] ** 2).sum()) / total if total > 0 else 0.0}


def covering_curve(store: Store, pool_ids: np.ndarray, picks: np.ndarray, block: int = 4096) -> np.ndarray:
    """[B + 1] covering radius of the pool by labeled-or-picked images, before and after
    each pick, exactly: pool block by pool block against the picks in order."""
    sorted_ids, P = store.vectors(ids=np.unique(picks))
    P = unit32(P)[np.searchsorted(sorted_ids, picks)]  # [B, d] in pick order
    curve = np.zeros(len(picks) + 1)
    for ids, X in store.iter_blocks():
        keep = np.isin(ids, pool_ids)
        X = unit32(X[keep])
        for s in range(0, len(X), block):
            xb = X[s:s + block]
            d0 = knn_blocks(store, xb, 1, "labeled", exclude=picks)[0][:, 0]  # [b]
            cm = np.minimum(np.minimum.accumulate(1.0 - xb @ P.T, axis=1), d0[:, None])  # [b, B]
            curve[0] = max(curve[0], float(d0.max()))
            curve[1:] = np.maximum(curve[1:], cm.max(axis=0))
    return np.maximum(curve, 0.0)


def collect(store: Store, rows: list[dict], cfg: ReportCfg) -> ReportData:
    """The numbers behind the page (tested against brute force)."""
    if cfg.k < 0:
        raise ConfigError(f"--k must be >= 0, got {cfg.k}")
    if cfg.limit < 0:
        raise ConfigError(f"--limit must be >= 0 (0: every pick), got {cfg.limit}")
    image, _ = store.follow_moves(selection_ids(store, rows, "is the selection from this index?"), said="picks")
    keep = np.sort(np.unique(image, return_index=True)[1])  # an image listed twice is one pick, at its first rank
    repeated = len(image) - len(keep)
    if repeated:
        rows, image = [rows[i] for i in keep], image[keep]
    has = np.isin(image, store.embedded().ids)  # a pick deleted (or failed) since: no vector to measure
    if not has.all():
        lost = store.describe(image[~has].tolist())
        example = next(iter(lost.values()))
        if not has.any():
            raise InputError(f"none of the {len(image)} picks has a vector now (deleted or failed since the selection, "
                             f"e.g. {example[1] or example[0]}); build-index records why (`novelty info`)")
        log.warning("%d of the %d picks have no vector now (deleted or failed since the selection, e.g. %s): left out "
                    "of the report", int((~has).sum()), len(image), example[1] or example[0])
        rows, image = [r for r, h in zip(rows, has) if h], image[has]
    lab_all = store.embedded("labeled").ids
    labeled = lab_all[~np.isin(lab_all, image)]
    pool = np.union1d(store.pool_ids()[0], image)  # select's pool, and the picks
    sel_ids, X = store.vectors(ids=np.unique(image))
    D, I, _ = knn_blocks(store, X, max(cfg.k, 1), "labeled", exclude=image)  # the first column is the pick's novelty
    order = np.searchsorted(sel_ids, image)
    D, I = D[order], I[order]
    ps = _sample(pool, cfg.sample, cfg.seed)  # sorted ids, as _sample gives them
    P = store.vectors(ids=ps)[1]  # [s, d], also drawn from for the map
    pool_nov = knn_blocks(store, P, 1, "labeled", exclude=image)[0][:, 0] if len(ps) else np.empty(0)
    ls = _sample(labeled, cfg.sample, cfg.seed)
    L = store.vectors(ids=ls)[1]
    lab_nov = np.empty(0)
    if len(ls):
        Dl, Il, _ = knn_blocks(store, L, 2, "labeled", exclude=image)
        lab_nov = np.where(Il[:, 0] == ls, Dl[:, 1], Dl[:, 0])
    run, exact = match_select_run(store, image)
    radius, source = None, "computed"
    if run is not None and exact:
        radii = [r for (r,) in store.db.execute("SELECT radius FROM picks WHERE run=? ORDER BY rank", (run,))]
        summary = json.loads(store.db.execute("SELECT summary FROM runs WHERE id=?", (run,)).fetchone()[0] or "{}")
        before = summary.get("covering_radius_before")  # inf (Infinity) when nothing was labeled
        # the run's trace is of its pool: not this one once images were excluded, added or labeled since
        same = summary.get("pool") == len(pool) and summary.get("labeled") == len(labeled)
        if radii and all(r is not None for r in radii) and before is not None and same:
            radius, source = np.array([before, *radii], dtype=np.float64), f"run #{run}"
    if radius is None:
        radius = covering_curve(store, pool, image)
    counts = {"pool": len(pool), "labeled": len(labeled), "picks": len(image), "pool_sample": len(ps), "labeled_sample": len(ls),
              "repeated": repeated}
    mp, ml = _sample(ps, MAP_POOL, cfg.seed), _sample(ls, MAP_LABELED, cfg.seed)
    drawn = image[np.isin(image, sel_ids)][:MAP_PICKS]  # the first picks, in rank order
    emap = pca_map(unit32(P[np.searchsorted(ps, mp)]), unit32(L[np.searchsorted(ls, ml)]),
                   unit32(X[np.searchsorted(sel_ids, drawn)]))  # the samples' rows, read once above
    return ReportData(rows, image, D, I, pool_nov, lab_nov[np.isfinite(lab_nov)], radius, source, run if exact else None, counts,
                      emap)


# ---------------------------------------------------------------------------- drawing
def esc(v) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _num(v) -> str:
    """Integers as they are, other numbers to 4 decimals, anything else escaped."""
    if isinstance(v, (int, np.integer)) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()):
        return esc(int(v))
    try:
        return f"{float(v):.4f}"
    except (TypeError, ValueError):
        return esc(v)


def svg_histogram(title: str, values: np.ndarray, edges: np.ndarray, colour: str, total: int, w: int = 270, h: int = 170) -> str:
    """Counts of `values` (a sample of `total`) in bins `edges`."""
    values = values[np.isfinite(values)]
    counts = np.histogram(values, edges)[0] if len(values) else np.zeros(len(edges) - 1, int)
    top = max(int(counts.max()), 1)
    left, bottom, pw, ph = 36, h - 28, w - 46, h - 70
    bw = pw / len(counts)
    bars = "".join(
        f'<rect x="{left + i * bw:.1f}" y="{bottom - c / top * ph:.1f}" width="{max(bw - 1, 0.5):.1f}" '
        f'height="{c / top * ph:.1f}" fill="{colour}"/>' for i, c in enumerate(counts) if c)
    med = (f" of {total}" if total > len(values) else "") + (f", median {np.median(values):.3f}" if len(values) else "")
    return (f'<svg class="plot" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">'
            f'<text x="{left}" y="16" class="t">{esc(title)}</text><text x="{left}" y="30" class="s">n = {len(values)}{med}</text>'
            f'<line x1="{left}" y1="{bottom}" x2="{left + pw}" y2="{bottom}" class="ax"/>{bars}'
            f'<text x="{left}" y="{bottom + 14}" class="s">{edges[0]:.2f}</text>'
            f'<text x="{left + pw}" y="{bottom + 14}" class="s" text-anchor="end">{edges[-1]:.2f}</text>'
            f'<text x="{left + pw / 2}" y="{bottom + 24}" class="s" text-anchor="middle">cosine distance to nearest labeled</text>'
            f'<text x="{left - 4}" y="{bottom - ph + 4}" class="s" text-anchor="end">{top}</text></svg>')


def svg_curve(title: str, y: np.ndarray, w: int = 270, h: int = 170) -> str:
    x = np.arange(len(y))
    ok = np.isfinite(y)
    left, bottom, pw, ph = 44, h - 28, w - 56, h - 66
    lo, hi = 0.0, (float(y[ok].max()) if ok.any() else 1.0)
    hi = hi if hi > lo else lo + 1e-6
    px = left + x / max(len(y) - 1, 1) * pw
    py = bottom - (y - lo) / (hi - lo) * ph
    pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px[ok], py[ok]))
    return (f'<svg class="plot" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">'
            f'<text x="{left}" y="16" class="t">{esc(title)}</text>'
            f'<line x1="{left}" y1="{bottom}" x2="{left + pw}" y2="{bottom}" class="ax"/>'
            f'<line x1="{left}" y1="{bottom}" x2="{left}" y2="{bottom - ph}" class="ax"/>'
            f'<polyline points="{pts}" fill="none" stroke="#c0392b" stroke-width="2"/>'
            f'<text x="{left - 4}" y="{bottom - ph + 4}" class="s" text-anchor="end">{hi:.3f}</text>'
            f'<text x="{left - 4}" y="{bottom}" class="s" text-anchor="end">{lo:.3f}</text>'
            f'<text x="{left}" y="{bottom + 14}" class="s">0</text>'
            f'<text x="{left + pw}" y="{bottom + 14}" class="s" text-anchor="end">{len(y) - 1}</text>'
            f'<text x="{left + pw / 2}" y="{bottom + 24}" class="s" text-anchor="middle">picks</text></svg>')


def svg_map(emap: dict, counts: dict, w: int = 460, h: int = 320) -> str:
    """The PCA map as dots: pool grey, labeled blue, picks red on top."""
    layers = [("pool", "#b3b6b7", 1.6, counts["pool"]), ("labeled", "#2980b9", 1.8, counts["labeled"]),
              ("picks", "#c0392b", 2.6, counts["picks"])]
    pts = np.concatenate([emap[k] for k, *_ in layers]) if any(len(emap[k]) for k, *_ in layers) else np.zeros((1, 2))
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    left, top, pw, ph = 10, 40, w - 20, h - 64
    dots, legend = [], []
    for n, (key, colour, r, total) in enumerate(layers):
        xy = emap[key]
        px = left + (xy[:, 0] - lo[0]) / span[0] * pw
        py = top + ph - (xy[:, 1] - lo[1]) / span[1] * ph
        dots.append(f'<g fill="{colour}">' + "".join(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="{r}"/>' for a, b in zip(px, py)) + "</g>")
        shown = f"{len(xy)} of {total}" if total > len(xy) else f"{len(xy)}"
        legend.append(f'<circle cx="{left + 4 + n * 115}" cy="{h - 12}" r="4" fill="{colour}"/>'
                      f'<text x="{left + 12 + n * 115}" y="{h - 8}" class="s">{key} ({shown})</text>')
    return (f'<svg class="plot" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">'
            f'<text x="{left}" y="16" class="t">embedding map (PCA, 2 axes)</text>'
            f'<text x="{left}" y="30" class="s">the axes hold {100 * emap["explained"]:.0f}% of the variance; '
            f'near here is not always near in the index</text>{"".join(dots)}{"".join(legend)}</svg>')


class Thumbs:
    """Data URIs of small JPEG thumbnails, one decode per image; None when unreadable."""

    def __init__(self, size: int):
        self.size, self.cache = size, {}

    def __call__(self, path: str | None) -> tuple[str | None, str | None]:
        if not path:
            return None, None
        if path not in self.cache:
            from .reader import read_file

            d = read_file(path, self.size, ReaderCfg().max_pixels)
            uri = None
            if d.image is not None:
                img = d.image
                img.thumbnail((self.size, self.size))
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=70)
                uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
            self.cache[path] = (uri, d.reason)
        return self.cache[path]


def figure(thumbs: Thumbs, shown: str, path: str | None, caption: str, labeled: bool = False) -> str:
    """A thumbnail with its id and `caption` (HTML); `labeled` adds the class "lab" (the
    gallery pages frame labeled images) and says so under the caption."""
    uri, reason = thumbs(path)
    img = f'<img src="{uri}" alt="{esc(shown)}">' if uri else f'<div class="noimg">{esc(reason or "no image")}</div>'
    cls, caption = (' class="lab"', caption + "<br>labeled") if labeled else ("", caption)
    return f'<figure{cls} title="{esc(path or shown)}">{img}<figcaption>{esc(shown)}<br>{caption}</figcaption></figure>'


CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}h1{font-size:20px;margin:0 0 4px}
.meta{color:#555;margin:0 0 16px}.plots{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:20px}
.plot{border:1px solid #ddd;background:#fafafa}.plot .t{font-size:13px;font-weight:600}.plot .s{font-size:10px;fill:#555}
.plot .ax{stroke:#888}table{border-collapse:collapse;width:100%}td,th{border-top:1px solid #ddd;padding:8px;vertical-align:top;text-align:left}
figure{display:inline-block;margin:0 8px 0 0;width:136px;font-size:11px;word-break:break-all}figure img{max-width:128px;max-height:128px;display:block}
.noimg{width:128px;height:64px;background:#eee;color:#777;display:flex;align-items:center;justify-content:center;text-align:center}
td.sc{width:240px}td.near{white-space:nowrap}figure{white-space:normal}dl{margin:0;display:grid;grid-template-columns:auto auto;gap:0 8px;font-size:12px}dt{color:#666}dd{margin:0}.path{font-size:11px;color:#555;word-break:break-all}"""


def render(store: Store, data: ReportData, cfg: ReportCfg, source: Path) -> str:
    shown_n = len(data.rows) if cfg.limit == 0 else min(cfg.limit, len(data.rows))
    near_D, near_I = data.near_D[:shown_n, :cfg.k], data.near_I[:shown_n, :cfg.k]
    meta = store.describe(np.concatenate([data.image[:shown_n], near_I[near_I >= 0]]))
    thumbs = Thumbs(cfg.thumb)
    sel_nov = data.near_D[:, 0]
    finite = np.concatenate([v[np.isfinite(v)] for v in (data.pool_novelty, data.labeled_novelty, sel_nov)])
    edges = np.linspace(0.0, max(float(finite.max()) if len(finite) else 1.0, 1e-3) * 1.0001, 31)
    c = data.counts
    plots = [
        svg_histogram("pool", data.pool_novelty, edges, "#7f8c8d", c["pool"]),
        svg_histogram("labeled (leave-one-out)", data.labeled_novelty, edges, "#2980b9", c["labeled"]),
        svg_histogram("selection", sel_nov, edges, "#c0392b", c["picks"]),
        svg_curve(f"covering radius ({data.radius_source})", data.radius),
    ]
    if data.embedding_map is not None:
        plots.append(svg_map(data.embedding_map, c))
    body = []
    for n, row in enumerate(data.rows[:shown_n]):
        i = int(data.image[n])
        shown, path, _ = meta[i]
        scores = "".join(f"<dt>{esc(k)}</dt><dd>{_num(row[k])}</dd>" for k in COLUMNS[3:] if row.get(k) not in (None, ""))
        near = "".join(figure(thumbs, meta[int(j)][0], meta[int(j)][1], f"d = {d:.4f}")
                       for d, j in zip(near_D[n], near_I[n]) if j >= 0) or ("no labeled image" if cfg.k else "")
        body.append(f'<tr><td>{esc(row.get("rank", n + 1))}</td><td>{figure(thumbs, shown, path, "")}</td>'
                    f'<td class="sc"><b>{esc(shown)}</b><div class="path">{esc(path or "")}</div><dl>{scores}</dl></td><td class="near">{near}</td></tr>')
    run = f"run #{data.run}" if data.run is not None else "no matching select run"
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>novelty report: {esc(source.name)}</title>'
            f'<style>{CSS}</style></head><body><h1>Selection report</h1>'
            f'<p class="meta">{esc(source)} · {run} · {c["picks"]} picks from a pool of {c["pool"]} · {c["labeled"]} labeled · '
            f'index {esc(store.root)} · {time.strftime("%Y-%m-%d %H:%M")}</p>'
            f'<div class="plots">{"".join(plots)}</div>'
            + (f'<p class="meta">The table shows the first {shown_n} of {c["picks"]} picks (--limit); '
               f'the plots use all of them.</p>' if shown_n < c["picks"] else "") +
            f'<table><thead><tr><th>rank</th><th>image</th><th>scores</th><th>nearest labeled (k = {cfg.k})</th></tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></body></html>\n')


def build_report(root: Path, selection: Path, out: Path, cfg: ReportCfg = ReportCfg()) -> ReportData:
    rows = read_selection(selection)
    with open_store(root) as store:
        data = collect(store, rows, cfg)
        atomic_write_text(Path(out), render(store, data, cfg, Path(selection)))
    return data
