"""scores: nearest labeled row (exact pruned, plain, approximate), default and covering
radius, checked against a float64 brute force written here."""
import numpy as np
import pytest

from novelty import scores
from novelty._clusters import cluster_pool
from novelty._firstpass import Results, nearest_pruned
from novelty._rows import row_inv_norms, unit_float32, unit_rows
from novelty.errors import ConfigError
from novelty.scores import NearestCfg, covering_radius, default_radius, nearest_labeled, nearest_recall

TIE = 1e-6  # float32 rounding: candidates closer than this may come back in either order


def clustered(n, d, k, seed, spread=0.35, novel=0):
    """float16 unit rows around k centres; rows of the last `novel` centres only in `pool`."""
    rng = np.random.default_rng(seed)
    C = rng.normal(size=(k, d))
    X = C[rng.integers(0, k, n)] + spread * rng.normal(size=(n, d))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float16)


def split(n, m, d, k, seed, novel=0.2):
    """A pool and a labeled set from the same centres, the labeled set missing some."""
    rng = np.random.default_rng(seed)
    C = rng.normal(size=(k, d))
    known = k - int(novel * k)
    P = C[rng.integers(0, k, n)] + 0.35 * rng.normal(size=(n, d))
    L = C[rng.integers(0, known, m)] + 0.35 * rng.normal(size=(m, d))
    u = lambda X: (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float16)
    return u(P), u(L)


def brute(pool, lab, radius=None):
    """float64 products of the unit float32 rows every path sees."""
    S = unit_float32(pool).astype(np.float64) @ unit_float32(lab).astype(np.float64).T
    D = 1 - S
    count = (D <= radius).sum(axis=1) if radius is not None else None
    return D, count


def check_nearest(res, D, count=None, radius=None):
    best = D.min(axis=1)
    np.testing.assert_allclose(res.dist, np.maximum(best, 0), atol=2e-6)
    got = D[np.arange(len(D)), res.idx]
    assert (got <= best + TIE).all()  # the index points at a nearest row...
    clear = (np.sort(D, axis=1)[:, 1] - best > TIE) if D.shape[1] > 1 else np.ones(len(D), bool)
    np.testing.assert_array_equal(res.idx[clear], D.argmin(axis=1)[clear])  # ...the brute one without a near-tie
    if count is not None:
        near_edge = (np.abs(D - radius) < TIE).any(axis=1)
        np.testing.assert_array_equal(res.count[~near_edge], count[~near_edge])


def test_unit_rows_are_the_same_in_any_block():
    X = clustered(1000, 48, 5, 0)
    inv = row_inv_norms(X, block=97)
    np.testing.assert_array_equal(inv, row_inv_norms(X))
    whole = unit_rows(X, inv)
    idx = np.array([999, 3, 500, 3])
    np.testing.assert_array_equal(unit_rows(X, inv, idx), whole[idx])
    np.testing.assert_array_equal(unit_rows(X, inv, slice(10, 20)), whole[10:20])
    np.testing.assert_array_equal(unit_float32(X[10:20]), whole[10:20])
    assert whole.dtype == np.float32 and np.allclose(np.linalg.norm(whole, axis=1), 1, atol=1e-6)


@pytest.mark.parametrize("method", ["pruned", "plain", "auto"])
@pytest.mark.parametrize("data", ["clustered", "random"])
def test_nearest_exact_matches_brute_force(method, data):
    if data == "clustered":
        pool, lab = split(4000, 600, 64, 40, seed=1)
    else:
        rng = np.random.default_rng(2)
        pool, lab = (rng.normal(size=(4000, 64)).astype(np.float16), rng.normal(size=(600, 64)).astype(np.float16))
    r = 0.3
    res = nearest_labeled(pool, lab, radius=r, cfg=NearestCfg(method=method, cluster_size=64))
    D, count = brute(pool, lab, r)
    assert res.dist.dtype == np.float32 and res.idx.dtype == np.int64 and res.count.dtype == np.int32
    check_nearest(res, D, count, r)


@pytest.mark.parametrize("cfg", [NearestCfg(method="plain"), NearestCfg(method="pruned", cluster_size=48),
                                 NearestCfg(approximate=True, nlist=16, nprobe=4)], ids=["plain", "pruned", "ivf"])
