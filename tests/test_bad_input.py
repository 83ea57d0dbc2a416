"""Bad arguments and files found by fuzzing the CLI (session 9): each is one line on
stderr and a non-zero exit, before any work, and nothing is recorded or moved."""
import csv
import shutil

import numpy as np
import pytest

from novelty.store import open_store
from tests.conftest import TINY, run


@pytest.fixture(scope="module")
def index(tmp_path_factory, sample_dir):
    idx = tmp_path_factory.mktemp("bad") / "idx"
    r = run("build-index", "--index", idx, "--model", TINY, "--pretrained", "none", "--device", "cpu",
            "--labeled", sample_dir / "labeled", "--unlabeled", sample_dir / "unlabeled")
    assert r.exit_code == 0, r.output
    return idx


def runs(idx, kind="select"):
    with open_store(idx) as st:
        return st.db.execute("SELECT COUNT(*) FROM runs WHERE kind=?", (kind,)).fetchone()[0]


def one_line_error(r, code, *words):
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    for w in words:
        assert w in r.output, r.output


def test_outputs_in_a_missing_folder_fail_before_any_work(index, tmp_path):
    before = runs(index)
    one_line_error(run("select", "--budget", 5, "--index", index, "--out", tmp_path / "nodir" / "s.csv"), 2, "not an existing folder")
    assert runs(index) == before  # no select run recorded for a file that was never written
    assert run("select", "--budget", 5, "--index", index, "--out", tmp_path / "s.csv").exit_code == 0
    for args in (("duplicates", "--out", tmp_path / "nodir" / "d.csv"),
                 ("report", "--selection", tmp_path / "s.csv", "--out", tmp_path / "nodir" / "r.html"),
                 ("export", "--latest", "--out", tmp_path / "nodir" / "e.csv"),
                 ("export", "--latest", "--out", tmp_path / "s.csv" / "e.csv")):
        one_line_error(run(*args, "--index", index), 2, "cannot write")
    one_line_error(run("sample", tmp_path / "s.csv" / "sub"), 2, "cannot write into")
    one_line_error(run("sample", tmp_path / "s.csv"), 2, "is a file, not a folder")


def test_sample_into_an_empty_name_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(run("sample", ""), 2, "the output folder is empty")
    assert not list(tmp_path.iterdir())  # nothing written into the current folder
    r = run("sample", "s", "--n-labeled", 2, "--n-unlabeled", 3)
    assert r.exit_code == 0 and "wrote 2 labeled and 3 unlabeled images to s" in r.output, r.output
    assert "plus, in unlabeled/, 1 exact copy of a labeled image and 3 broken files" in r.output
    assert len(list((tmp_path / "s" / "unlabeled").iterdir())) == 3 + 1 + 3


def test_sample_never_writes_among_a_users_own_images(tmp_path):
    mine = tmp_path / "data" / "labeled" / "labeled_00000.jpg"  # a name the sample would use
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my own image")
    one_line_error(run("sample", tmp_path / "data"), 2, "already holds files that novelty sample did not write")
    assert mine.read_bytes() == b"my own image" and sorted(p.name for p in (tmp_path / "data").iterdir()) == ["labeled"]
    for _ in range(2):  # into its own folder again, as a second run of the quickstart does
        r = run("sample", tmp_path / "s", "--n-labeled", 2, "--n-unlabeled", 3)
        assert r.exit_code == 0, r.output
    r = run("sample", tmp_path / "s", "--n-labeled", 1, "--n-unlabeled", 2)  # smaller: nothing stale stays
    assert r.exit_code == 0 and f"note: {2 + 3 + 1 + 3} files of an earlier sample in {tmp_path / 's'} were removed" \
        in r.output, r.output
    assert sorted(p.name for p in (tmp_path / "s" / "labeled").iterdir()) == ["labeled_00000.jpg"]
    unl = sorted(p.name for p in (tmp_path / "s" / "unlabeled").iterdir())
    assert [n for n in unl if n.startswith("unlabeled_")] == ["unlabeled_00000.jpg", "unlabeled_00001.jpg"]
    assert len(unl) == 2 + 1 + 3  # and the exact copy and the 3 broken files


