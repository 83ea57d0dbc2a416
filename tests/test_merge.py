"""build-index --part K/N on "several machines" and merge: the parts split the images
between them, and the merged index holds what one build of everything holds, vector for
vector; a merge resumes after a kill and never adds a row twice."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from novelty.merge import merge_indexes
from novelty.sources import in_part, parse_part
from novelty.store import GONE, open_store
from tests.conftest import TINY, TINY_WIDE, run

ENC = ("--model", TINY, "--pretrained", "none", "--device", "cpu", "--workers", 0)


def build(idx, sample_dir, *extra, model=TINY):
    r = run("build-index", "--labeled", sample_dir / "labeled", "--unlabeled", sample_dir / "unlabeled",
            "--model", model, "--pretrained", "none", "--device", "cpu", "--workers", 0, "--index", idx, *extra)
    assert r.exit_code == 0, r.output
    return r


def catalog(idx) -> dict[str, tuple]:
    """path -> (split, status, reason, hash, vector or None)."""
    with open_store(idx) as st:
        rows = st.db.execute("SELECT id, path, split, status, reason, hash FROM images").fetchall()
        ids, X = st.vectors()
    vec = dict(zip(ids.tolist(), np.asarray(X, np.float32)))
    return {p: (sp, status, reason, h, vec.get(i)) for i, p, sp, status, reason, h in rows}


@pytest.fixture(scope="module")
def parts(tmp_path_factory, sample_dir):
    tmp = tmp_path_factory.mktemp("merge")
    build(tmp / "whole", sample_dir)
    for k in (1, 2, 3):
        build(tmp / f"p{k}", sample_dir, "--part", f"{k}/3")
    return tmp


def test_parts_split_the_images_by_path(parts):
    whole = catalog(parts / "whole")
    got = [set(catalog(parts / f"p{k}")) for k in (1, 2, 3)]
    assert set.union(*got) == set(whole) and sum(map(len, got)) == len(whole)  # disjoint, and all of them
    assert all(len(g) for g in got)
    for k, g in zip((1, 2, 3), got):
        assert all(in_part(p, (k, 3)) for p in g)


def test_merged_parts_equal_one_build_of_everything(parts, tmp_path):
    out = tmp_path / "all"
    r = run("merge", parts / "p2", parts / "p1", parts / "p3", "--index", out)
    assert r.exit_code == 0, r.output
    whole, merged = catalog(parts / "whole"), catalog(out)
    assert set(merged) == set(whole)
    for path, (split, status, reason, h, v) in whole.items():
        m = merged[path]
        assert m[:4] == (split, status, reason, h), path
        if v is None:
            assert m[4] is None
        else:  # the same image through the same encoder, in other batches: equal to float16 rounding
            np.testing.assert_allclose(m[4], v, atol=2e-3)
    n_lab = sum(1 for s, st, *_ in whole.values() if s == "labeled" and st == "embedded")
    assert f"index {out}: {n_lab} labeled" in r.output and "warning" not in r.output
    # the FAISS index is current and finds each vector's own image first
    with open_store(out) as st:
        from novelty import vectors

        assert vectors.is_current(st)
    r = run("select", "--budget", 5, "--index", out, "--out", tmp_path / "sel.csv")
    assert r.exit_code == 0, r.output
    # merging again takes nothing: the parts are unchanged since, so the history keeps one line per part
    assert run("merge", parts / "p1", parts / "p2", parts / "p3", "--index", out).exit_code == 0
    s = merge_indexes(out, [parts / "p1", parts / "p2", parts / "p3"])
    assert [(p.unchanged, p.added, p.shards) for p in s.parts] == [(True, 0, 0)] * 3
    assert catalog(out).keys() == merged.keys()
    info = run("info", "--index", out).output
    assert info.count("  merge  ") == 3 and "(part 2/3)" in info and "interrupted" not in info


def test_a_missing_part_is_named(parts, tmp_path):
    r = run("merge", parts / "p1", parts / "p3", "--index", tmp_path / "all")
    assert r.exit_code == 0 and "warning: part(s) 2/3 are not merged yet" in r.output, r.output


def merged_parts(idx) -> set[str]:
    """The parts whose fingerprint the index records."""
    with open_store(idx) as st:
        return {k.removeprefix("merged:") for (k,) in st.db.execute("SELECT key FROM meta WHERE key LIKE 'merged:%'")}


def test_a_killed_merge_resumes(parts, tmp_path, monkeypatch):
    from novelty.store import Store

    out = tmp_path / "all"
    real, calls = Store.write_shard_file, []

    def dies_on_the_second_shard(self, name, vectors):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is killed while it copies part 2's shard
        return real(self, name, vectors)

    monkeypatch.setattr(Store, "write_shard_file", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        merge_indexes(out, [parts / "p1", parts / "p2", parts / "p3"])
    monkeypatch.setattr(Store, "write_shard_file", real)
    after_kill = catalog(out)
    assert set(after_kill) == set(catalog(parts / "p1"))  # part 1 in, part 2 not at all
    assert merged_parts(out) == {str((parts / "p1").resolve())}  # only a committed part has its fingerprint
    s = merge_indexes(out, [parts / "p1", parts / "p2", parts / "p3"])
    assert [p.unchanged for p in s.parts] == [True, False, False]
    assert set(catalog(out)) == set(catalog(parts / "whole"))
    assert merged_parts(out) == {str((parts / f"p{k}").resolve()) for k in (1, 2, 3)}
    with open_store(out) as st:  # every shard file is one the catalog knows
        known = {n for (n,) in st.db.execute("SELECT name FROM shards")}
    assert {f.stem for f in (out / "shards").glob("*.npy")} == known


def test_labeled_and_embedded_win(parts, tmp_path, sample_dir):
    """An image unlabeled (or failed) in the target and labeled (or embedded) in a part."""
    out = tmp_path / "all"
    shutil.copytree(parts / "p1", out)
    with open_store(out, writable=True) as st:
        a, b = st.db.execute("SELECT id FROM images WHERE status='embedded' AND split='unlabeled' LIMIT 2").fetchall()
        with st.transaction() as db:
            db.execute("UPDATE images SET status='failed', reason='truncated', shard=NULL, row=NULL WHERE id=?", a)
            db.execute("UPDATE images SET split='labeled' WHERE id=?", b)  # labeled here, so nothing to move
        pa = st.path_of(a[0])
    src = tmp_path / "src"
    shutil.copytree(parts / "p1", src)
    with open_store(src, writable=True) as st:
        c = st.db.execute("SELECT id FROM images WHERE status='embedded' AND split='unlabeled' AND id NOT IN (?, ?) LIMIT 1",
                          (a[0], b[0])).fetchone()
        with st.transaction() as db:
            db.execute("UPDATE images SET split='labeled' WHERE id=?", c)
        pc = st.path_of(c[0])
    r = run("merge", src, "--index", out)
    assert r.exit_code == 0 and "1 replaced" in r.output and "1 moved to labeled" in r.output, r.output
    got = catalog(out)
    assert got[pa][1] == "embedded" and got[pa][2] is None and got[pa][4] is not None
    assert got[pc][0] == "labeled"
    assert len(got) == len(catalog(parts / "p1"))


def test_parts_of_a_list_file_split_it_the_way_its_folders_do(parts, tmp_path, sample_dir):
    """A list of relative paths (read against the list's folder) splits like the folders: by absolute path."""
    (tmp_path / "lists").mkdir()
    rel = [os.path.relpath(p, tmp_path / "lists") for p in sorted((sample_dir / "unlabeled").iterdir())]
    (tmp_path / "lists" / "u.txt").write_text("\n".join(rel) + "\n")
    for k in (1, 2, 3):
        r = run("build-index", "--labeled", sample_dir / "labeled", "--unlabeled", tmp_path / "lists" / "u.txt", *ENC,
                "--part", f"{k}/3", "--index", tmp_path / f"l{k}")
        assert r.exit_code == 0, r.output
        assert set(catalog(tmp_path / f"l{k}")) == set(catalog(parts / f"p{k}"))


@pytest.mark.parametrize("text", ["0/3", "4/3", "3", "a/b", "1/0", "-1/2", "1/2/3"])
def test_bad_part_values(text, tmp_path, sample_dir):
    r = run("build-index", "--labeled", sample_dir / "labeled", *ENC, "--part", text, "--index", tmp_path / "i")
    assert r.exit_code == 2 and "--part must be K/N" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "i").exists()