def test_progress_is_told_every_row_once_and_changes_nothing(cfg):
    """The first pass tells a progress bar the rows it settles: n in all, in several steps
    (the pruned search: rows its bounds settle, then the screened ones), same result."""
    pool, lab = split(20000, 400, 32, 60, seed=3, novel=0.3)
    told = []
    quiet = nearest_labeled(pool, lab, radius=0.2, cfg=cfg)
    res = nearest_labeled(pool, lab, radius=0.2, cfg=cfg, progress=told.append)
    assert sum(told) == len(pool) and len(told) > 1 and min(told) >= 0
    np.testing.assert_array_equal(res.dist, quiet.dist)
    np.testing.assert_array_equal(res.idx, quiet.idx)
    np.testing.assert_array_equal(res.count, quiet.count)
    told.clear()
    nearest_labeled(pool, lab[:0], cfg=cfg, progress=told.append)  # no labeled rows: all settled at once
    assert told == [len(pool)]


def test_pruned_search_uses_both_bounds_and_screen():
    pool, lab = split(5000, 800, 64, 50, seed=3, novel=0.3)
    inv = row_inv_norms(pool)
    cl = cluster_pool(pool, inv, 48)
    res = Results(len(pool), True)
    stats = nearest_pruned(pool, inv, unit_float32(lab), cl, 0.2, res)
    assert 0 < stats["pruned_pairs_share"] < 0.5  # the bounds settled rows near the labeled set
    assert 0 < stats["screened_rows_share"] < 1  # the novel rows went through the screen
    assert stats["recomputed_per_screened_row"] < 20  # its window is narrow
    D, count = brute(pool, lab, 0.2)
    res = scores.NearestResult(np.maximum(1 - res.sim, 0), res.idx, res.count)
    check_nearest(res, D, count, 0.2)


def test_screen_only_on_unclustered_rows_is_exact():
    """Rows through the bf16 screen only: its window keeps them exact, near-ties included
    (the rows are near one point, so many labeled rows sit at almost the same similarity)."""
    rng = np.random.default_rng(4)
    lab = rng.normal(size=(700, 32)).astype(np.float16)
    base = rng.normal(size=(1, 32))
    pool = (base + 1e-3 * rng.normal(size=(3000, 32))).astype(np.float16)  # all near one point
    inv = row_inv_norms(pool)
    cl = cluster_pool(pool, inv, 3000)
    res = Results(len(pool), False)
    stats = nearest_pruned(pool, inv, unit_float32(lab), cl, None, res, screen_all=True)
    assert stats["screened_rows_share"] == 1.0
    D, _ = brute(pool, lab)
    check_nearest(scores.NearestResult(np.maximum(1 - res.sim, 0), res.idx, None), D)


def test_ties_go_to_the_lower_labeled_index():
    rng = np.random.default_rng(5)
    lab = rng.normal(size=(300, 16)).astype(np.float16)
    lab = np.concatenate([lab, lab])  # every labeled row twice
    pool = np.concatenate([lab[:200], rng.normal(size=(2000, 16)).astype(np.float16)])
    for method in ("pruned", "plain"):
        res = nearest_labeled(pool, lab, radius=1e-6, cfg=NearestCfg(method=method, cluster_size=32))
        assert (res.idx < 300).all()
        np.testing.assert_array_equal(res.idx[:200], np.arange(200))
        assert (res.dist[:200] <= 1e-6).all() and (res.count[:200] == 2).all()  # float32: x.x = 1 +- 1e-7


def test_no_labeled_rows_and_empty_pool():
    pool = clustered(50, 8, 3, 0)
    res = nearest_labeled(pool, np.zeros((0, 8), np.float16), radius=0.1)
    assert np.isinf(res.dist).all() and (res.idx == -1).all() and (res.count == 0).all()
    res = nearest_labeled(np.zeros((0, 8), np.float16), pool)
    assert len(res.dist) == 0 and res.count is None


def test_bad_arguments():
    pool = clustered(50, 8, 3, 0)
    with pytest.raises(ConfigError, match="dims"):
        nearest_labeled(pool, clustered(5, 9, 1, 0))
    with pytest.raises(ConfigError, match="radius"):
        nearest_labeled(pool, pool, radius=3.0)
    with pytest.raises(ConfigError, match="method"):
        nearest_labeled(pool, pool, cfg=NearestCfg(method="fast"))