def test_an_unlabeled_source_in_a_labeled_folder_is_refused(tmp_path, sample_dir):
    idx = tmp_path / "idx"
    enc = ("--model", TINY, "--pretrained", "none", "--index", idx)
    src = sample_dir / "unlabeled"
    (tmp_path / "link").symlink_to(src)
    for lab, unl, words in ((src, sample_dir / ".." / sample_dir.name / "unlabeled", "is also given as --labeled"),
                            (tmp_path / "link", src, "is also given as --labeled"),
                            (sample_dir, src, f"lies inside --labeled {sample_dir}")):
        one_line_error(run("build-index", "--labeled", lab, "--unlabeled", unl, *enc), 2, f"--unlabeled {unl} {words}")
        assert not idx.exists()
    # the other way round is how a labeled subset of one folder is indexed: allowed
    (tmp_path / "all").mkdir()
    shutil.copytree(sample_dir / "labeled", tmp_path / "all" / "lab")
    few = sorted(src.glob("unlabeled_0000*.jpg"))
    for f in few:
        shutil.copy(f, tmp_path / "all" / f.name)
    r = run("build-index", "--labeled", tmp_path / "all" / "lab", "--unlabeled", tmp_path / "all", *enc)
    assert r.exit_code == 0, r.output
    with open_store(idx) as st:
        n = dict(st.db.execute("SELECT split, COUNT(*) FROM images GROUP BY split").fetchall())
    assert n == {"labeled": len(list((sample_dir / "labeled").iterdir())), "unlabeled": len(few)}, n


@pytest.mark.parametrize("args, words", [
    (("--strategy", "random", "--seed", -5), "--seed must be >= 0"),
    (("--uncertainty-weight", "nan"), "finite"),
    (("--uncertainty-weight", "inf"), "finite"),
])
def test_select_refuses_bad_numbers(index, tmp_path, args, words):
    one_line_error(run("select", "--budget", 5, *args, "--index", index, "--out", tmp_path / "s.csv"), 2, words)


@pytest.mark.parametrize("args, words", [
    (("--score-thresh", "nan"), "--score-thresh must be in [0, 1]"),
    (("--score-thresh", -1), "--score-thresh must be in [0, 1]"),
    (("--image-size", 0), "--image-size must be >= 1"),
    (("--passes", 10 ** 20), "--passes must be at most"),
])
def test_uncertainty_refuses_bad_numbers_before_a_run(index, args, words):
    before = runs(index, "uncertainty")
    one_line_error(run("uncertainty", "--detector", "tests._tiny_models:make_detector", "--kind", "detection", *args,
                       "--index", index, "--workers", 0), 2, words)
    assert runs(index, "uncertainty") == before


def test_npz_and_empty_vector_files(tmp_path):
    np.savez(tmp_path / "v.npz", a=np.ones((2, 4), np.float32))
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "ids.txt").write_text("a\nb\n")
    for f, words in (("v.npz", ".npz archive"), ("empty.npy", "not a .npy array")):
        one_line_error(run("import-embeddings", tmp_path / f, "--ids", tmp_path / "ids.txt", "--split", "unlabeled",
                           "--index", tmp_path / "idx"), 2, words)


def test_a_byte_order_mark_is_not_part_of_the_first_id(tmp_path):
    X = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    np.save(tmp_path / "v.npy", X)
    (tmp_path / "ids.txt").write_bytes("\ufeffa\nb\nc\n".encode("utf-8"))
    idx = tmp_path / "idx"
    assert run("import-embeddings", tmp_path / "v.npy", "--ids", tmp_path / "ids.txt", "--split", "unlabeled", "--index", idx).exit_code == 0
    (tmp_path / "done.txt").write_bytes("\ufeffa\n".encode("utf-8"))
    r = run("mark-labeled", tmp_path / "done.txt", "--index", idx)
    assert r.exit_code == 0 and "marked 1 image(s) labeled" in r.output, r.output
    (tmp_path / "u.csv").write_bytes("\ufeffid,uncertainty\nb,0.5\nc,0.25\n".encode("utf-8"))
    assert run("import-uncertainty", tmp_path / "u.csv", "--index", idx).exit_code == 0


