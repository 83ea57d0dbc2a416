"""neighbors and duplicates: through the CLI on imported vectors with known geometry and
on a tiny random-weight open_clip index, checked against brute-force numpy."""
import csv
import json
import shutil

import numpy as np
import pytest

from novelty import inspect
from novelty.store import open_store
from tests.conftest import TINY, TINY_WIDE, copy_samples, run, unit



def import_split(idx, tmp, name, X, ids, split):
    np.save(tmp / f"{name}.npy", X.astype(np.float32))
    (tmp / f"{name}.txt").write_text("\n".join(ids))
    r = run("import-embeddings", tmp / f"{name}.npy", "--ids", tmp / f"{name}.txt", "--split", split, "--index", idx)
    assert r.exit_code == 0, r.output


@pytest.fixture
def vec_index(tmp_path):
    """40 labeled and 160 unlabeled 16-d vectors; some near-copy groups, a few of them
    reaching into the labeled set. -> (index, ids, stored vectors renormalised in float64, splits)."""
    rng = np.random.default_rng(3)
    lab, pool = unit(rng.normal(size=(40, 16))), unit(rng.normal(size=(160, 16)))
    for g in range(8):  # near-copies (cosine distance ~1e-3) of pool[g*10] inside the pool
        for j in range(1, 1 + g % 4):
            pool[g * 10 + j] = unit(pool[g * 10] + 0.03 * rng.normal(size=(1, 16)))[0]
    for g in range(3):  # near-copies of labeled images in the pool
        pool[100 + g] = unit(lab[g] + 0.03 * rng.normal(size=(1, 16)))[0]
    pool[103] = unit(lab[0] + 0.03 * rng.normal(size=(1, 16)))[0]
    idx = tmp_path / "idx"
    import_split(idx, tmp_path, "lab", lab, [f"l{i:03d}" for i in range(40)], "labeled")
    import_split(idx, tmp_path, "pool", pool, [f"p{i:03d}" for i in range(160)], "unlabeled")
    with open_store(idx) as st:
        ids, X = st.vectors()
        meta = st.describe(ids)
    names = np.array([meta[i][0] for i in ids.tolist()])
    return idx, names, unit(X), np.array([meta[i][2] for i in ids.tolist()])  # the renormalised rows every path uses


def test_neighbors_by_id_match_numpy(vec_index):
    idx, names, X, split = vec_index
    for q, scope in [("p005", "all"), ("p100", "labeled"), ("l007", "unlabeled"), ("l002", "labeled")]:
        r = run("neighbors", q, "--k", 7, "--split", scope, "--index", idx, "--json")
        assert r.exit_code == 0, r.output
        got = json.loads(r.output)
        qi = int(np.flatnonzero(names == q)[0])
        D = 1 - X @ X[qi]
        ok = np.ones(len(names), bool) if scope == "all" else split == scope
        ok[qi] = False  # the query itself is left out
        want = np.flatnonzero(ok)[np.argsort(D[ok], kind="stable")][:7]
        assert [h["id"] for h in got["neighbors"]] == names[want].tolist()
        np.testing.assert_allclose([h["distance"] for h in got["neighbors"]], D[want], atol=1e-5)
        assert all(h["split"] == scope for h in got["neighbors"]) or scope == "all"
        assert got["query"]["kind"] == "indexed" and got["query"]["id"] == q
    r = run("neighbors", "p100", "--k", 3, "--index", idx)  # the table
    lines = r.output.splitlines()
    assert r.exit_code == 0 and lines[1].split()[:3] == ["rank", "distance", "split"] and len(lines) == 5
    assert lines[2].split()[3] == "l000" and lines[2].split()[4] == "-"  # imported: no path


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["nope"], "'nope' is neither an id or path in the index nor an image file", 2),
        ([], "give QUERY (an id, a path or an image file) or --text", 2),
        (["p001", "--text", "a cat"], "give either QUERY", 2),
        (["--text", "a cat"], "holds imported vectors", 2),
        (["TESTFILE"], "holds imported vectors", 2),
        (["p001", "--k", "0"], "--k must be >= 1", 2),
    ],
)
def test_neighbors_bad_input(vec_index, args, message, code):
    idx = vec_index[0]
    args = [str(TINY) if a == "TESTFILE" else a for a in args]  # an existing file that is not in the index
    r = run("neighbors", *args, "--index", idx)
    assert r.exit_code == code and message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output


