"""Pure uncertainty scores: known answers on hand-built distributions and pass outputs."""
from __future__ import annotations

import math

import numpy as np
import pytest

from novelty.errors import ConfigError
from novelty.uncertainty import (
    DetectionCfg,
    SegmentationCfg,
    bald,
    binary_entropy,
    box_iou,
    detection_objects,
    detection_score,
    entropy,
    get_aggregation,
    list_aggregations,
    match_detections,
    pixel_maps,
    probs_from_logits,
    segmentation_score,
    segmentation_score_from_logits,
    top_percent_mean,
)


def det(boxes, scores, labels, probs=None) -> dict:
    d = {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "scores": np.asarray(scores, np.float32),
         "labels": np.asarray(labels, np.int64)}
    if probs is not None:
        d["probs"] = np.asarray(probs, np.float32)
    return d


EMPTY = det(np.zeros((0, 4)), [], [])
A = [10, 10, 50, 50]
B = [100, 100, 140, 160]


# -- generic heuristics ------------------------------------------------------------------
def brute_bald(p: np.ndarray) -> np.ndarray:
    """[n, C, T]: H(mean) - mean H, written out with loops."""
    n, C, T = p.shape
    out = np.zeros(n)
    for i in range(n):
        mean = [sum(p[i, c, t] for t in range(T)) / T for c in range(C)]
        h_mean = -sum(m * math.log(m) for m in mean if m > 0)
        h_each = [-sum(p[i, c, t] * math.log(p[i, c, t]) for c in range(C) if p[i, c, t] > 0) for t in range(T)]
        out[i] = h_mean - sum(h_each) / T
    return out


def test_entropy_known_values():
    uniform = np.full((1, 4, 3), 0.25)
    onehot = np.zeros((1, 4, 3))
    onehot[0, 2] = 1.0
    assert entropy(uniform)[0] == pytest.approx(math.log(4))
    assert entropy(uniform, normalize=True)[0] == pytest.approx(1.0)
    assert entropy(onehot)[0] == pytest.approx(0.0, abs=1e-9)
    half = np.array([[[0.5], [0.5]]])  # [1, 2, 1]
    assert entropy(half)[0] == pytest.approx(math.log(2))
    assert binary_entropy(0.5) == pytest.approx(1.0)
    assert binary_entropy([0.0, 1.0]) == pytest.approx([0.0, 0.0])


def test_bald_matches_brute_force():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(5, 0.7), size=(20, 8)).transpose(0, 2, 1)  # [20, 5, 8]
    np.testing.assert_allclose(bald(p), brute_bald(p), atol=1e-10)
    np.testing.assert_allclose(bald(p, normalize=True), brute_bald(p) / math.log(5), atol=1e-10)


def test_bald_known_values_and_ranking():
    same = np.repeat(np.array([0.3, 0.7])[None, :, None], 6, 2)  # flat but agreeing passes
    assert bald(same)[0] == pytest.approx(0.0, abs=1e-12)
    assert entropy(same)[0] > 0.5  # entropy counts doubt the passes share, BALD does not
    flip = np.zeros((1, 2, 6))
    flip[0, 0, :3] = flip[0, 1, 3:] = 1.0  # half the passes say class 0, half class 1
    assert bald(flip)[0] == pytest.approx(math.log(2))
    # growing disagreement, known order
    a = np.linspace(0.0, 0.5, 6)
    p = np.stack([np.stack([0.5 + a, 0.5 - a], 1), np.stack([0.5 - a, 0.5 + a], 1)], -1)  # [6, 2, 2]
    assert np.all(np.diff(bald(p)) > 0)


def test_heuristics_accept_torch_and_other_layouts():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(3), size=(4, 6)).transpose(1, 2, 0)  # [T=6, C=3, n=4]
    ref = bald(p.transpose(2, 1, 0))  # baal layout [n, C, T]
    got = bald(p, class_axis=1, pass_axis=0)
    np.testing.assert_allclose(got, ref, atol=1e-12)
    got_t = bald(torch.from_numpy(p), class_axis=1, pass_axis=0)
    assert isinstance(got_t, torch.Tensor)
    np.testing.assert_allclose(got_t.numpy(), ref, atol=1e-6)
    with pytest.raises(ConfigError):
        entropy(np.ones(3))


# -- detection ---------------------------------------------------------------------------
def test_box_iou_known_values():
    iou = box_iou(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]]))
    np.testing.assert_allclose(iou[0], [1.0, 50 / 150, 0.0])