def test_a_selection_from_another_index_moves_nothing(index, tmp_path, sample_dir):
    assert run("select", "--budget", 3, "--index", index, "--out", tmp_path / "s.csv").exit_code == 0
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    # the same ids, but the paths of other images: a file written by another index
    others = [p for p in sorted((sample_dir / "unlabeled").iterdir()) if str(p) not in {r["path"] for r in rows}]
    with open(tmp_path / "other.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r, p in zip(rows, others):
            w.writerow({**r, "path": str(p)})
    with open_store(index) as st:
        before = st.counts()["by_split_status"]
    one_line_error(run("mark-labeled", "--selection", tmp_path / "other.csv", "--index", index), 2,
                   "another index")
    with open_store(index) as st:
        assert st.counts()["by_split_status"] == before
    assert run("mark-labeled", "--selection", tmp_path / "s.csv", "--index", index).exit_code == 0


def _damage(kind, idx):
    shards = sorted((idx / "shards").glob("*.npy"))
    if kind == "catalog garbage":
        (idx / "catalog.sqlite").write_bytes(b"garbage" * 100)
    elif kind == "catalog empty":
        (idx / "catalog.sqlite").write_bytes(b"")
    elif kind == "manifest gone":
        (idx / "manifest.json").unlink()
    elif kind == "manifest not json":
        (idx / "manifest.json").write_text("{")
    elif kind == "manifest a list":
        (idx / "manifest.json").write_text("[]")
    elif kind == "shard gone":
        shards[0].unlink()
    elif kind == "shard truncated":
        shards[0].write_bytes(shards[0].read_bytes()[:50])
    elif kind == "faiss junk":
        (idx / "vectors.faiss").write_bytes(b"junk" * 10)


@pytest.mark.parametrize("kind, command", [
    ("catalog garbage", "info"), ("catalog garbage", "select"), ("catalog empty", "info"),
    ("manifest gone", "select"), ("manifest not json", "info"), ("manifest not json", "select"),
    ("manifest a list", "info"), ("shard gone", "select"), ("shard truncated", "select"),
    ("shard truncated", "neighbors"), ("faiss junk", "neighbors"),
])
def test_a_damaged_index_is_named_in_one_line(index, tmp_path, kind, command):
    import shutil

    idx = tmp_path / "idx"
    shutil.copytree(index, idx)
    _damage(kind, idx)
    args = {"info": ("info",), "select": ("select", "--budget", 3, "--out", tmp_path / "s.csv"),
            "neighbors": ("neighbors", 5)}[command]
    one_line_error(run(*args, "--index", idx), 3, "damaged" if kind != "manifest gone" else "no dim")


def test_broken_model_configs_and_weights_exit_4_in_one_line(tmp_path, sample_dir):
    import torch

    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "empty.json").write_text("{}")
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "junk.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"not.a.key": torch.zeros(3)}, tmp_path / "foreign.bin")
    src = ("--labeled", sample_dir / "labeled", "--device", "cpu", "--index", tmp_path / "idx")
    for model, weights, words in ((tmp_path / "bad.json", "none", "not readable JSON"),
                                  (tmp_path / "empty.json", "none", "not an open_clip model config"),
                                  (TINY, tmp_path / "empty.bin", "empty.bin"),
                                  (TINY, tmp_path / "junk.bin", "junk.bin"),
                                  (TINY, tmp_path / "foreign.bin", "Missing key")):
        one_line_error(run("build-index", "--model", model, "--pretrained", weights, *src), 4, words)


