"""Pages of thumbnails for looking at redundancy rather than reading it from a CSV:
`novelty duplicates --html` (the near-duplicate groups, largest first) and `novelty
neighbors --html` (a query and its nearest images).

Each is one self-contained HTML file, like `report`: thumbnails are JPEG data URIs,
nothing is fetched and there is no script; every id, path and prompt is HTML-escaped.
Each duplicate group shows its first member (a labeled one when the group has any: the
labeled set already holds that scene), then its unlabeled members, then its other
labeled ones, each with its cosine distance to that first member, so a group that
chains from one scene into another is visible as distances that grow.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._files import atomic_write_text
from .errors import ConfigError
from .inspect import DuplicateGroups, NeighborsResult, unit32
from .report import CSS, Thumbs, esc, figure
from .store import Store


@dataclass(frozen=True)
class GalleryCfg:
    groups: int = 100  # groups shown, largest first; 0: every group
    per_group: int = 12  # thumbnails per group, first member included
    thumb: int = 96  # thumbnail size in pixels (longest side)


@dataclass
class GroupView:
    number: int  # group number in the CSV, 1 = the largest
    size: int
    labeled: int  # members in the labeled split
    shown: np.ndarray  # [m] catalog ids shown, the first member first
    dist: np.ndarray  # [m] cosine distance of each shown member to the first


def check_gallery_cfg(cfg: GalleryCfg) -> None:
    if cfg.groups < 0:
        raise ConfigError(f"--html-groups must be >= 0 (0: every group), got {cfg.groups}")
    if cfg.per_group < 2:
        raise ConfigError(f"--html-per-group must be >= 2 (a group has two members at least), got {cfg.per_group}")


def group_bounds(group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end positions of each run of equal group numbers: [g], [g]."""
    if not len(group):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    return starts, np.r_[starts[1:], len(group)]


def size_table(sizes: np.ndarray) -> list[tuple[str, int, int]]:
    """(size range, groups, images) in doubling bins: 2, 3-4, 5-8, 9-16, ..."""
    rows, lo = [], 2
    while len(sizes) and lo <= sizes.max():
        hi = 2 if lo == 2 else 2 * (lo - 1)
        m = (sizes >= lo) & (sizes <= hi)
        if m.any():
            rows.append((str(lo) if lo == hi else f"{lo}-{hi}", int(m.sum()), int(sizes[m].sum())))
        lo = hi + 1
    return rows


def display_order(labeled: np.ndarray) -> np.ndarray:
    """Positions of one group's members ([m] labeled flags, labeled first as
    `find_duplicates` orders them) in the order shown: its first labeled member, then
    the unlabeled ones, then the other labeled ones, so the images a user might label
    are never hidden behind labeled ones."""
    lab, unl = np.flatnonzero(labeled), np.flatnonzero(~labeled)
    return np.concatenate([lab[:1], unl, lab[1:]])


def collect_groups(store: Store, groups: DuplicateGroups, cfg: GalleryCfg) -> list[GroupView]:
    """The groups shown on the page, each with its first `per_group` members in
    display order, and their distances to the first."""
    check_gallery_cfg(cfg)
    starts, ends = group_bounds(groups.group)
    n = len(starts) if cfg.groups == 0 else min(cfg.groups, len(starts))
    labeled = np.isin(groups.image, store.embedded("labeled").ids)
    bounds = [(int(s), int(e)) for s, e in zip(starts[:n], ends[:n])]
    shown = [groups.image[s:e][display_order(labeled[s:e])[:min(cfg.per_group, e - s)]] for s, e in bounds]
    sorted_ids, X = store.vectors(ids=np.unique(np.concatenate(shown))) if n else (np.empty(0, np.int64), None)
    views = []
    for (s, e), ids in zip(bounds, shown):
        x = unit32(X[np.searchsorted(sorted_ids, ids)])  # [m, d] in shown order, renormalised: a copy shows d = 0
        dist = np.maximum(1.0 - x @ x[0], 0.0)
        dist[0] = 0.0
        views.append(GroupView(int(groups.group[s]), e - s, int(labeled[s:e].sum()), ids, dist))
    return views


_GALLERY_CSS = (".grp{border-top:1px solid #ddd;padding:10px 0}.grp h2{font-size:14px;margin:0 0 6px}"
                ".grp h2 span{font-weight:normal;color:#555}figure{width:104px;vertical-align:top;margin-bottom:6px}figure img{max-width:96px;max-height:96px}"
                ".noimg{width:96px}figure.lab{outline:3px solid #2980b9;outline-offset:1px}.more{color:#555;font-size:12px}"
                ".sizes td,.sizes th{padding:2px 10px 2px 0;border:none}.sizes{width:auto;margin-bottom:16px}")