def test_parse_part():
    assert parse_part("2/8") == (2, 8) and parse_part("1/1") == (1, 1)


def test_bad_merges_change_nothing(parts, tmp_path, sample_dir):
    wide = tmp_path / "wide"
    build(wide, sample_dir, "--part", "1/3", model=TINY_WIDE)
    out = tmp_path / "all"
    for args, code, words in (
        ((parts / "p1", wide), 3, "different encoders"),
        ((parts / "p1", tmp_path / "none"), 3, "no index"),
        ((parts / "p1", parts / "p1"), 2, "given twice"),
        ((out,), 2, "the target --index itself"),
    ):
        r = run("merge", *args, "--index", out)
        assert r.exit_code == code and words in r.output and len(r.output.strip().splitlines()) == 1, (args, r.output)
        assert not out.exists()
    assert run("merge", parts / "p1", "--index", out).exit_code == 0
    r = run("merge", wide, "--index", out)  # into an index of another encoder
    assert r.exit_code == 3 and "refusing vectors" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert set(catalog(out)) == set(catalog(parts / "p1"))


def two_parts_merged(tmp_path, sample_dir):
    """A copy of the sample images (to change), built as parts 1/2 and 2/2 into tmp_path/p1
    and p2, merged into tmp_path/all. -> (the copy, the merged index)."""
    src = tmp_path / "src"
    shutil.copytree(sample_dir, src)
    build(tmp_path / "p1", src, "--part", "1/2")
    build(tmp_path / "p2", src, "--part", "2/2")
    out = tmp_path / "all"
    assert run("merge", tmp_path / "p1", tmp_path / "p2", "--index", out).exit_code == 0
    return src, out