def test_a_refused_first_import_leaves_no_index_to_bind_the_next(tmp_path):
    Y = np.ones((2, 16), np.float32)
    Y[1, 3] = np.nan
    np.save(tmp_path / "nan.npy", Y)
    np.save(tmp_path / "good.npy", np.random.default_rng(0).normal(size=(2, 32)).astype(np.float32))
    (tmp_path / "ids.txt").write_text("a\nb\n")
    idx = tmp_path / "idx"
    args = ("--ids", tmp_path / "ids.txt", "--split", "unlabeled", "--index", idx)
    one_line_error(run("import-embeddings", tmp_path / "nan.npy", *args), 2, "NaN or inf")
    assert not idx.exists()
    r = run("import-embeddings", tmp_path / "good.npy", *args)  # another dim: not refused by the failed attempt
    assert r.exit_code == 0, r.output
    # into a folder the user made, holding a file of theirs: the index's own files go, theirs and the folder stay
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    (mine / "shards_backup").mkdir()
    one_line_error(run("import-embeddings", tmp_path / "nan.npy", "--ids", tmp_path / "ids.txt", "--split", "unlabeled",
                       "--index", mine), 2, "NaN or inf")
    assert sorted(f.name for f in mine.iterdir()) == ["notes.txt", "shards_backup"]
    # --index a/b/c where a/ did not exist: every folder the import made goes
    one_line_error(run("import-embeddings", tmp_path / "nan.npy", "--ids", tmp_path / "ids.txt", "--split", "unlabeled",
                       "--index", tmp_path / "a" / "b" / "c"), 2, "NaN or inf")
    assert not (tmp_path / "a").exists()


def test_a_folder_holding_another_tools_manifest_or_shards_is_not_made_an_index(tmp_path, sample_dir):
    """No novelty catalog, but a manifest.json or shards/ folder of something else: a
    first run refuses it (exit 3) and leaves every file as it was. Before, a refused
    first merge deleted them, and a build took the folder over: 'orphan' shards removed,
    the manifest rewritten."""
    project = tmp_path / "project"
    (project / "shards").mkdir(parents=True)
    (project / "shards" / "train-0000.tar").write_text("precious")
    (project / "manifest.json").write_text('{"name": "my dataset"}')
    before = sorted((p.relative_to(project), p.read_bytes() if p.is_file() else None) for p in project.rglob("*"))
    for args in (["build-index", "--unlabeled", sample_dir / "unlabeled", "--model", TINY, "--pretrained", "none"],
                 ["import-embeddings", tmp_path / "v.npy", "--ids", tmp_path / "ids.txt", "--split", "unlabeled"]):
        np.save(tmp_path / "v.npy", np.ones((1, 4), np.float32))
        (tmp_path / "ids.txt").write_text("a\n")
        one_line_error(run(*args, "--index", project), 3, "holds manifest.json and shards but no catalog.sqlite")
        assert sorted((p.relative_to(project), p.read_bytes() if p.is_file() else None) for p in project.rglob("*")) == before


def test_a_first_run_whose_folder_another_removed_makes_it_again(tmp_path):
    """Two first runs: A made the folder, B found it there, A was refused and removed it
    before B opened the lock file: B makes the folder again and goes on (it exited 3,
    'cannot write to the index', before), and owns that folder now."""
    from novelty.store import Store

    root = tmp_path / "x" / "idx"  # B's create_store found it; it is gone when B opens the lock
    with Store(root, writable=True, create=True) as st:
        assert st.created and st.made_dirs == [root, tmp_path / "x"]
        st.discard()
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("made", [True, False])
def test_a_first_build_stopped_while_it_creates_the_catalog_leaves_nothing(tmp_path, sample_dir, monkeypatch, made):
    """Ctrl-C while the catalog is made: no temporary catalog and no lock file are left
    in a folder the user made, a folder the run made is removed, and the stop says that
    nothing was written (it said 'finished shards are kept')."""
    import novelty.store as store_mod

    user = tmp_path / "mine"
    if not made:
        user.mkdir()
    idx = user / "idx" if made else user
    real = store_mod.os.replace

    def stopped(src, dst):
        if str(dst).endswith("catalog.sqlite"):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", stopped)
    r = run("build-index", "--unlabeled", sample_dir / "unlabeled", "--model", TINY, "--pretrained", "none", "--index", idx)
    assert r.exit_code == 130 and "interrupted; nothing was written" in r.output, r.output
    assert not user.exists() if made else list(user.iterdir()) == []