def test_approximate_recall_is_measured():
    pool, lab = split(4000, 1500, 32, 30, seed=6)
    r = nearest_recall(pool, lab, NearestCfg(approximate=True, nlist=32, nprobe=32), sample=1000)
    assert r["recall"] == 1.0 and r["sample"] == 1000  # every list probed: exact
    r = nearest_recall(pool, lab, NearestCfg(approximate=True, nlist=64, nprobe=1), sample=1000)
    assert 0.3 < r["recall"] <= 1.0 and r["max_dist_error"] >= 0
    res = nearest_labeled(pool, lab, radius=0.2, cfg=NearestCfg(approximate=True, nlist=32, nprobe=32))
    D, count = brute(pool, lab, 0.2)
    check_nearest(res, D)
    assert res.approximate and np.abs(res.count - count).max() <= 1


def test_default_radius_is_the_leave_one_out_quantile():
    lab = clustered(800, 32, 10, 7)
    D, _ = brute(lab, lab)
    np.fill_diagonal(D, np.inf)
    want = np.quantile(np.maximum(D.min(axis=1), 0), 0.05)
    assert default_radius(lab) == pytest.approx(want, abs=1e-6)
    assert default_radius(lab, quantile=0.5) == pytest.approx(np.quantile(D.min(axis=1), 0.5), abs=1e-6)
    sampled = default_radius(lab, max_sample=200, seed=3)
    assert sampled == default_radius(lab, max_sample=200, seed=3)  # seeded
    assert abs(sampled - want) < 0.05
    dup = np.concatenate([lab, lab[:1]])
    assert default_radius(dup, quantile=0.0) == 0.0  # a duplicate is a neighbour at 0
    assert default_radius(lab[:1]) == 0.0 and default_radius(lab[:0]) == 0.0


def test_covering_radius():
    pool, lab = split(600, 50, 16, 8, seed=8)
    D, _ = brute(pool, lab)
    assert covering_radius(pool, lab) == pytest.approx(max(D.min(axis=1).max(), 0), abs=2e-6)
    picks = np.array([5, 17, 300])
    Dp, _ = brute(pool, pool[picks])
    want = np.minimum(D.min(axis=1), Dp.min(axis=1)).max()
    assert covering_radius(pool, lab, picks) == pytest.approx(want, abs=2e-6)
    near = nearest_labeled(pool, lab)
    assert covering_radius(pool, lab, picks, nearest_dist=near.dist) == pytest.approx(want, abs=2e-6)
    assert covering_radius(pool, lab[:0]) == np.inf


def test_bf16_rounding_and_padded_products():
    import torch

    from novelty._firstpass import Screen
    from novelty._rows import bf16_bits, bf16_mm, bf16_value

    rng = np.random.default_rng(11)
    for shape in [(7, 33), (300, 512)]:  # the numpy path and the torch path
        X = (rng.normal(size=shape) * 0.05).astype(np.float32)
        want = torch.from_numpy(X).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(bf16_bits(X), want)
        assert np.abs(bf16_value(bf16_bits(X)) - X).max() <= 2.0 ** -8 * np.abs(X).max()
    A, B = bf16_bits(rng.normal(size=(37, 64))), bf16_bits(rng.normal(size=(50, 64)))
    direct = torch.from_numpy(A).view(torch.bfloat16) @ torch.from_numpy(B).view(torch.bfloat16).T
    assert torch.equal(bf16_mm(A, B), direct) and torch.equal(bf16_mm(A, B, pad_b=True), direct)
    # the screen's bound on centroid . labeled products holds, and is tight
    Y = unit_float32(rng.normal(size=(400, 64)).astype(np.float16))
    M = rng.normal(size=(30, 64))
    M = (M / np.linalg.norm(M, axis=1, keepdims=True) * rng.uniform(0.1, 1, (30, 1))).astype(np.float32)  # centroids
    up = Screen(Y, None, None).dot_upper(M)
    exact = M.astype(np.float64) @ Y.astype(np.float64).T
    assert (up >= exact).all() and (up - exact).max() < 0.03