def test_a_rebuilt_part_brings_its_newer_vectors(tmp_path, sample_dir):
    src, out = two_parts_merged(tmp_path, sample_dir)
    mine = sorted(p for p in catalog(tmp_path / "p1") if "/unlabeled/unlabeled_" in p and p.endswith(".jpg"))
    other = sorted(p for p in catalog(tmp_path / "p2") if "/unlabeled/unlabeled_" in p and p.endswith(".jpg"))
    changed = mine[0]
    shutil.copyfile(other[-1], changed)  # new content for a file of part 1
    st = os.stat(changed)
    os.utime(changed, (st.st_atime, st.st_mtime + 10))
    assert "1 changed" in build(tmp_path / "p1", src, "--part", "1/2").output
    r = run("merge", tmp_path / "p1", "--index", out)
    assert r.exit_code == 0 and "1 replaced" in r.output and " 0 added" in r.output, r.output
    np.testing.assert_array_equal(catalog(out)[changed][4], catalog(tmp_path / "p1")[changed][4])
    assert catalog(out)[changed][3] == catalog(tmp_path / "p1")[changed][3] == catalog(tmp_path / "p2")[other[-1]][3]  # the new bytes
    # merging both again takes nothing: neither changed since, and the newer vector stays
    s = merge_indexes(out, [tmp_path / "p1", tmp_path / "p2"])
    assert [(p.unchanged, p.added, p.replaced) for p in s.parts] == [(True, 0, 0)] * 2
    np.testing.assert_array_equal(catalog(out)[changed][4], catalog(tmp_path / "p1")[changed][4])


def test_merged_indexes_merge_again_and_say_what_is_missing(parts, tmp_path):
    m = tmp_path / "m"
    r = run("merge", parts / "p1", parts / "p2", "--index", m)
    assert "warning: part(s) 3/3 are not merged yet" in r.output, r.output
    r = run("merge", m, parts / "p3", "--index", tmp_path / "mm")
    assert r.exit_code == 0 and "warning" not in r.output and "(part 1/3, 2/3)" in r.output, r.output
    assert set(catalog(tmp_path / "mm")) == set(catalog(parts / "whole"))
    r = run("merge", m, "--index", tmp_path / "mm2")
    assert "warning: part(s) 3/3 are not merged yet" in r.output, r.output


def test_an_unfinished_part_is_left_out_and_named(parts, tmp_path):
    p3 = tmp_path / "p3"
    shutil.copytree(parts / "p3", p3)
    with open_store(p3, writable=True) as st:
        with st.transaction() as db:
            n = db.execute("UPDATE images SET status='pending', shard=NULL, row=NULL WHERE id IN "
                           "(SELECT id FROM images WHERE status='embedded' LIMIT 4)").rowcount
    r = run("merge", parts / "p1", parts / "p2", p3, "--index", tmp_path / "all")
    assert r.exit_code == 0 and f"warning: {n} image(s) of {p3.resolve()} are not embedded yet" in r.output, r.output
    assert "part(s) 3/3 are not merged yet" in r.output
    with open_store(tmp_path / "all") as st:
        assert st.db.execute("SELECT COUNT(*) FROM images WHERE status='pending'").fetchone()[0] == 0
    assert len(catalog(tmp_path / "all")) == len(catalog(parts / "whole")) - n