def test_a_build_stopped_while_the_model_loads_says_nothing_was_written(tmp_path, sample_dir, monkeypatch):
    import novelty.indexer as indexer

    def stopped(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(indexer, "create_encoder", stopped)
    r = run("build-index", "--unlabeled", sample_dir / "unlabeled", "--model", TINY, "--pretrained", "none",
            "--index", tmp_path / "idx")
    assert r.exit_code == 130 and "interrupted; nothing was written" in r.output, r.output  # not "finished shards"
    assert not (tmp_path / "idx").exists()


def test_a_refused_import_into_an_index_leaves_no_history_line(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "v.npy", rng.normal(size=(2, 8)).astype(np.float32))
    Y = rng.normal(size=(2, 8)).astype(np.float32)
    Y[0, 0] = np.inf
    np.save(tmp_path / "inf.npy", Y)
    np.save(tmp_path / "zero.npy", np.stack([rng.normal(size=8), np.zeros(8)]).astype(np.float32))
    (tmp_path / "ids.txt").write_text("a\nb\n")
    (tmp_path / "new.txt").write_text("c\nd\n")
    idx = tmp_path / "idx"
    assert run("import-embeddings", tmp_path / "v.npy", "--ids", tmp_path / "ids.txt", "--split", "unlabeled", "--index", idx).exit_code == 0
    for vectors, ids, words in (("v.npy", "ids.txt", "already in the index"), ("inf.npy", "new.txt", "NaN or inf"),
                                ("zero.npy", "new.txt", "all zeros")):  # the last is refused inside the store's write
        one_line_error(run("import-embeddings", tmp_path / vectors, "--ids", tmp_path / ids, "--split", "unlabeled",
                           "--index", idx), 2, words)
    assert runs(idx, "import") == 1
    r = run("info", "--index", idx)
    assert r.exit_code == 0 and "interrupted" not in r.output, r.output


def test_two_first_imports_at_once_keep_one_and_refuse_the_other(tmp_path):
    """Two imports that start on the same new index at the same moment: one is kept, the
    other exits 5 in one line (or, when one finished before the other looked, both are
    kept). (Before the catalog was created under the lock, the loser
    could replace the winner's catalog, exit 3, or delete the winner's index with its
    clean-up of a first import: about 1 trial in 5 kept neither.)"""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    for name, n in (("a", 100_000), ("b", 300)):  # a runs long enough that b mostly meets it
        np.save(tmp_path / f"{name}.npy", rng.normal(size=(n, 64)).astype(np.float32))
        (tmp_path / f"{name}.txt").write_text("".join(f"{name}{i}\n" for i in range(n)))
    for trial in range(6):
        idx = tmp_path / f"idx{trial}"
        procs = [subprocess.Popen([sys.executable, "-m", "novelty", "import-embeddings", str(tmp_path / f"{name}.npy"),
                                   "--ids", str(tmp_path / f"{name}.txt"), "--split", split, "--index", str(idx)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for name, split in (("a", "unlabeled"), ("b", "labeled"))]
        codes = [p.wait(timeout=120) for p in procs]
        errors = [p.stderr.read().strip() for p in procs]
        # on a loaded machine b may start, win and finish before a looks: then a goes second, and both are kept
        assert sorted(codes) in ([0, 5], [0, 0]), (trial, codes, errors)
        for code, error in zip(codes, errors):
            assert code == 0 or (error.count("\n") == 0 and "is writing" in error), error
        r = run("info", "--index", idx)
        for code, want in zip(codes, ("unlabeled  100000 embedded", "labeled    300 embedded")):
            assert r.exit_code == 0 and (want in r.output) == (code == 0), (trial, codes, r.output)


def test_uncertainty_on_vectors_without_images_is_refused_up_front(tmp_path):
    np.save(tmp_path / "v.npy", np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32))
    (tmp_path / "ids.txt").write_text("a\nb\nc\n")
    idx = tmp_path / "idx"
    assert run("import-embeddings", tmp_path / "v.npy", "--ids", tmp_path / "ids.txt", "--split", "unlabeled", "--index", idx).exit_code == 0
    one_line_error(run("uncertainty", "--detector", "tests._tiny_models:make_detector", "--kind", "detection",
                       "--index", idx, "--workers", 0), 2, "--paths")
    assert runs(idx, "uncertainty") == 0


@pytest.fixture
def read_only_copy(index, tmp_path):
    """A copy of the index seen through a read-only bind mount (skipped where this
    process may not mount, e.g. without root)."""
    import subprocess

    shutil.copytree(index, tmp_path / "src" / "idx", ignore=shutil.ignore_patterns(".lock"))
    mnt = tmp_path / "ro"
    mnt.mkdir()
    ok = subprocess.run(["mount", "--bind", str(tmp_path / "src"), str(mnt)], capture_output=True).returncode == 0
    if ok and subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        ok = False
    if not ok:
        pytest.skip("cannot make a read-only bind mount here")
    try:
        yield mnt / "idx"
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_read_only_index_is_read_and_refuses_writes_in_one_line(read_only_copy, index, tmp_path, sample_dir):
    idx = read_only_copy
    with pytest.raises(OSError):
        (idx / "probe").write_text("x")  # the mount really is read-only
    with open_store(index) as st:  # the writable original it was copied from
        n_lab = st.counts()["by_split_status"][("labeled", "embedded")]
    r = run("info", "--index", idx)
    assert r.exit_code == 0 and f"labeled    {n_lab} embedded" in r.output, r.output
    r = run("neighbors", "1", "--k", 3, "--index", idx, "--json")
    assert r.exit_code == 0, r.output
    r = run("duplicates", "--index", idx, "--out", tmp_path / "d.csv")
    assert r.exit_code == 0, r.output
    for args in (("select", "--budget", 3, "--out", tmp_path / "s.csv"), ("mark-labeled", "1"),
                 ("build-index", "--unlabeled", sample_dir / "unlabeled", "--model", TINY, "--pretrained", "none")):
        one_line_error(run(*args, "--index", idx), 3, "cannot write to the index", "Read-only file system")
    one_line_error(run("build-index", "--unlabeled", sample_dir / "unlabeled", "--model", TINY, "--pretrained", "none",
                       "--index", idx.parent / "new"), 3, "cannot create the index")
    assert not (tmp_path / "s.csv").exists()


def test_a_folder_where_the_label_studio_file_goes_fails_before_any_work(index, tmp_path):
    (tmp_path / "c.label-studio.json").mkdir()
    before = runs(index)
    one_line_error(run("select", "--budget", 3, "--index", index, "--out", tmp_path / "c.csv"), 2,
                   "the Label Studio file beside", "it is a folder")
    assert runs(index) == before and not (tmp_path / "c.csv").exists()
    assert run("select", "--budget", 3, "--index", index, "--out", tmp_path / "ok.csv").exit_code == 0
    one_line_error(run("export", "--latest", "--index", index, "--out", tmp_path / "c.csv"), 2, "it is a folder")


def _limited(limit: int, *args):
    """The CLI in a process whose files may not grow past `limit` bytes (RLIMIT_FSIZE):
    a real refused write, as on a full disk, without filling one."""
    import subprocess
    import sys

    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
            "from novelty.cli import app\n"
            "sys.argv[0] = 'novelty'\n"
            "app()\n")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="RLIMIT_FSIZE semantics")