@pytest.fixture(scope="module")
def image_index(tmp_path_factory, sample_dir):
    """A tiny-clip index of 8 labeled and 12 unlabeled sample images."""
    tmp = tmp_path_factory.mktemp("img")
    copy_samples(tmp, sample_dir, 8, 12)
    idx = tmp / "idx"
    r = run("build-index", "--index", idx, "--model", TINY, "--pretrained", "none", "--device", "cpu",
            "--labeled", tmp / "labeled", "--unlabeled", tmp / "unlabeled")
    assert r.exit_code == 0, r.output
    return idx, tmp


def test_neighbors_by_path_new_image_and_text(image_index, tmp_path):
    idx, src = image_index
    with open_store(idx) as st:
        ids, X = st.vectors()
        paths = {i: p for i, (_, p, _) in st.describe(ids).items()}
    X = X.astype(np.float64)
    target = sorted((src / "unlabeled").glob("*.jpg"))[3]
    r = run("neighbors", target, "--k", 5, "--index", idx, "--json", "--model", TINY)
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    qi = [i for i, p in paths.items() if p == str(target)][0]
    D = 1 - X @ X[list(ids).index(qi)]
    order = [int(ids[j]) for j in np.argsort(D) if ids[j] != qi][:5]
    assert [h["path"] for h in got["neighbors"]] == [paths[i] for i in order]
    # the same image under a new name is embedded on the fly: its nearest is the original
    copy = tmp_path / "copy.jpg"
    shutil.copy(target, copy)
    r = run("neighbors", copy, "--k", 3, "--index", idx, "--json", "--model", TINY)
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert got["query"]["kind"] == "image" and got["neighbors"][0]["path"] == str(target)
    assert got["neighbors"][0]["distance"] < 2e-3
    # a text prompt through the CLIP text tower, against numpy
    from novelty.config import EncoderCfg
    from novelty.encoder import create_encoder

    t = create_encoder(EncoderCfg(TINY, "none", "cpu")).encode_text(["a photo of a forest"])[0].astype(np.float64)
    r = run("neighbors", "--text", "a photo of a forest", "--k", 4, "--split", "labeled", "--index", idx, "--json", "--model", TINY)
    assert r.exit_code == 0, r.output
    lab = [j for j in range(len(ids)) if "/labeled/" in paths[int(ids[j])]]
    Dt = 1 - X[lab] @ t
    got = json.loads(r.output)["neighbors"]
    np.testing.assert_allclose([h["distance"] for h in got], np.sort(Dt)[:4], atol=1e-4)


def test_neighbors_refuse_another_model(image_index, tmp_path):
    idx, src = image_index
    copy = tmp_path / "q.jpg"
    shutil.copy(sorted((src / "labeled").glob("*.jpg"))[0], copy)
    r = run("neighbors", copy, "--index", idx, "--model", TINY_WIDE)
    assert r.exit_code == 3 and "tiny-clip" in r.output and "dim 32" in r.output and "dim 48" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    # a manifest naming a model open_clip does not know: say how to pass its config file
    other = tmp_path / "idx"
    shutil.copytree(idx, other)
    m = json.loads((other / "manifest.json").read_text())
    m["encoder"]["model"] = "mystery-net"
    m["encoder"].pop("model_config", None)
    (other / "manifest.json").write_text(json.dumps(m))
    r = run("neighbors", "--text", "x", "--index", other)
    assert r.exit_code == 4 and "pass --model PATH.json" in r.output, r.output