@pytest.mark.parametrize("damage", ["short shard", "unlisted shard"])
def test_a_damaged_part_is_refused_in_one_line(parts, tmp_path, damage):
    bad = tmp_path / "bad"
    shutil.copytree(parts / "p1", bad)
    if damage == "short shard":
        f = next((bad / "shards").glob("*.npy"))
        np.save(f, np.load(f)[:3])
    else:
        with open_store(bad, writable=True) as st:
            with st.transaction() as db:
                db.execute("DELETE FROM shards")
    out = tmp_path / "all"
    assert run("merge", parts / "p2", "--index", out).exit_code == 0
    before = catalog(out)
    r = run("merge", bad, "--index", out)
    # found while merging, so after the progress bar: no traceback, and the error last
    assert r.exit_code == 3 and "Traceback" not in r.output, r.output
    assert r.output.strip().splitlines()[-1].startswith("novelty: error:") and "nothing of" in r.output
    assert catalog(out).keys() == before.keys()
    assert run("select", "--budget", 3, "--index", out, "--out", tmp_path / "s.csv").exit_code == 0


def test_an_image_under_an_id_and_a_path_is_not_merged_twice(tmp_path, sample_dir):
    files = sorted((sample_dir / "labeled").glob("*.jpg"))[:3]
    X = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    np.save(tmp_path / "v.npy", X)
    (tmp_path / "paths.txt").write_text("".join(f"{f}\n" for f in files))
    a, b = tmp_path / "a", tmp_path / "b"
    for idx, extra in ((a, ()), (b, ("--paths",))):  # a: the paths as plain ids; b: as paths
        r = run("import-embeddings", tmp_path / "v.npy", "--ids", tmp_path / "paths.txt", "--split", "unlabeled",
                "--model", "m", "--index", idx, *extra)
        assert r.exit_code == 0, r.output
    r = run("merge", b, "--index", a)
    assert r.exit_code == 0 and "warning: 3 image(s)" in r.output and "other kind of key" in r.output, r.output
    with open_store(a) as st:
        assert st.db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 3


SPEC = "tests._tiny_models:make_detector"


def score(idx, *extra):
    r = run("uncertainty", "--detector", SPEC, "--kind", "detection", "--passes", 3, "--image-size", 32, "--workers", 0,
            "--index", idx, *extra)
    assert r.exit_code == 0, r.output


def scores_by_path(idx) -> dict:
    from novelty.records import latest_uncertainty

    with open_store(idx) as st:
        u = latest_uncertainty(st)
        meta = st.describe(u.ids)
    return {meta[int(i)][1]: v for i, v in zip(u.ids.tolist(), u.values.tolist())}


def test_the_parts_uncertainty_scores_are_combined(parts, tmp_path):
    ps = []
    for k in (1, 2, 3):
        ps.append(tmp_path / f"p{k}")
        shutil.copytree(parts / f"p{k}", ps[-1])
        score(ps[-1])  # on each machine, its own part
    own = {path: v for p in ps for path, v in scores_by_path(p).items()}
    out = tmp_path / "all"
    r = run("merge", ps[0], ps[1], "--index", out)
    assert r.exit_code == 0 and "uncertainty:" in r.output, r.output
    assert scores_by_path(out) == {k: v for k, v in own.items() if k in scores_by_path(ps[0]) or k in scores_by_path(ps[1])}
    r = run("merge", ps[2], "--index", out)  # a later merge keeps the scores of the parts merged before
    assert r.exit_code == 0 and f"uncertainty: {len(own)} scores" in r.output, r.output
    assert scores_by_path(out) == own
    with open_store(out) as st:
        runs = st.db.execute("SELECT COUNT(*) FROM runs WHERE kind='uncertainty'").fetchone()[0]
    assert run("merge", *ps, "--index", out).exit_code == 0  # merged again: no new run
    with open_store(out) as st:
        assert st.db.execute("SELECT COUNT(*) FROM runs WHERE kind='uncertainty'").fetchone()[0] == runs
    r = run("select", "--budget", 5, "--index", out, "--out", tmp_path / "s.csv")
    assert r.exit_code == 0 and "with hybrid" in r.output and "no uncertainty score" not in r.output, r.output