def test_a_refused_write_is_one_line_exit_6_and_leaves_no_half_outputs(index, tmp_path):
    assert run("select", "--budget", 200, "--index", index, "--out", tmp_path / "s.csv").exit_code == 0
    csv_size = (tmp_path / "s.csv").stat().st_size
    ls_size = (tmp_path / "s.label-studio.json").stat().st_size
    floor = max(csv_size, 1 << 15)  # the catalog's shared-memory file (-shm) takes 32 KiB
    assert ls_size > floor + 2000, (csv_size, ls_size)
    # the selection fits, its Label Studio file does not: neither is written
    r = _limited((floor + ls_size) // 2, "export", "--latest", "--index", index, "--out", tmp_path / "e.csv")
    assert r.returncode == 6 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == "novelty: error: file too large for this system's file size limit; nothing was written"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(("e.", ".e."))]
    # a select whose files cannot be written: its run is marked so, and export writes them later
    r = _limited((floor + ls_size) // 2, "select", "--budget", 200, "--index", index, "--out", tmp_path / "f.csv")
    assert r.returncode == 6 and "Traceback" not in r.stderr and not (tmp_path / "f.csv").exists(), r.stderr
    assert "its files were not written: export --run to write them" in run("info", "--index", index).output
    # the catalog cannot even be opened: the index is not called damaged, and is fine after
    r = _limited(100, "select", "--budget", 3, "--index", index, "--out", tmp_path / "t.csv")
    assert r.returncode == 6 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "check free space and permissions, the index was not changed" in r.stderr and "damaged" not in r.stderr
    assert run("select", "--budget", 3, "--index", index, "--out", tmp_path / "t.csv").exit_code == 0


def test_every_command_named_in_the_stop_messages_exists():
    from novelty.cli import KEPT, app

    assert set(KEPT) <= {c.callback.__name__ for c in app.registered_commands}


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="signals")
def test_ctrl_c_says_what_the_command_leaves(tmp_path):
    """select holds nothing resumable: it must not promise 'finished shards are kept'."""
    import signal
    import subprocess
    import sys
    import time

    rng = np.random.default_rng(0)
    for name, n, split in (("l", 200, "labeled"), ("p", 40000, "unlabeled")):
        np.save(tmp_path / f"{name}.npy", rng.normal(size=(n, 32)).astype(np.float32))
        (tmp_path / f"{name}.txt").write_text("\n".join(f"{name}{i}" for i in range(n)))
        assert run("import-embeddings", tmp_path / f"{name}.npy", "--ids", tmp_path / f"{name}.txt", "--split", split,
                   "--index", tmp_path / "idx").exit_code == 0
    proc = subprocess.Popen([sys.executable, "-m", "novelty", "select", "--budget", "40000", "--strategy", "kcenter",
                             "--index", tmp_path / "idx", "--out", tmp_path / "s.csv"], stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    _, said = proc.communicate(timeout=60)
    last = said.strip().splitlines()[-1].split("\r")[-1]
    assert proc.returncode == 130 and "Traceback" not in said, said
    assert last == "novelty: interrupted; if `info` lists the run (its files not written), `novelty export --latest` writes them"
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="RLIMIT_FSIZE semantics")
def test_a_first_import_stopped_by_a_refused_write_leaves_no_index(tmp_path):
    """Not only a refused import: a first import the system stops leaves no index either,
    which would bind the next import to its dim and keep its orphan shards."""
    np.save(tmp_path / "v.npy", np.random.default_rng(0).normal(size=(4000, 32)).astype(np.float32))
    (tmp_path / "ids.txt").write_text("\n".join(f"x{i}" for i in range(4000)))
    r = _limited(100_000, "import-embeddings", tmp_path / "v.npy", "--ids", tmp_path / "ids.txt", "--split", "unlabeled",
                 "--index", tmp_path / "idx")
    assert r.returncode == 6 and "Traceback" not in r.stderr and "nothing was imported" in r.stderr, r.stderr
    assert not (tmp_path / "idx").exists()