# ----------------------------------------------------------------------- duplicates
def brute_groups(X, threshold, scope_mask):
    """All pairs, then a plain union-find: the sets of indices in groups of 2+."""
    pos = np.flatnonzero(scope_mask)
    D = 1 - X[pos] @ X[pos].T
    parent = list(range(len(pos)))

    def find(a):
        while parent[a] != a:
            a = parent[a]
        return a

    for a, b in zip(*np.nonzero(np.triu(D < threshold, 1))):
        parent[find(a)] = find(b)
    groups = {}
    for a in range(len(pos)):
        groups.setdefault(find(a), set()).add(int(pos[a]))
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def read_groups(path, names):
    where = {n: i for i, n in enumerate(names)}
    groups = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            groups.setdefault(row["group"], set()).add(where[row["id"]])
    return groups


@pytest.mark.parametrize("scope", ["all", "unlabeled"])
def test_duplicates_match_brute_force(vec_index, tmp_path, scope):
    idx, names, X, split = vec_index
    out = tmp_path / "dups.csv"
    r = run("duplicates", "--index", idx, "--out", out, "--split", scope)
    assert r.exit_code == 0, r.output
    mask = np.ones(len(names), bool) if scope == "all" else split == "unlabeled"
    want = brute_groups(X, 0.05, mask)
    got = read_groups(out, names)
    assert {frozenset(g) for g in got.values()} == want
    sizes = [len(got[k]) for k in sorted(got, key=int)]
    assert sizes == sorted(sizes, reverse=True)  # group 1 is the largest
    pool = split == "unlabeled"
    in_groups = set().union(*want)
    share = sum(pool[i] for i in in_groups) / pool.sum()
    assert f"{len(want)} near-duplicate group(s)" in r.output and f"{100 * share:.1f}% of 160 unlabeled" in r.output
    if scope == "all":  # p100..p103 are near-copies of labeled images
        represented = sum(pool[i] for g in want if any(split[j] == "labeled" for j in g) for i in g) / pool.sum()
        assert represented == pytest.approx(4 / 160)
        assert f"already labeled  {100 * represented:.1f}% of the 160 unlabeled images share a group" in r.output
    else:
        assert "already labeled" not in r.output


@pytest.mark.parametrize("method", ["screen", "faiss"])
def test_duplicates_blockwise_on_chains_match_brute_force(tmp_path, method):
    """Dense clusters, thresholds at gaps in the pair distances, tiny blocks: components
    that only connect through chains spread over many blocks."""
    rng = np.random.default_rng(7)
    C = rng.normal(size=(6, 8))
    X = unit(C[rng.integers(0, 6, 150)] + 0.35 * rng.normal(size=(150, 8)))
    idx = tmp_path / "idx"
    import_split(idx, tmp_path, "a", X[:50], [f"a{i}" for i in range(50)], "labeled")
    import_split(idx, tmp_path, "b", X[50:], [f"b{i}" for i in range(100)], "unlabeled")
    with open_store(idx) as st:
        ids, V = st.vectors()
        V = V.astype(np.float64)
        d = np.sort((1 - V @ V.T)[np.triu_indices(len(V), 1)])
        gaps = np.flatnonzero(np.diff(d) > 1e-4)
        for q in (0.002, 0.01, 0.03):
            g = gaps[np.searchsorted(gaps, int(q * len(d)))]
            t = float((d[g] + d[g + 1]) / 2)
            res = inspect.find_duplicates(st, inspect.DuplicatesCfg(threshold=t, chunk=40, block=7, method=method))
            pos = np.searchsorted(ids, res.image)
            got = {}
            for p, k in zip(pos.tolist(), res.group.tolist()):
                got.setdefault(k, set()).add(p)
            want = brute_groups(V, t, np.ones(len(V), bool))
            assert {frozenset(s) for s in got.values()} == want and len(want) > 1
            assert res.summary["largest"] == max(len(s) for s in want)