def test_scores_of_other_settings_or_a_part_without_are_not_combined(parts, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for src, dst in ((parts / "p1", a), (parts / "p2", b), (parts / "p3", c)):
        shutil.copytree(src, dst)
    score(a)
    score(b, "--passes", 4)
    r = run("merge", a, b, "--index", tmp_path / "ab")
    assert r.exit_code == 0 and "different settings (passes: 3 in" in r.output and "uncertainty:" not in r.output, r.output
    r = run("merge", a, c, "--index", tmp_path / "ac")
    assert r.exit_code == 0 and f"{c.resolve()} has none" in r.output, r.output
    with open_store(tmp_path / "ac") as st:
        assert st.db.execute("SELECT COUNT(*) FROM runs WHERE kind='uncertainty'").fetchone()[0] == 0


def uncertainty_runs(idx) -> int:
    with open_store(idx) as st:
        return st.db.execute("SELECT COUNT(*) FROM runs WHERE kind='uncertainty'").fetchone()[0]


def test_merge_never_supersedes_the_indexs_own_run_nor_drops_scores(parts, tmp_path):
    ps = []
    for k in (1, 2, 3):
        ps.append(tmp_path / f"p{k}")
        shutil.copytree(parts / f"p{k}", ps[-1])
        score(ps[-1])
    out = tmp_path / "all"
    assert run("merge", ps[0], ps[1], "--index", out).exit_code == 0
    # p3 rescored with other settings: merging it alone would mix two rankings or drop p1's and p2's scores
    score(ps[2], "--passes", 4)
    before = scores_by_path(out)
    r = run("merge", ps[2], "--index", out)
    assert r.exit_code == 0 and "combines parts scored with other settings (passes: 3, now 4)" in r.output, r.output
    assert scores_by_path(out) == before
    for p in ps[:2]:  # rescored the same way, all three merge into one ranking
        score(p, "--passes", 4)
    r = run("merge", *ps, "--index", out)
    assert r.exit_code == 0 and "uncertainty:" in r.output, r.output
    assert scores_by_path(out) == {k: v for p in ps for k, v in scores_by_path(p).items()}
    # the index's own run, made after the merge, stays the one select uses
    score(out, "--passes", 5)
    n, own = uncertainty_runs(out), scores_by_path(out)
    r = run("merge", *ps, "--index", out)
    assert r.exit_code == 0 and "has its own uncertainty run" in r.output, r.output
    assert uncertainty_runs(out) == n and scores_by_path(out) == own


def test_an_unscored_part_after_a_combined_run_is_named(parts, tmp_path):
    a = tmp_path / "a"
    shutil.copytree(parts / "p1", a)
    score(a)
    out = tmp_path / "all"
    assert run("merge", a, "--index", out).exit_code == 0
    r = run("merge", parts / "p2", "--index", out)
    assert r.exit_code == 0 and f"{(parts / 'p2').resolve()} has none" in r.output, r.output


def test_a_score_follows_the_vector_it_was_computed_with(tmp_path, sample_dir):
    src = tmp_path / "src"
    shutil.copytree(sample_dir, src)
    build(tmp_path / "old", src, "--part", "1/2")
    score(tmp_path / "old")
    mine = sorted(p for p in scores_by_path(tmp_path / "old") if p.endswith(".jpg"))
    other = sorted(p for p in (src / "unlabeled").glob("*.jpg") if str(p) not in mine)
    changed = mine[0]
    shutil.copyfile(other[-1], changed)
    st = os.stat(changed)
    os.utime(changed, (st.st_atime, st.st_mtime + 10))
    build(tmp_path / "new", src, "--part", "1/2")  # a fresh build of the changed files, scored again
    score(tmp_path / "new")
    assert scores_by_path(tmp_path / "new")[changed] != scores_by_path(tmp_path / "old")[changed]
    out = tmp_path / "all"
    r = run("merge", tmp_path / "new", tmp_path / "old", "--index", out)  # the older part last
    assert r.exit_code == 0, r.output
    assert scores_by_path(out)[changed] == scores_by_path(tmp_path / "new")[changed]
    np.testing.assert_array_equal(catalog(out)[changed][4], catalog(tmp_path / "new")[changed][4])


# ------------------------------------------------------------------ exclusions, and merging again
def copies(parts, tmp_path, *ks) -> list:
    out = []
    for k in ks:
        shutil.copytree(parts / f"p{k}", tmp_path / f"p{k}")
        out.append(tmp_path / f"p{k}")
    return out


def unlabeled(idx, n: int) -> list[str]:
    with open_store(idx) as st:
        return [p for (p,) in st.db.execute("SELECT path FROM images WHERE split='unlabeled' AND status='embedded' "
                                            "ORDER BY id LIMIT ?", (n,))]


def listing(path, keys) -> str:
    path.write_text("".join(f"{k}\n" for k in keys))
    return path


def excluded(idx) -> dict[str, str | None]:
    """path -> reason, of the images `novelty exclude` (or a merge) keeps out of select."""
    with open_store(idx) as st:
        return dict(st.db.execute("SELECT i.path, e.reason FROM excluded e JOIN images i ON i.id = e.image"))


def test_a_parts_exclusions_are_carried_over_and_select_leaves_them_out(parts, tmp_path):
    p1, p2 = copies(parts, tmp_path, 1, 2)
    skip = unlabeled(p1, 3)
    assert run("exclude", listing(tmp_path / "skip.txt", skip), "--reason", "blank", "--index", p1).exit_code == 0
    with open_store(p2, writable=True) as st, st.transaction() as db:
        db.execute("DROP TABLE excluded")  # an index from before `novelty exclude`
    m = tmp_path / "m"
    s = merge_indexes(m, [p1, p2])
    assert [p.excluded for p in s.parts] == [3, 0]
    assert excluded(m) == {p: "blank" for p in skip}
    with open_store(m) as st:  # named by the merge run that brought them
        assert st.db.execute("SELECT DISTINCT r.kind FROM excluded e JOIN runs r ON r.id = e.run").fetchall() == [("merge",)]
        pool = {p for (p,) in st.db.execute("SELECT path FROM images WHERE split='unlabeled' AND status='embedded'")}
    r = run("select", "--budget", 300, "--index", m, "--out", tmp_path / "sel.csv")
    assert r.exit_code == 0, r.output
    with open_store(m) as st:
        picked = {p for (p,) in st.db.execute("SELECT i.path FROM picks p JOIN images i ON i.id = p.image "
                                              "WHERE p.run = (SELECT MAX(id) FROM runs WHERE kind='select')")}
    assert picked == pool - set(skip)
    # excluded later in the part: carried by the next merge; one the target excluded itself keeps its reason
    more = unlabeled(p1, 5)[3:]
    assert run("exclude", listing(tmp_path / "more.txt", more), "--reason", "private", "--index", p1).exit_code == 0
    assert run("exclude", listing(tmp_path / "mine.txt", more[:1]), "--reason", "mine", "--index", m).exit_code == 0
    s = merge_indexes(m, [p1, p2])
    assert [(p.unchanged, p.excluded) for p in s.parts] == [(False, 1), (True, 0)]
    assert excluded(m) == {**{p: "blank" for p in skip}, more[0]: "mine", more[1]: "private"}


def test_merging_unchanged_parts_again_keeps_what_was_done_in_the_target(parts, tmp_path):
    p1, p2 = copies(parts, tmp_path, 1, 2)
    marked, skip = unlabeled(p1, 2), unlabeled(p2, 1)
    assert run("mark-labeled", listing(tmp_path / "mk.txt", marked), "--index", p1).exit_code == 0
    assert run("exclude", listing(tmp_path / "skip.txt", skip), "--index", p2).exit_code == 0
    m = tmp_path / "m"
    assert run("merge", p1, p2, "--index", m).exit_code == 0
    assert [catalog(m)[p][0] for p in marked] == ["labeled"] * 2 and set(excluded(m)) == set(skip)
    # undone in the merged index
    assert run("mark-labeled", tmp_path / "mk.txt", "--undo", "--index", m).exit_code == 0
    assert run("exclude", tmp_path / "skip.txt", "--undo", "--index", m).exit_code == 0
    before = catalog(m)
    r = run("merge", p1, p2, "--index", m)  # the same command again, as users do to resume or add parts
    assert r.exit_code == 0, r.output
    s = merge_indexes(m, [p1, p2])
    assert all(p.unchanged and p.added == p.moved == p.excluded == p.shards == 0 for p in s.parts), s.parts
    assert [p.held for p in s.parts] == [["1/3"], ["2/3"]] and s.missing_parts == ["3/3"]
    after = catalog(m)
    assert [after[p][0] for p in marked] == ["unlabeled"] * 2 and excluded(m) == {}
    assert {k: v[:4] for k, v in after.items()} == {k: v[:4] for k, v in before.items()}
    info = run("info", "--index", m).output
    assert info.count("  merge  ") == 2, info


def test_a_part_changed_since_it_was_merged_is_merged_again(parts, tmp_path):
    p1, p2 = copies(parts, tmp_path, 1, 2)
    marked = unlabeled(p1, 2)
    assert run("mark-labeled", listing(tmp_path / "a.txt", marked[:1]), "--index", p1).exit_code == 0
    m = tmp_path / "m"
    assert run("merge", p1, p2, "--index", m).exit_code == 0
    assert run("mark-labeled", tmp_path / "a.txt", "--undo", "--index", m).exit_code == 0
    assert run("mark-labeled", listing(tmp_path / "b.txt", marked[1:]), "--index", p1).exit_code == 0  # the part changed
    s = merge_indexes(m, [p1, p2])
    assert [(p.unchanged, p.moved) for p in s.parts] == [(False, 2), (True, 0)]
    # merged again by the usual rules: a label the part still carries wins
    assert [catalog(m)[p][0] for p in marked] == ["labeled"] * 2
    assert merge_indexes(m, [p1, p2]).parts[0].unchanged


def test_a_part_built_again_with_a_new_image_is_merged_again(tmp_path, sample_dir):
    src, out = two_parts_merged(tmp_path, sample_dir)
    first = unlabeled(tmp_path / "p1", 1)[0]  # a copy of an image that embeds
    new = next(p for p in (src / "unlabeled" / f"new_{i}.jpg" for i in range(100)) if in_part(str(p), (1, 2)))
    shutil.copyfile(first, new)
    assert "1 new" in build(tmp_path / "p1", src, "--part", "1/2").output
    s = merge_indexes(out, [tmp_path / "p1", tmp_path / "p2"])
    assert [(p.unchanged, p.added) for p in s.parts] == [(False, 1), (True, 0)]
    assert catalog(out)[str(new)][1] == "embedded"
    assert set(catalog(out)) == set(catalog(tmp_path / "p1")) | set(catalog(tmp_path / "p2"))


def test_the_fingerprint_follows_any_change_merge_would_read(parts, tmp_path):
    from novelty.merge import _read_part

    (p1,) = copies(parts, tmp_path, 1)

    def fingerprint() -> str:
        with open_store(p1) as st:
            return _read_part(st).fingerprint

    fp = fingerprint()
    with open_store(p1, writable=True):  # opened for writing, nothing written
        pass
    assert fingerprint() == fp
    with open_store(p1, writable=True) as st, st.transaction() as db:  # no run records this change
        db.execute("UPDATE images SET mtime = mtime + 1 WHERE id = (SELECT MIN(id) FROM images)")
    assert fingerprint() != fp


def test_a_target_that_lost_a_shard_takes_its_vectors_again_from_unchanged_parts(parts, tmp_path):
    out = tmp_path / "t"
    assert run("merge", parts / "p1", parts / "p2", parts / "p3", "--index", out).exit_code == 0
    before = catalog(out)
    victim = max((out / "shards").glob("*.npy"), key=lambda f: f.stat().st_size)
    victim.unlink()
    assert run("select", "--budget", 3, "--index", out, "--out", tmp_path / "x.csv").exit_code == 3
    r = run("merge", parts / "p1", parts / "p2", parts / "p3", "--index", out)
    assert r.exit_code == 0 and "were missing or damaged" in r.output and "unchanged since merged" not in r.output, r.output
    after = catalog(out)
    assert after.keys() == before.keys()
    for path, row in before.items():
        assert after[path][:4] == row[:4], path  # embedded again, nothing left "vector lost"
        if row[4] is not None:
            np.testing.assert_array_equal(after[path][4], row[4])
    assert run("select", "--budget", 3, "--index", out, "--out", tmp_path / "x.csv").exit_code == 0
    r = run("merge", parts / "p1", parts / "p2", parts / "p3", "--index", out)  # whole again: skipped again
    assert r.exit_code == 0 and r.output.count("unchanged since merged") == 3, r.output


def test_an_image_a_part_found_deleted_leaves_the_merged_pool(tmp_path, sample_dir):
    src, out = two_parts_merged(tmp_path, sample_dir)
    victim = unlabeled(tmp_path / "p1", 1)[0]
    os.remove(victim)
    assert "gone      1" in build(tmp_path / "p1", src, "--part", "1/2").output
    r = run("merge", tmp_path / "p1", tmp_path / "p2", "--index", out)
    assert r.exit_code == 0 and "1 deleted from their folder or moved: out of the pool" in r.output, r.output
    assert catalog(out)[str(victim)][1:3] == ("failed", GONE)
    assert catalog(out)[str(victim)][1:3] == catalog(tmp_path / "p1")[str(victim)][1:3]  # as one build would have it
    with open_store(out) as st:
        assert str(victim) not in {p for _, p, _ in st.describe(st.pool_ids()[0]).values()}


def test_an_image_renamed_inside_a_part_leaves_the_merged_pool_and_keeps_its_exclusion(tmp_path, sample_dir):
    from novelty.sources import in_part

    src, out = two_parts_merged(tmp_path, sample_dir)
    victim = unlabeled(tmp_path / "p1", 1)[0]
    assert run("exclude", listing(tmp_path / "x.txt", [victim]), "--index", tmp_path / "p1").exit_code == 0
    # a new name that falls in the same part, so the part sees the bytes move
    moved = next(n for n in (f"{victim[:-4]}_renamed{k}.jpg" for k in range(100)) if in_part(n, (1, 2)))
    os.rename(victim, moved)
    r = build(tmp_path / "p1", src, "--part", "1/2")
    assert "moved     1 image(s) turned up at a new path" in r.output and "1 excluded" in r.output, r.output
    r = run("merge", tmp_path / "p1", tmp_path / "p2", "--index", out)
    assert r.exit_code == 0, r.output
    assert catalog(out)[victim][1] == "failed" and catalog(out)[moved][1] == "embedded"
    with open_store(out) as st:
        pool = {p for _, p, _ in st.describe(st.pool_ids()[0]).values()}
        excluded = {st.path_of(int(i)) for i in st.excluded_ids()}
    assert victim not in pool and moved not in pool and moved in excluded


def test_marks_made_in_the_merged_index_follow_images_renamed_in_the_parts(tmp_path, sample_dir):
    """Marks, exclusions and imported scores live in the merged index, not in the parts:
    when parts rebuilt after renames are merged again, they move to the new paths, whether
    the new path fell in the same part or in the other one (QA: all three were lost)."""
    src, out = two_parts_merged(tmp_path, sample_dir)
    marked, skipped, scored = unlabeled(out, 3)
    assert run("mark-labeled", listing(tmp_path / "m.txt", [marked]), "--index", out).exit_code == 0
    assert run("exclude", listing(tmp_path / "x.txt", [skipped]), "--index", out).exit_code == 0
    (tmp_path / "u.csv").write_text(f"id,uncertainty\n{scored},0.9\n")
    assert run("import-uncertainty", tmp_path / "u.csv", "--index", out).exit_code == 0

    def renamed(p: str, same_part: bool) -> str:  # a new name in the same part as the old one, or in the other
        part = (1, 2) if in_part(p, (1, 2)) else (2, 2)
        return next(q for q in (str(Path(p).with_name(f"R{k}_{Path(p).name}")) for k in range(200))
                    if in_part(q, part) == same_part)

    # the marked and the scored image cross to the other part, the excluded one stays in its part
    new = {marked: renamed(marked, False), skipped: renamed(skipped, True), scored: renamed(scored, False)}
    for p, q in new.items():
        os.rename(p, q)
    build(tmp_path / "p1", src, "--part", "1/2")
    build(tmp_path / "p2", src, "--part", "2/2")
    r = run("merge", tmp_path / "p1", tmp_path / "p2", "--index", out)
    assert r.exit_code == 0 and "moved     3 image(s) turned up at a new path" in r.output, r.output
    assert "carried to the new paths: 1 marked labeled, 1 excluded, 1 uncertainty score(s)" in r.output, r.output
    with open_store(out) as st:
        rows = {p: st.db.execute("SELECT split, status FROM images WHERE path=?", (p,)).fetchone() for p in [*new, *new.values()]}
        excluded = {st.path_of(int(i)) for i in st.excluded_ids()}
        pool = {p for _, p, _ in st.describe(st.pool_ids()[0]).values()}
        score = dict(st.db.execute("SELECT i.path, u.value FROM uncertainty u JOIN images i ON i.id = u.image"))
    assert rows[new[marked]] == ("labeled", "embedded") and all(rows[p][1] == "failed" for p in new)
    assert new[skipped] in excluded and new[skipped] not in pool and new[scored] in pool
    assert score.get(new[scored]) == 0.9 and scored not in score
    r = run("merge", tmp_path / "p1", tmp_path / "p2", "--index", out)  # again: nothing more to carry
    assert r.exit_code == 0 and "moved" not in r.output, r.output


def test_a_file_moved_away_and_back_takes_its_marks_back_through_merge(tmp_path, sample_dir):
    """A -> B -> A with parts: the exclusion made in the merged index follows to B, then
    back to A (A's row comes back as a replace of its old row, which is older than B's)."""
    src, out = two_parts_merged(tmp_path, sample_dir)
    a = unlabeled(out, 1)[0]
    assert run("exclude", listing(tmp_path / "x.txt", [a]), "--index", out).exit_code == 0
    b = str(Path(a).with_name("renamed_" + Path(a).name))

    def rebuild_and_merge():
        build(tmp_path / "p1", src, "--part", "1/2")
        build(tmp_path / "p2", src, "--part", "2/2")
        r = run("merge", tmp_path / "p1", tmp_path / "p2", "--index", out)
        assert r.exit_code == 0, r.output
        with open_store(out) as st:
            return {st.path_of(int(i)) for i in st.excluded_ids()}

    os.rename(a, b)
    assert b in rebuild_and_merge()
    os.rename(b, a)
    excluded = rebuild_and_merge()
    assert a in excluded and b not in excluded