def test_an_import_stopped_while_the_faiss_index_is_rebuilt_is_done(tmp_path, monkeypatch):
    """The vectors and the import's history line commit together, finished: a stop during
    the FAISS rebuild that follows leaves a complete import (searches read the shards until
    the next writer rebuilds the FAISS file), not a run `info` calls unfinished forever."""
    from novelty import vectors

    rng = np.random.default_rng(1)
    for split, n in (("labeled", 50), ("unlabeled", 400)):
        np.save(tmp_path / f"{split}.npy", rng.normal(size=(n, 16)).astype(np.float32))
        (tmp_path / f"{split}.txt").write_text("".join(f"{split[0]}{i}\n" for i in range(n)))

    def imp(split):
        return run("import-embeddings", tmp_path / f"{split}.npy", "--ids", tmp_path / f"{split}.txt", "--split", split,
                   "--index", tmp_path / "idx")

    assert imp("labeled").exit_code == 0
    build = vectors.build

    def stopped(store):
        raise KeyboardInterrupt

    monkeypatch.setattr(vectors, "build", stopped)
    r = imp("unlabeled")
    assert r.exit_code == 130 and "interrupted; the 400 vectors are in (import run #" in r.output, r.output  # not "nothing"
    monkeypatch.setattr(vectors, "build", build)
    r = run("info", "--index", tmp_path / "idx")
    assert r.exit_code == 0 and "unlabeled  400 embedded" in r.output and "import  400 vectors" in r.output, r.output
    assert "not finished" not in r.output and "(stopped" not in r.output, r.output
    r = run("neighbors", "u7", "--index", tmp_path / "idx", "--k", 3)  # the shards answer while FAISS is stale
    ranks = [line.split() for line in r.output.splitlines() if line.strip()[:1].isdigit()]
    assert r.exit_code == 0 and "searching the shards directly" in r.output, r.output
    assert len(ranks) == 3 and "u7" not in [row[3] for row in ranks], r.output  # the query is left out


