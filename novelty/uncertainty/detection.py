"""Detection uncertainty from T MC-dropout passes: pure functions, arrays in, scores out.

Input, per image: T passes, each a mapping with ``boxes`` [N, 4] (xyxy), ``scores``
[N], ``labels`` [N] and optionally ``probs`` [N, C] (the full class distribution of each
box; rows sum to 1; a background column is allowed). N may differ between passes.

1. Presence. A box exists in its pass when ``score >= score_thresh`` (default 0.5: the
   operating point at which you would accept a detection; set it to yours). Lower
   boxes are dropped before matching, so a box flickering around 0.05 is not doubt.
2. Matching (``match_detections``), all boxes of all passes, in descending score order
   (ties: pass, then index):
   a. same class: a box joins the cluster whose anchor (its first, highest-scoring box)
      has the same label and the highest IoU >= ``iou_thresh`` among clusters that have
      no box from this pass yet; otherwise it opens a new cluster. At most one box per
      pass per cluster.
   b. class-agnostic: clusters are then visited in anchor-score order; one merges into
      the earlier cluster whose anchor overlaps its anchor with the highest IoU >=
      ``iou_thresh`` among those sharing no pass with it. So an object called "class 1"
      in some passes and "class 2" in others is one object with class doubt, while two
      boxes of different classes in the same pass stay two objects.
3. Per object (cluster of m boxes from m of the T passes), each term in [0, 1]:
   - presence     P = H2(m / T), binary entropy in bits of the presence rate. 0 when
                  all passes agree (m = T), maximal (1) when the object is there in half
                  of them. (H2 is symmetric: the share of missing passes gives the same.)
   - class        over the m members: entropy of the mean class distribution and BALD
                  (entropy of the mean minus mean entropy), both divided by log C. With
                  ``probs`` the distribution is the given one; otherwise each member is
                  the categorical {its label: score, none: 1 - score} over the labels
                  seen in the cluster plus "none" (two categories, i.e. the binary
                  entropy of the score, when the members agree on the label).
                  ``class_measure`` picks which one enters the score; the default,
                  BALD, is zero when the passes agree, which is what MC disagreement
                  asks for; entropy also counts doubt the passes share.
   - localisation L = 1 - mean IoU of the members to their coordinate-wise mean box.
   - object score  = 1 - (1 - wP P)(1 - wC C)(1 - wL L)   (weights default 1)
     a noisy-OR: any one kind of doubt raises it, it is 0 only when all three are 0,
     it is at least the largest weighted term, and it stays in [0, 1].
4. Image score: the chosen aggregation (``aggregate.py``) over the object scores. An
   image where no pass has a box scores ``empty_score`` (default 0.0): all T passes
   agree there is nothing to find, so there is no disagreement to learn from.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError
from .aggregate import get_aggregation
from .heuristics import bald, binary_entropy, entropy

CLASS_MEASURES = ("bald", "entropy")


@dataclass(frozen=True)
class DetectionCfg:
    iou_thresh: float = 0.5
    score_thresh: float = 0.5
    class_measure: str = "bald"  # bald | entropy
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # presence, class, localisation
    aggregation: str = "max"  # see list_aggregations()
    topk: int = 3  # k of topk-mean
    empty_score: float = 0.0  # image where no pass has a box

    def __post_init__(self):
        if not 0.0 < self.iou_thresh <= 1.0:
            raise ConfigError(f"iou_thresh must be in (0, 1], got {self.iou_thresh}")
        if not 0.0 <= self.score_thresh <= 1.0:  # NaN fails too
            raise ConfigError(f"--score-thresh must be in [0, 1], got {self.score_thresh}")
        if self.class_measure not in CLASS_MEASURES:
            raise ConfigError(f"unknown class measure {self.class_measure!r}; valid: {', '.join(CLASS_MEASURES)}")
        if len(self.weights) != 3 or not all(0.0 <= w <= 1.0 for w in self.weights):
            raise ConfigError(f"weights must be three numbers in [0, 1], got {self.weights}")
        get_aggregation(self.aggregation, self.topk)  # raises on an unknown name


@dataclass(frozen=True)
class DetectionObjects:
    """Per-object results for one image, K objects."""

    boxes: np.ndarray  # [K, 4] mean box of the members
    labels: np.ndarray  # [K] label of the anchor (highest-scoring member)
    presence_rate: np.ndarray  # [K] m / T
    presence: np.ndarray  # [K] H2(m / T)
    class_entropy: np.ndarray  # [K]
    class_bald: np.ndarray  # [K]
    localisation: np.ndarray  # [K]
    score: np.ndarray  # [K] combined object score
    members: list[np.ndarray] = field(default_factory=list)  # K x [m, 2] (pass, index)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes: [N, 4] x [M, 4] -> [N, M]. Two empty boxes at the same
    place have IoU 1."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    same = (a[:, None, :] == b[None, :, :]).all(-1)
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), same.astype(np.float64))


def _pass_arrays(d: Mapping) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    try:
        boxes = np.asarray(d["boxes"], dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(d["scores"], dtype=np.float64).reshape(-1)
        labels = np.asarray(d["labels"]).reshape(-1).astype(np.int64)
    except KeyError as e:
        raise ConfigError(f"a detection pass needs boxes, scores and labels; {e.args[0]!r} is missing") from e
    probs = d.get("probs")
    probs = None if probs is None else np.asarray(probs, dtype=np.float64).reshape(boxes.shape[0], -1)
    if not boxes.shape[0] == scores.shape[0] == labels.shape[0]:
        raise ConfigError(f"boxes, scores and labels disagree in length: {boxes.shape[0]}, {scores.shape[0]}, {labels.shape[0]}")
    return boxes, scores, labels, probs


def _pool(passes: Sequence[Mapping], score_thresh: float):
    """All kept boxes of all passes, concatenated: boxes [M,4], scores, labels, pass, index, probs."""
    cols = [[], [], [], [], [], []]
    for t, d in enumerate(passes):
        boxes, scores, labels, probs = _pass_arrays(d)
        keep = np.flatnonzero(scores >= score_thresh)
        for col, v in zip(cols, (boxes[keep], scores[keep], labels[keep], np.full(keep.size, t), keep,
                                 None if probs is None else probs[keep])):
            col.append(v)
    has_probs = all(p is not None for p in cols[5]) and len(cols[5]) > 0 and cols[5][0].shape[1] > 1
    out = [np.concatenate(c) if c else np.zeros(0) for c in cols[:5]]
    out[0] = out[0].reshape(-1, 4)
    return (*out, np.concatenate(cols[5]) if has_probs else None)


def _cluster(boxes, scores, labels, pass_of, index_of, T: int, iou_thresh: float) -> list[np.ndarray]:
    """Greedy two-stage matching (module docstring, step 2) -> K arrays of pooled box ids."""
    M = boxes.shape[0]
    if M == 0:
        return []
    order = np.lexsort((index_of, pass_of, -scores))
    iou = box_iou(boxes, boxes)  # [M, M]
    anchor = np.empty(M, np.int64)  # anchor box id of each cluster
    used = np.zeros((M, T), bool)  # cluster x pass
    members: list[list[int]] = []
    K = 0
    for j in order:  # stage a: same class
        a = anchor[:K]
        ok = (labels[a] == labels[j]) & (iou[j, a] >= iou_thresh) & ~used[:K, pass_of[j]]
        if ok.any():
            k = int(np.argmax(np.where(ok, iou[j, a], -1.0)))
            members[k].append(j)
        else:
            k, K = K, K + 1
            anchor[k] = j
            members.append([j])
        used[k, pass_of[j]] = True
    roots: list[int] = []  # stage b: class-agnostic merge of pass-disjoint clusters
    for c in range(K):
        if roots:
            r = np.asarray(roots)
            ov = iou[anchor[c], anchor[r]]
            ok = (ov >= iou_thresh) & ~(used[r] & used[c]).any(1)
            if ok.any():
                k = int(r[np.argmax(np.where(ok, ov, -1.0))])
                members[k].extend(members[c])
                used[k] |= used[c]
                continue
        roots.append(c)
    return [np.asarray(members[k], np.int64) for k in roots]


def match_detections(passes: Sequence[Mapping], iou_thresh: float = 0.5, score_thresh: float = 0.0) -> list[np.ndarray]:
    """Clusters of boxes across passes: K arrays [m, 2] of (pass, box index in that pass)."""
    boxes, scores, labels, pass_of, index_of, _ = _pool(passes, score_thresh)
    clusters = _cluster(boxes, scores, labels, pass_of, index_of, len(passes), iou_thresh)
    return [np.stack([pass_of[c], index_of[c]], 1).astype(np.int64) for c in clusters]


def _class_terms(scores, labels, probs) -> tuple[float, float]:
    """(normalised entropy, normalised BALD) of one cluster's m members."""
    if probs is None:
        cats, idx = np.unique(labels, return_inverse=True)
        q = np.zeros((scores.shape[0], cats.shape[0] + 1))  # [m, labels seen + none]
        q[np.arange(scores.shape[0]), idx] = scores
        q[:, -1] = 1.0 - scores
        probs = q
    p = probs.T[None]  # [1, C, m]
    return float(entropy(p, normalize=True)[0]), float(bald(p, normalize=True)[0])