def render_gallery(store: Store, views: list[GroupView], summary: dict, sizes: np.ndarray, cfg: GalleryCfg, csv_path: Path | None) -> str:
    ids = np.concatenate([v.shown for v in views]) if views else np.empty(0, np.int64)
    meta = store.describe(ids)
    thumbs = Thumbs(cfg.thumb)
    s = summary
    lines = [f'{s["groups"]} near-duplicate group(s) among {s["images"]} images (cosine distance &lt; {s["threshold"]}, '
             f'split: {esc(s["split"])}); {s["in_groups"]} images in groups, the largest holds {s["largest"]}.']
    if s["split"] != "labeled":
        lines.append(f'{100 * s["pool_in_groups"]:.1f}% of the {s["pool"]} unlabeled images are in a group'
                     + (f'; {100 * s["pool_represented"]:.1f}% are near-copies of a labeled image.' if s["pool_represented"] is not None else "."))
    table = "".join(f"<tr><td>{esc(r)}</td><td>{g}</td><td>{m}</td></tr>" for r, g, m in size_table(sizes))
    body = []
    for v in views:
        figs = []
        for j, (i, d) in enumerate(zip(v.shown.tolist(), v.dist)):
            shown, path, split = meta[i]
            figs.append(figure(thumbs, shown, path, "first" if j == 0 else f"d = {d:.4f}", labeled=split == "labeled"))
        more = v.size - len(v.shown)
        tail = f'<div class="more">and {more} more (all members are in the CSV)</div>' if more else ""
        body.append(f'<section class="grp"><h2>group {v.number} <span>· {v.size} images · {v.labeled} labeled · '
                    f'{v.size - v.labeled} unlabeled · farthest shown d = {float(v.dist.max()):.4f}</span></h2>'
                    f'{"".join(figs)}{tail}</section>')
    shown_note = (f'<p class="meta">The first {len(views)} of {s["groups"]} groups are shown (--html-groups); '
                  f'the CSV lists them all.</p>' if len(views) < s["groups"] else "")
    csv_note = f" · CSV {esc(csv_path)}" if csv_path is not None else ""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>novelty duplicates</title>'
            f'<style>{CSS}{_GALLERY_CSS}</style></head><body><h1>Near-duplicate groups</h1>'
            f'<p class="meta">index {esc(store.root)}{csv_note} · {time.strftime("%Y-%m-%d %H:%M")}</p>'
            f'<p>{"<br>".join(lines)}</p>'
            f'<table class="sizes"><thead><tr><th>group size</th><th>groups</th><th>images</th></tr></thead>'
            f'<tbody>{table}</tbody></table>{shown_note}'
            f'<p class="meta">Labeled images are framed in blue. d: cosine distance to the group\'s first image.</p>'
            f'{"".join(body)}</body></html>\n')


def write_gallery(store: Store, path: Path, groups: DuplicateGroups, cfg: GalleryCfg, csv_path: Path | None = None) -> int:
    """Write the page atomically; return the number of groups shown."""
    views = collect_groups(store, groups, cfg)
    starts, ends = group_bounds(groups.group)
    atomic_write_text(Path(path), render_gallery(store, views, groups.summary, ends - starts, cfg, csv_path))
    return len(views)


def render_neighbors(result: NeighborsResult, root: Path, thumb: int = 96) -> str:
    """The query (its thumbnail, or the prompt) and its neighbours, nearest first."""
    thumbs = Thumbs(thumb)
    q = result.query
    if q["kind"] == "text":
        query = f'<div class="prompt">&ldquo;{esc(q["text"])}&rdquo;</div>'
    else:
        query = figure(thumbs, q.get("id") or Path(q["path"]).name, q.get("path"), esc(q["kind"]),
                       labeled=q.get("split") == "labeled")
    figs = [figure(thumbs, n.id, n.path, f"#{n.rank} · d = {n.distance:.4f}", labeled=n.split == "labeled")
            for n in result.neighbors]
    described = "  ".join(str(q[f]) for f in ("id", "path", "text", "split") if q.get(f))
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>novelty neighbors</title>'
            f'<style>{CSS}{_GALLERY_CSS}.prompt{{font-size:18px;padding:8px 0}}</style></head><body><h1>Nearest images</h1>'
            f'<p class="meta">index {esc(root)} · query ({esc(q["kind"])}) {esc(described)} · '
            f'{len(result.neighbors)} neighbour(s) · {time.strftime("%Y-%m-%d %H:%M")}</p>'
            f'<section class="grp"><h2>query</h2>{query}</section>'
            f'<section class="grp"><h2>neighbours <span>· d: cosine distance to the query; labeled images framed in blue</span></h2>'
            f'{"".join(figs) or "none in this split"}</section></body></html>\n')


def write_neighbors(result: NeighborsResult, root: Path, path: Path) -> None:
    atomic_write_text(Path(path), render_neighbors(result, root))