def test_a_sigterm_after_the_command_finished_is_let_go(tmp_path):
    """A scheduler's TERM that lands once the command has done its work (while the
    interpreter shuts down) is let go: it raised inside atexit hooks, or turned a finished
    job into exit 143. The next TERM acts as usual."""
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM)
    try:
        assert run("sample", tmp_path / "s", "--n-labeled", 1, "--n-unlabeled", 1).exit_code == 0
        os.kill(os.getpid(), signal.SIGTERM)  # no Terminated raised here
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_sigterm_while_the_summary_is_printed_does_not_undo_the_word(tmp_path, monkeypatch):
    """exclude has committed; a TERM while it prints its summary (a slow pipe) is let go:
    before, it said 'stopped (SIGTERM); nothing was changed' and exited 143, with the
    exclusion in."""
    import os
    import signal

    from novelty import cli

    np.save(tmp_path / "v.npy", np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32))
    (tmp_path / "ids.txt").write_text("a\nb\nc\n")
    assert run("import-embeddings", tmp_path / "v.npy", "--ids", tmp_path / "ids.txt", "--split", "unlabeled",
               "--index", tmp_path / "idx").exit_code == 0
    (tmp_path / "one.txt").write_text("a\n")
    echo = cli.typer.echo

    def slow_echo(*a, **k):
        echo(*a, **k)
        if a and str(a[0]).startswith("excluded"):
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli.typer, "echo", slow_echo)
    try:
        r = run("exclude", tmp_path / "one.txt", "--index", tmp_path / "idx")
    finally:
        signal.signal(signal.SIGTERM, before)
    assert r.exit_code == 0 and "SIGTERM" not in r.output and "excluded 1 image(s)" in r.output, r.output