def test_identical_passes_score_zero():
    p = det([A, B], [0.9, 0.6], [0, 1], probs=[[0.9, 0.1], [0.4, 0.6]])
    obj = detection_objects([p] * 8)
    assert obj.score.shape == (2,)
    np.testing.assert_allclose(obj.score, 0.0, atol=1e-6)
    np.testing.assert_allclose(obj.localisation, 0.0, atol=1e-6)
    assert obj.class_entropy[1] > 0.9  # doubt all passes share: entropy, not in the score
    assert detection_score([p] * 8) == pytest.approx(0.0, abs=1e-6)
    no_probs = det([A, B], [0.9, 0.6], [0, 1])
    assert detection_score([no_probs] * 8) == pytest.approx(0.0, abs=1e-6)


def test_box_in_half_the_passes_has_maximal_presence_disagreement():
    T = 10
    present = det([A], [0.9], [0])
    by_m = []
    for m in range(1, T + 1):
        obj = detection_objects([present] * m + [EMPTY] * (T - m))
        assert obj.presence_rate[0] == pytest.approx(m / T)
        by_m.append(obj.presence[0])
    assert by_m[T // 2 - 1] == pytest.approx(1.0)  # m = T/2
    assert max(by_m) == by_m[T // 2 - 1]
    assert by_m[-1] == pytest.approx(0.0)  # present everywhere: agreement
    assert by_m[1] == pytest.approx(by_m[7])  # missing in 2 = present in 2
    assert detection_score([present] * 5 + [EMPTY] * 5) == pytest.approx(1.0)


def test_localisation_grows_with_jitter():
    def jittered(s):
        return [det([[10 + d, 10, 50 + d, 50]], [0.9], [0]) for d in (-s, s)]

    locs = [detection_objects(jittered(s)).localisation[0] for s in (0, 1, 2, 4)]
    assert locs[0] == pytest.approx(0.0, abs=1e-7)
    assert np.all(np.diff(locs) > 0)
    assert all(0.0 <= v <= 1.0 for v in locs)
    assert len(detection_objects(jittered(8)).score) == 2  # IoU 24/56 < 0.5: two objects


def test_class_flip_is_one_object_with_class_doubt():
    # same place, pass 0 says class 0, pass 1 says class 1: class-agnostic matching joins them
    passes = [det([A], [0.95], [0], probs=[[0.95, 0.05]]), det([A], [0.95], [1], probs=[[0.05, 0.95]])]
    obj = detection_objects(passes)
    assert len(obj.score) == 1
    assert obj.presence[0] == pytest.approx(0.0)
    assert obj.class_bald[0] > 0.6
    # two classes in the SAME pass stay two objects
    both = det([A, A], [0.9, 0.8], [0, 1])
    assert len(match_detections([both, both])) == 2


def test_same_class_matching_comes_first():
    # pass 0: class 0 at A; pass 1: class 1 at A (higher score) and class 0 at A
    passes = [det([A], [0.9], [0]), det([A, A], [0.95, 0.7], [1, 0])]
    clusters = match_detections(passes)
    as_sets = sorted(sorted(map(tuple, c.tolist())) for c in clusters)
    assert as_sets == [[(0, 0), (1, 1)], [(1, 0)]]


def test_matching_separates_distant_boxes_and_respects_thresholds():
    passes = [det([A, B], [0.9, 0.9], [0, 0])] * 3
    assert len(match_detections(passes)) == 2
    low = [det([A], [0.3], [0])] * 3
    assert detection_objects(low, DetectionCfg(score_thresh=0.5)).score.shape == (0,)
    assert detection_objects(low, DetectionCfg(score_thresh=0.2)).score.shape == (1,)


def test_no_detection_image_scores_empty_score():
    assert detection_score([EMPTY] * 6) == 0.0
    assert detection_score([EMPTY] * 6, DetectionCfg(empty_score=0.25)) == 0.25


def test_object_score_is_noisy_or_in_unit_interval():
    rng = np.random.default_rng(3)
    passes = []
    for t in range(12):
        n = int(rng.integers(0, 6))
        xy = rng.uniform(0, 200, (n, 2))
        wh = rng.uniform(10, 60, (n, 2))
        passes.append(det(np.hstack([xy, xy + wh]), rng.uniform(0.5, 1, n), rng.integers(0, 2, n)))
    obj = detection_objects(passes)
    assert np.all((obj.score >= 0) & (obj.score <= 1))
    expect = 1 - (1 - obj.presence) * (1 - obj.class_bald) * (1 - obj.localisation)
    np.testing.assert_allclose(obj.score, expect, atol=1e-5)
    only_presence = detection_objects(passes, DetectionCfg(weights=(1.0, 0.0, 0.0)))
    np.testing.assert_allclose(only_presence.score, only_presence.presence, atol=1e-6)


def test_aggregation_registry():
    assert list_aggregations() == ["max", "mean", "sum", "topk-mean"]
    s = np.array([0.1, 0.9, 0.5, 0.3])
    assert get_aggregation("max")(s) == pytest.approx(0.9)
    assert get_aggregation("mean")(s) == pytest.approx(0.45)
    assert get_aggregation("sum")(s) == pytest.approx(1.8)
    assert get_aggregation("topk-mean", k=2)(s) == pytest.approx(0.7)
    assert get_aggregation("topk-mean", k=10)(s) == pytest.approx(0.45)
    with pytest.raises(ConfigError, match="max, mean, sum, topk-mean"):
        get_aggregation("median")
    with pytest.raises(ConfigError, match="median"):
        DetectionCfg(aggregation="median")
    with pytest.raises(ConfigError, match="bald, entropy"):
        DetectionCfg(class_measure="variance")


def test_aggregation_changes_image_ranking_as_documented():
    # image 1: one very doubtful object; image 2: three moderately doubtful ones
    one = [det([A], [0.9], [0])] * 2 + [EMPTY] * 2  # presence 1.0
    many = [det([A, B, [200, 200, 240, 240]], [0.9] * 3, [0] * 3)] * 3 + [EMPTY]  # presence H2(.75) each
    by = {a: (detection_score(one, DetectionCfg(aggregation=a)), detection_score(many, DetectionCfg(aggregation=a)))
          for a in list_aggregations()}
    assert by["max"][0] > by["max"][1]
    assert by["sum"][1] > by["sum"][0]


# -- segmentation ------------------------------------------------------------------------
def test_segmentation_identical_passes_and_small_uncertain_object():
    T, C, H, W = 6, 2, 40, 40
    confident = np.zeros((T, C, H, W))
    confident[:, 0] = 0.99
    confident[:, 1] = 0.01
    assert segmentation_score(confident) == pytest.approx(0.0, abs=1e-9)
    # a 4x4 object (1 % of the pixels) on which the passes disagree completely
    small = confident.copy()
    small[:3, :, :4, :4] = np.array([0.0, 1.0])[:, None, None]
    small[3:, :, :4, :4] = np.array([1.0, 0.0])[:, None, None]
    ent, mi = pixel_maps(small)
    assert mi[0, 0] == pytest.approx(1.0) and mi[20, 20] == pytest.approx(0.0, abs=1e-9)
    # everything mildly doubtful: passes 0.6/0.4 vs 0.4/0.6 everywhere
    mild = np.zeros((T, C, H, W))
    mild[:3, 0], mild[:3, 1], mild[3:, 0], mild[3:, 1] = 0.6, 0.4, 0.4, 0.6
    assert segmentation_score(small) > segmentation_score(mild)  # the top-5 % mean keeps the small object
    assert segmentation_score(small, SegmentationCfg(top_percent=100)) < segmentation_score(mild, SegmentationCfg(top_percent=100))
    assert segmentation_score(small) == pytest.approx(np.sort(mi.ravel())[-80:].mean())  # 5 % of 1600 = 80


def test_segmentation_measure_option_and_logits_entry_point():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 3, 16, 16))
    probs = probs_from_logits(logits)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    assert segmentation_score_from_logits(logits) == pytest.approx(segmentation_score(probs))
    ent = segmentation_score(probs, SegmentationCfg(measure="entropy"))
    mi = segmentation_score(probs, SegmentationCfg(measure="bald"))
    assert ent >= mi  # predictive entropy bounds the mutual information
    one = probs_from_logits(rng.normal(size=(5, 1, 4, 4)))  # sigmoid segmenter
    assert one.shape == (5, 2, 4, 4)
    with pytest.raises(ConfigError, match="bald, entropy"):
        SegmentationCfg(measure="margin")
    with pytest.raises(ConfigError):
        SegmentationCfg(top_percent=0)


def test_segmentation_torch_matches_numpy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 3, 12, 10)).astype(np.float32)
    a = segmentation_score_from_logits(logits)
    b = segmentation_score_from_logits(torch.from_numpy(logits))
    assert b == pytest.approx(a, abs=1e-5)
    v = rng.random((2, 10, 10))
    np.testing.assert_allclose(top_percent_mean(torch.from_numpy(v), 7).numpy(), top_percent_mean(v, 7))