@pytest.mark.parametrize("d, spread", [(512, 0.02), (512, 0.12), (37, 0.3)])
def test_screened_pairs_equal_float32_pairs(d, spread):
    """The bf16 screen with its error window finds exactly the pairs a float32 scan finds:
    near-copies (many pairs close to the threshold) and spread data, a diagonal block
    (i < j only) and a rectangular one, thresholds placed among the pair distances."""
    from novelty._closepairs import faiss_pairs, screen_pairs

    rng = np.random.default_rng(d)
    C = rng.normal(size=(40, d))
    X = (C[rng.integers(0, 40, 900)] + spread * rng.normal(size=(900, d))).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    X = X.astype(np.float16).astype(np.float32)  # stored rows: float16, not exactly unit
    S = np.sort((X.astype(np.float64) @ X.T.astype(np.float64))[np.triu_indices(900, 1)])
    gaps = np.flatnonzero(np.diff(S) > 3e-6)  # thresholds in gaps: no pair within float noise
    for q in (0.001, 0.01, 0.05):
        g = gaps[min(np.searchsorted(gaps, int((1 - q) * len(S))), len(gaps) - 1)]
        s_min = float(S[g + 1] - 2e-6)  # a pair just above the threshold: the screen must keep it
        for Q, D, upper in ((X, X, True), (X[:300], X[300:], False)):
            i, j, sim = screen_pairs(Q, D, s_min, block=128, upper=upper)
            ref = Q @ D.T > np.float32(s_min)
            if upper:
                ref = np.triu(ref, 1)
            wi, wj = np.nonzero(ref)
            assert len(wi) > 0
            got = sorted(zip(i.tolist(), j.tolist()))
            assert got == sorted(zip(wi.tolist(), wj.tolist()))
            np.testing.assert_allclose(sim, np.einsum("ij,ij->i", Q[i], D[j]), rtol=0, atol=1e-6)
            fi, fj, _ = faiss_pairs(Q, D, s_min, block=128, upper=upper)
            assert sorted(zip(fi.tolist(), fj.tolist())) == got


def test_union_find_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(100):
        n, m = int(rng.integers(1, 50)), int(rng.integers(0, 70))
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        parent = np.arange(n)
        for s in range(0, m, 5):  # streamed in small pair lists
            inspect.union_pairs(parent, a[s:s + 5], b[s:s + 5])
        roots = inspect.components(parent)
        label = np.arange(n)
        for _ in range(n):
            for x, y in zip(a, b):
                label[x] = label[y] = min(label[x], label[y])
        assert all((roots[i] == roots[j]) == (label[i] == label[j]) for i in range(n) for j in range(n))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--threshold", "0"], "--threshold is a cosine distance in (0, 2]"),
        (["--threshold", "2.5"], "--threshold is a cosine distance in (0, 2]"),
        (["--out", "d.txt"], "duplicates are written as .csv"),
    ],
)
def test_duplicates_bad_input(vec_index, args, message):
    r = run("duplicates", "--index", vec_index[0], *args)
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_duplicates_without_index(tmp_path):
    r = run("duplicates", "--index", tmp_path / "none")
    assert r.exit_code == 3 and "no index at" in r.output



def test_neighbors_in_an_empty_split_says_so_without_a_table(tmp_path):
    np.save(tmp_path / "l.npy", np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32))
    (tmp_path / "l.txt").write_text("a\nb\nc\n")
    idx = tmp_path / "idx"
    assert run("import-embeddings", tmp_path / "l.npy", "--ids", tmp_path / "l.txt", "--split", "labeled",
               "--index", idx).exit_code == 0
    r = run("neighbors", "a", "--split", "unlabeled", "--index", idx)
    assert r.exit_code == 0 and "no embedded images in split unlabeled" in r.output and "rank" not in r.output, r.output