def detection_objects(passes: Sequence[Mapping], cfg: DetectionCfg = DetectionCfg()) -> DetectionObjects:
    """Match the T passes' boxes into objects and score each (module docstring)."""
    T = len(passes)
    if T < 1:
        raise ConfigError("detection uncertainty needs at least one pass")
    boxes, scores, labels, pass_of, index_of, probs = _pool(passes, cfg.score_thresh)
    clusters = _cluster(boxes, scores, labels, pass_of, index_of, T, cfg.iou_thresh)
    K = len(clusters)
    mean_boxes = np.zeros((K, 4))
    rate, ent, mi, loc = (np.zeros(K) for _ in range(4))
    for k, c in enumerate(clusters):
        rate[k] = c.shape[0] / T
        mean_boxes[k] = boxes[c].mean(0)
        loc[k] = 1.0 - box_iou(boxes[c], mean_boxes[k][None])[:, 0].mean()
        ent[k], mi[k] = _class_terms(scores[c], labels[c], None if probs is None else probs[c])
    presence = binary_entropy(rate)
    cls = mi if cfg.class_measure == "bald" else ent
    wp, wc, wl = cfg.weights
    score = 1.0 - (1.0 - wp * presence) * (1.0 - wc * cls) * (1.0 - wl * loc)
    return DetectionObjects(
        boxes=mean_boxes.astype(np.float32),
        labels=np.asarray([labels[c[0]] for c in clusters], np.int64),
        presence_rate=rate.astype(np.float32),
        presence=presence.astype(np.float32),
        class_entropy=ent.astype(np.float32),
        class_bald=mi.astype(np.float32),
        localisation=np.clip(loc, 0.0, 1.0).astype(np.float32),
        score=np.clip(score, 0.0, 1.0).astype(np.float32),
        members=[np.stack([pass_of[c], index_of[c]], 1).astype(np.int64) for c in clusters],
    )


def image_score(objects: DetectionObjects, cfg: DetectionCfg = DetectionCfg()) -> float:
    """Aggregate object scores into one image score; ``empty_score`` with no objects."""
    if objects.score.shape[0] == 0:
        return float(cfg.empty_score)
    return get_aggregation(cfg.aggregation, cfg.topk)(objects.score)


def detection_score(passes: Sequence[Mapping], cfg: DetectionCfg = DetectionCfg()) -> float:
    """One image's uncertainty from its T passes."""
    return image_score(detection_objects(passes, cfg), cfg)
