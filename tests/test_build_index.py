"""build-index, info and import-embeddings through the CLI (typer's CliRunner), on
generated images with a tiny random-weight open_clip model."""
import csv
import json
import os
import shutil

import numpy as np
import pytest

from novelty.store import open_store
from tests.conftest import TINY, TINY_WIDE, copy_samples, run



def build(index, *srcs, model=TINY, extra=()):
    args = ["build-index", "--index", index, "--model", model, "--pretrained", "none", "--device", "cpu", *extra]
    for split, src in srcs:
        args += [f"--{split}", src]
    return run(*args)


def vectors_by_path(index):
    with open_store(index) as st:
        ids, X = st.vectors()
        paths = {i: p for i, (_, p, _) in st.describe(ids).items()}
        return {paths[i]: x for i, x in zip(ids.tolist(), X)}


def test_build_info_and_resume(tmp_path, sample_dir):
    idx = tmp_path / "idx"
    r = build(idx, ("labeled", sample_dir / "labeled"), ("unlabeled", sample_dir / "unlabeled"))
    assert r.exit_code == 0, r.output
    assert "failed    3" in r.output and "duplicates 2 images" in r.output
    with open_store(idx) as st:
        c = st.counts()["by_split_status"]
        assert c[("labeled", "embedded")] == 24 and c[("unlabeled", "embedded")] == 73
        assert c[("unlabeled", "failed")] == 3
        m = st.manifest
        assert m["dim"] == 32 and m["encoder"]["model"] == "tiny-clip" and m["faiss"]["ntotal"] == 97
        assert {"torch", "open_clip_torch", "numpy"} <= set(m["versions"])
        _, X = st.vectors()
        np.testing.assert_allclose(np.linalg.norm(X.astype(np.float32), axis=1), 1, atol=2e-3)
    before = vectors_by_path(idx)
    # re-running embeds nothing and duplicates nothing
    r = build(idx, ("labeled", sample_dir / "labeled"), ("unlabeled", sample_dir / "unlabeled"))
    assert r.exit_code == 0 and "embedded  0" in r.output and "100 unchanged" in r.output
    assert vectors_by_path(idx).keys() == before.keys()
    r = run("info", "--index", idx)
    assert r.exit_code == 0
    assert "tiny-clip" in r.output and "labeled    24 embedded" in r.output and "truncated: 1" in r.output


def test_growing_and_changed_files(tmp_path, sample_dir):
    src = tmp_path / "src"
    shutil.copytree(sample_dir / "labeled", src)
    idx = tmp_path / "idx"
    assert build(idx, ("unlabeled", src)).exit_code == 0
    extra = tmp_path / "more"
    extra.mkdir()
    shutil.copy(sample_dir / "unlabeled" / "unlabeled_00001.jpg", extra / "new.jpg")
    changed = sorted(src.glob("*.jpg"))[3]
    shutil.copy(sample_dir / "unlabeled" / "unlabeled_00002.jpg", changed)
    r = build(idx, ("unlabeled", src), ("unlabeled", extra))
    assert r.exit_code == 0, r.output
    assert "1 new, 1 changed" in r.output and "embedded  2 " in r.output
    with open_store(idx) as st:
        assert st.db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 25


def test_odd_and_broken_images_are_recorded_and_the_run_goes_on(tmp_path, odd_dir):
    folder, expected = odd_dir
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([*(str(folder / n) for n in expected), "missing/nowhere.jpg", str(folder), "nul\0byte.jpg"]) + "\n")
    idx = tmp_path / "idx"
    r = build(idx, ("unlabeled", listing))
    assert r.exit_code == 0, r.output
    with open_store(idx) as st:
        rows = {p.rsplit("/", 1)[-1]: (s, r) for p, s, r in st.db.execute("SELECT path, status, reason FROM images")}
    for name, want in expected.items():
        status, reason = rows[name]
        if want == "ok":
            assert status == "embedded", (name, reason)
        elif want != "any":
            assert status == "failed" and reason.startswith(want), (name, reason)
        else:
            assert status in ("embedded", "failed")
    assert rows["nowhere.jpg"] == ("failed", "not found")
    assert rows[folder.name] == ("failed", "not a file")
    assert rows["nul\0byte.jpg"] == ("failed", "unreadable: the path holds a NUL byte")
    failed = sum(status == "failed" for status, _ in rows.values())
    r = build(idx, ("unlabeled", listing), extra=("--retry-failed",))  # every failure tried again, and counted again
    not_found = sum(status == "failed" and reason.startswith("not found") for status, reason in rows.values())
    assert r.exit_code == 0 and f"failed    {failed} (" in r.output and f"not found: {not_found}" in r.output, r.output
    assert f"0 new, 0 changed, {len(rows) - failed} unchanged, {failed} failed before and tried again" in r.output, r.output
    assert "embedded  0 in" in r.output and "img/s" not in r.output.split("embedded  0 in")[1].splitlines()[0]


def test_list_file_paths_are_relative_to_the_list(tmp_path, sample_dir):
    shutil.copytree(sample_dir / "labeled", tmp_path / "imgs")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "l.txt").write_text("# comment\n../imgs/labeled_00000.jpg\n\n../imgs/labeled_00001.jpg\n")
    r = build(tmp_path / "idx", ("labeled", tmp_path / "lists" / "l.txt"))
    assert r.exit_code == 0 and "2 new" in r.output, r.output


def test_a_list_line_is_read_as_written_when_it_names_a_file(tmp_path, sample_dir):
    """`ls > list.txt` in a folder holding '#1 red.jpg' and ' green.jpg': both are images,
    not a comment and not 'green.jpg'; real comments, blank lines, CRLF and padding still go."""
    src = tmp_path / "imgs"
    src.mkdir()
    good = sorted((sample_dir / "unlabeled").glob("unlabeled_*.jpg"))
    for name, f in zip(("#1 red.jpg", " green.jpg", "plain.jpg"), good):
        shutil.copy(f, src / name)
    (src / "l.txt").write_bytes(b"# a comment\r\n#1 red.jpg\r\n green.jpg\r\n\r\n  plain.jpg  \r\n   # indented comment\r\n")
    idx = tmp_path / "idx"
    r = build(idx, ("unlabeled", src / "l.txt"))
    assert r.exit_code == 0 and "3 images scanned, 3 new" in r.output, r.output
    with open_store(idx) as st:
        rows = dict(st.db.execute("SELECT path, status FROM images").fetchall())
    assert rows == {str(src / n): "embedded" for n in ("#1 red.jpg", " green.jpg", "plain.jpg")}, rows
    (tmp_path / "done.txt").write_text("#1 red.jpg\n green.jpg\n# not an image\n")
    r = run("mark-labeled", tmp_path / "done.txt", "--index", idx)  # read against the list's folder: none is there,
    assert r.exit_code == 2 and "1 of 1 id(s) are not in the index: 'green.jpg'" in r.output, r.output  # so '#1...' is a comment
    (src / "done.txt").write_text("#1 red.jpg\n green.jpg\n# not an image\n")
    r = run("mark-labeled", src / "done.txt", "--index", idx)
    assert r.exit_code == 0 and "marked 2 image(s) labeled" in r.output, r.output
    with open_store(idx) as st:
        labeled = {p for (p,) in st.db.execute("SELECT path FROM images WHERE split='labeled'")}
    assert labeled == {str(src / "#1 red.jpg"), str(src / " green.jpg")}
    # import-embeddings --paths reads its ids file the same way (one line a vector: no comments there)
    np.save(tmp_path / "v.npy", np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32))
    (src / "ids.txt").write_text(" green.jpg\n  plain.jpg  \n")
    r = run("import-embeddings", tmp_path / "v.npy", "--ids", src / "ids.txt", "--split", "unlabeled", "--paths",
            "--index", tmp_path / "imp")
    assert r.exit_code == 0 and "not image files" not in r.output, r.output
    with open_store(tmp_path / "imp") as st:
        assert {p for (p,) in st.db.execute("SELECT path FROM images")} == {str(src / " green.jpg"), str(src / "plain.jpg")}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--labeled", "/no/such/dir"], "source /no/such/dir does not exist"),
        ([], "give at least one --labeled or --unlabeled source"),
        (["--unlabeled", "EMPTY"], "holds no image"),
        (["--unlabeled", "SAMPLE", "--model", "NoSuchNet"], "unknown open_clip model 'NoSuchNet'"),
        (["--unlabeled", "SAMPLE", "--model", "ViT-B-32", "--pretrained", "notatag"], "neither a weights file nor a pretrained tag"),
        (["--unlabeled", "SAMPLE", "--model", "ViT-B-32", "--pretrained", "/nope/w.bin"], "weights file /nope/w.bin does not exist"),
        (["--unlabeled", "SAMPLE", "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k"], "pass --pretrained /path/to/it"),
    ],
)
def test_bad_arguments_give_one_line_and_nonzero_exit(tmp_path, sample_dir, args, message):
    (tmp_path / "empty").mkdir()
    args = [{"EMPTY": tmp_path / "empty", "SAMPLE": sample_dir / "labeled"}.get(a, a) for a in args]
    if "--model" not in args:
        args += ["--model", TINY, "--pretrained", "none"]
    r = run("build-index", "--index", tmp_path / "idx", *args)
    assert r.exit_code != 0
    assert message in r.output
    assert "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


def test_other_model_is_refused_naming_both(tmp_path, sample_dir):
    idx = tmp_path / "idx"
    assert build(idx, ("labeled", sample_dir / "labeled")).exit_code == 0
    r = build(idx, ("labeled", sample_dir / "labeled"), model=TINY_WIDE)
    assert r.exit_code == 3
    assert "tiny-clip" in r.output and "tiny-clip-wide" in r.output and "dim 32" in r.output and "dim 48" in r.output


def test_a_model_config_counts_by_its_contents_not_its_name(tmp_path, sample_dir):
    """Two configs both called mycfg.json (same dim, other layers) give other vectors:
    the second is refused. A renamed copy of the first is the same model: accepted,
    and neighbors --text finds the config under its new name."""
    cfg = json.loads(open(TINY).read())
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "mycfg.json").write_text(json.dumps(cfg))
    other = json.loads(json.dumps(cfg))
    other["vision_cfg"].update(layers=cfg["vision_cfg"]["layers"] + 1)
    (tmp_path / "b" / "mycfg.json").write_text(json.dumps(other))
    idx = tmp_path / "idx"
    assert build(idx, ("labeled", sample_dir / "labeled"), model=tmp_path / "a" / "mycfg.json").exit_code == 0
    r = build(idx, ("unlabeled", sample_dir / "unlabeled"), model=tmp_path / "b" / "mycfg.json")
    assert r.exit_code == 3 and "holds vectors from" in r.output and "config sha256" in r.output, r.output
    with open_store(idx) as st:
        assert not st.db.execute("SELECT COUNT(*) FROM images WHERE split='unlabeled'").fetchone()[0]  # nothing added
    (tmp_path / "a" / "mycfg.json").rename(tmp_path / "a" / "renamed.json")
    (tmp_path / "a" / "renamed.json").write_text(json.dumps(cfg, indent=2))  # reformatted: the same contents
    r = build(idx, ("unlabeled", sample_dir / "unlabeled"), model=tmp_path / "a" / "renamed.json")
    assert r.exit_code == 0, r.output
    r = run("neighbors", "--text", "a red square", "--index", idx, "--model", tmp_path / "a" / "renamed.json", "--k", 2)
    assert r.exit_code == 0, r.output


def test_local_weights_file_loads(tmp_path, sample_dir):
    import torch

    from novelty._compat import import_open_clip
    from novelty.encoder import register_model_config

    oc = import_open_clip()
    model = oc.create_model(register_model_config(TINY), pretrained=None)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    idx = tmp_path / "idx"
    r = run("build-index", "--index", idx, "--model", TINY, "--pretrained", tmp_path / "w.pt", "--labeled", sample_dir / "labeled")
    assert r.exit_code == 0, r.output
    with open_store(idx) as st:
        assert len(st.manifest["encoder"]["weights_sha256"]) == 64
        _, X1 = st.vectors()
    # the same weights give the same vectors: they really were loaded
    model2 = oc.create_model(register_model_config(TINY), pretrained=str(tmp_path / "w.pt"))
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    # the weights file moved (or the index copied to another machine): text queries say how to go on, and do
    (tmp_path / "models").mkdir()
    shutil.move(tmp_path / "w.pt", tmp_path / "models" / "w.pt")
    r = run("neighbors", "--text", "a dog", "--index", idx, "--k", 2)
    assert r.exit_code == 2 and f"weights file {tmp_path / 'w.pt'} is not there any more; pass --pretrained" in r.output
    torch.save({k: v + 1 for k, v in model.state_dict().items()}, tmp_path / "other.pt")
    r = run("neighbors", "--text", "a dog", "--index", idx, "--k", 2, "--pretrained", tmp_path / "other.pt")
    assert r.exit_code == 3 and "refusing vectors from" in r.output, r.output  # other weights: refused
    r = run("neighbors", "--text", "a dog", "--index", idx, "--k", 2, "--pretrained", tmp_path / "models" / "w.pt")
    assert r.exit_code == 0 and len([x for x in r.output.splitlines() if x.strip()[:1].isdigit()]) == 2, r.output
    # build-index given the file at its new place records it there: later queries need no option
    r = run("build-index", "--index", idx, "--model", TINY, "--pretrained", tmp_path / "models" / "w.pt",
            "--labeled", sample_dir / "labeled")
    assert r.exit_code == 0 and "embedded  0" in r.output, r.output
    assert run("neighbors", "--text", "a dog", "--index", idx, "--k", 2).exit_code == 0


def test_import_embeddings(tmp_path):
    X = np.random.default_rng(0).normal(size=(10, 16)).astype(np.float32) * 3
    np.save(tmp_path / "v.npy", X)
    (tmp_path / "ids.txt").write_text("\n".join(f"x{i}" for i in range(10)))
    idx = tmp_path / "idx"
    r = run("import-embeddings", tmp_path / "v.npy", "--ids", tmp_path / "ids.txt", "--split", "unlabeled", "--index", idx)
    assert r.exit_code == 0, r.output
    with open_store(idx) as st:
        ids, V = st.vectors()
        np.testing.assert_allclose(V.astype(np.float32), X / np.linalg.norm(X, axis=1, keepdims=True), atol=1e-3)
        assert st.describe(ids)[ids[0]][0] == "x0"
    # the same ids again, a dim mismatch, NaN rows, bad id files: clear errors, nothing added
    r = run("import-embeddings", tmp_path / "v.npy", "--ids", tmp_path / "ids.txt", "--split", "unlabeled", "--index", idx)
    assert r.exit_code == 2 and "already in the index" in r.output
    np.save(tmp_path / "w.npy", np.ones((2, 8), np.float32))
    (tmp_path / "ids2.txt").write_text("a\nb\n")
    r = run("import-embeddings", tmp_path / "w.npy", "--ids", tmp_path / "ids2.txt", "--split", "labeled", "--index", idx)
    assert r.exit_code == 3 and "dim 16" in r.output and "dim 8" in r.output
    Y = np.ones((2, 16), np.float32)
    Y[1, 3] = np.nan
    np.save(tmp_path / "nan.npy", Y)
    r = run("import-embeddings", tmp_path / "nan.npy", "--ids", tmp_path / "ids2.txt", "--split", "labeled", "--index", idx)
    assert r.exit_code == 2 and "NaN or inf" in r.output and "row 1" in r.output
    (tmp_path / "dup.txt").write_text("a\na\n")
    r = run("import-embeddings", tmp_path / "v.npy", "--ids", tmp_path / "dup.txt", "--split", "labeled", "--index", idx)
    assert r.exit_code == 2 and "appears twice" in r.output
    with open_store(idx) as st:
        assert st.db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 10


def test_info_without_index(tmp_path):
    r = run("info", "--index", tmp_path / "none")
    assert r.exit_code == 3 and "no index at" in r.output and len(r.output.strip().splitlines()) == 1


def test_heap_pin_is_lifted_after_build_index():
    """build-index pins glibc's mmap threshold at 128 KB (flat memory while embedding); a
    process that goes on to other work (a notebook, the active-learning benchmark) must
    not keep paying a fresh mmap and its page faults for every buffer above 128 KB."""
    import subprocess
    import sys

    faults = """
import resource
import numpy as np
from novelty._compat import _mallopt, bounded_heap
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(200):
        a = np.ones(1 << 18)  # 2 MB, freed at once
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
"""

    def measure(body: str) -> list[str]:
        r = subprocess.run([sys.executable, "-c", faults + body], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    ours = measure("with bounded_heap() as pinned:\n    inside = faults()\nprint(pinned, inside, faults())")
    if ours[0] != "True":
        pytest.skip("not glibc: mallopt is unavailable")
    inside, after = int(ours[1]), int(ours[2])
    left_pinned = int(measure("_mallopt(-3, 128 * 1024)\nprint(faults())")[0])  # what build-index used to leave
    assert inside > 200 * 100 and left_pinned > 200 * 100  # pinned: every 2 MB buffer faults its pages in
    assert after < left_pinned / 20, (inside, after, left_pinned)


@pytest.mark.parametrize(
    "args, message",
    [
        (["build-index", "--device", "tpu"], "Invalid value for '--device'"),
        (["select", "--budget"], "Option '--budget' requires an argument"),
        (["select", "--budget", "many"], "Invalid value for '--budget'"),
        (["uncertainty", "--kind", "detection"], "Missing option '--detector'"),
        (["no-such-command"], "No such command 'no-such-command'"),
    ],
)
def test_usage_errors_give_one_line_and_exit_2(args, message):
    # click's own checks (choices, types, missing options) follow the library errors' rule
    r = run(*args)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and r.output.startswith("novelty: error: "), r.output


def test_help_is_still_help():
    for args in ([], ["select", "--help"]):
        r = run(*args)
        assert "Usage: novelty" in r.output and len(r.output.splitlines()) > 5, r.output


def test_a_file_name_that_is_not_utf8_is_recorded_failed_and_the_run_goes_on(tmp_path, sample_dir):
    src = tmp_path / "u"
    src.mkdir()
    good = sorted((sample_dir / "unlabeled").glob("unlabeled_*.jpg"))[:2]
    for f in good:
        shutil.copy(f, src / f.name)
    odd = os.path.join(os.fsencode(src), b"\xff\xfe.jpg")  # bytes no UTF-8 decoder accepts
    shutil.copy(good[0], odd)
    idx = tmp_path / "idx"
    for attempt in range(2):  # the re-run finds the same row, and adds none
        r = build(idx, ("unlabeled", src))
        assert r.exit_code == 0, r.output
        with open_store(idx) as st:
            rows = st.db.execute("SELECT path, status, reason FROM images ORDER BY id").fetchall()
        assert len(rows) == 3 and sum(s == "embedded" for _, s, _ in rows) == 2
        (path, status, reason), = [row for row in rows if row[1] == "failed"]
        assert path == str(src / "\\xff\\xfe.jpg") and "not valid UTF-8" in reason
    assert "unchanged" in r.output
    r = run("neighbors", os.fsdecode(odd), "--index", idx)  # a look-up by that name finds the failed row
    assert r.exit_code == 2 and "has no vector (failed)" in r.output and len(r.output.strip().splitlines()) == 1, r.output


def catalog(idx):
    with open_store(idx) as st:
        return {p: (split, status, reason) for p, split, status, reason in
                st.db.execute("SELECT path, split, status, reason FROM images")}


def test_rebuilding_keeps_what_mark_labeled_moved(tmp_path, sample_dir):
    lab, unl = copy_samples(tmp_path, sample_dir)
    idx = tmp_path / "idx"
    assert build(idx, ("labeled", lab), ("unlabeled", unl)).exit_code == 0
    r = run("select", "--budget", 3, "--index", idx, "--out", tmp_path / "sel.csv")
    assert r.exit_code == 0, r.output
    assert run("mark-labeled", "--selection", tmp_path / "sel.csv", "--index", idx).exit_code == 0
    picked = {row["path"] for row in csv.DictReader(open(tmp_path / "sel.csv"))}
    r = build(idx, ("labeled", lab), ("unlabeled", unl))  # the same command again, as the README says to
    assert r.exit_code == 0 and "3 kept labeled (mark-labeled)" in r.output and "moved" not in r.output, r.output
    assert {p for p, (split, _, _) in catalog(idx).items() if split == "labeled"} >= picked
    r = run("select", "--budget", 3, "--index", idx, "--out", tmp_path / "sel2.csv")
    assert r.exit_code == 0 and not picked & {row["path"] for row in csv.DictReader(open(tmp_path / "sel2.csv"))}


def test_an_image_deleted_from_a_scanned_folder_leaves_the_pool_and_comes_back(tmp_path, sample_dir):
    lab, unl = copy_samples(tmp_path, sample_dir)
    idx = tmp_path / "idx"
    assert build(idx, ("labeled", lab), ("unlabeled", unl)).exit_code == 0
    gone, gone_lab = sorted(unl.glob("*.jpg"))[3], sorted(lab.glob("*.jpg"))[0]
    keep = tmp_path / "keep.jpg"
    shutil.copy(gone, keep)
    gone.unlink(), gone_lab.unlink()
    r = build(idx, ("labeled", lab), ("unlabeled", unl))
    assert r.exit_code == 0 and "gone      1 unlabeled image(s)" in r.output, r.output
    assert "missing   1 labeled image(s) are not in their folder any more: still centers" in r.output, r.output
    cat = catalog(idx)
    assert cat[str(gone)][1:] == ("failed", "not found: deleted from its folder since it was indexed")
    assert cat[str(gone_lab)][:2] == ("labeled", "embedded")  # a labeled image stays a center
    with open_store(idx) as st:
        assert st.manifest["faiss"]["ntotal"] == 13 and len(st.embedded("unlabeled").ids) == 9
    r = run("select", "--budget", 9, "--strategy", "novelty", "--index", idx, "--out", tmp_path / "sel.csv")
    assert r.exit_code == 0 and str(gone) not in {row["path"] for row in csv.DictReader(open(tmp_path / "sel.csv"))}
    assert "gone" not in build(idx, ("labeled", lab), ("unlabeled", unl)).output  # counted once
    shutil.copy(keep, gone)  # back again: embedded again
    r = build(idx, ("labeled", lab), ("unlabeled", unl))
    assert r.exit_code == 0 and "embedded  1 " in r.output and catalog(idx)[str(gone)][1] == "embedded", r.output


def test_an_image_deleted_from_a_folder_not_given_this_time_leaves_the_pool(tmp_path, sample_dir):
    """A later run given only a new batch still sees files deleted from the earlier
    batches (and from lists), by listing their folders; a folder that cannot answer (an
    unmounted drive, emptied, or renamed) marks nothing gone."""
    lab, unl = copy_samples(tmp_path, sample_dir, n_lab=2, n_unl=12)
    batches, files = {}, sorted(unl.glob("*.jpg"))
    for k, name in enumerate(("b1", "b2", "b3", "listed", "new")):
        d = batches[name] = tmp_path / name
        d.mkdir()
        for f in files[2 * k:2 * k + 2]:
            shutil.move(f, d / f.name)
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{f}\n" for f in sorted(batches["listed"].glob("*.jpg"))))
    idx = tmp_path / "idx"
    r = build(idx, ("labeled", lab), *[("unlabeled", batches[b]) for b in ("b1", "b2", "b3")], ("unlabeled", lst))
    assert r.exit_code == 0 and "10 new" in r.output, r.output
    deleted = [sorted(batches["b1"].glob("*.jpg"))[0], sorted(batches["listed"].glob("*.jpg"))[1]]
    for f in deleted:
        f.unlink()
    for f in batches["b2"].glob("*.jpg"):  # emptied, as an unmounted drive's mount point looks: unknown
        f.unlink()
    shutil.move(batches["b3"], tmp_path / "b3-renamed")  # renamed and not given: unknown
    r = build(idx, ("labeled", lab), ("unlabeled", batches["new"]))
    assert r.exit_code == 0 and "gone      2 unlabeled image(s)" in r.output, r.output
    assert "(2 in a folder or list not given this time)" in r.output, r.output
    cat = catalog(idx)
    assert {p for p, (_, status, _) in cat.items() if status == "failed"} == {str(f) for f in deleted}
    assert all(cat[str(f)][2].startswith("not found: deleted") for f in deleted)
    r = run("select", "--budget", 50, "--strategy", "novelty", "--index", idx, "--out", tmp_path / "sel.csv")
    picked = {row["path"] for row in csv.DictReader(open(tmp_path / "sel.csv"))}
    assert r.exit_code == 0 and len(picked) == 8 and not picked & {str(f) for f in deleted}, r.output
    assert "4 of the 8 picks are not files now" in r.output, r.output  # the emptied and renamed batches: warned
    r = build(idx, ("labeled", lab), ("unlabeled", batches["new"]))
    assert r.exit_code == 0 and "gone" not in r.output, r.output  # counted once


def test_a_part_never_marks_the_other_parts_images_gone(tmp_path, sample_dir):
    _, unl = copy_samples(tmp_path, sample_dir, n_lab=0, n_unl=12)
    from novelty.sources import in_part

    for k in range(50):  # the split goes by a hash of the path: a folder name where each part has 2 or more
        names = [str(tmp_path / f"u{k}" / f.name) for f in unl.glob("*.jpg")]
        if 2 <= sum(in_part(n, (1, 2)) for n in names) <= len(names) - 2:
            unl = unl.rename(tmp_path / f"u{k}")
            break
    idx = tmp_path / "part1"
    assert build(idx, ("unlabeled", unl), extra=("--part", "1/2")).exit_code == 0
    files = sorted(unl.glob("*.jpg"))
    mine = [f for f in files if in_part(str(f), (1, 2))]
    other = [f for f in files if not in_part(str(f), (1, 2))]
    assert mine and other
    other[0].unlink()
    r = build(idx, ("unlabeled", unl), extra=("--part", "1/2"))
    assert r.exit_code == 0 and "gone" not in r.output, r.output
    mine[0].unlink()
    r = build(idx, ("unlabeled", unl), extra=("--part", "1/2"))
    assert "gone      1 unlabeled" in r.output and catalog(idx)[str(mine[0])][1] == "failed", r.output
    # the folder not given the next time: all this part's images in it deleted, the other part's still there;
    # the folder answers by any image it holds, not only by this part's (QA 14c D5)
    for f in mine[1:]:
        f.unlink()
    other_batch = tmp_path / "batch2"
    other_batch.mkdir()
    shutil.copy(other[1], other_batch / "x.jpg")
    r = build(idx, ("unlabeled", other_batch), extra=("--part", "1/2"))
    assert r.exit_code == 0 and f"gone      {len(mine) - 1} unlabeled" in r.output, r.output
    assert all(catalog(idx)[str(f)][1] == "failed" for f in mine)


@pytest.mark.parametrize("kind", ["empty folder", "folder of other files", "script", "list of missing files"])
def test_a_source_without_images_is_refused_before_an_index_exists(tmp_path, kind):
    src = tmp_path / "src"
    if kind == "empty folder":
        src.mkdir()
    elif kind == "folder of other files":
        src.mkdir()
        (src / "notes.txt").write_text("x")
    elif kind == "script":
        src = tmp_path / "det.py"
        src.write_text("import torch\n\ndef build():\n    return None\n")
    else:
        src = tmp_path / "list.txt"
        src.write_text("a.jpg\nb/c.png\n")
    idx = tmp_path / "idx"
    r = build(idx, ("unlabeled", src))
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert ("holds no image" in r.output) or ("none is a file" in r.output), r.output
    assert not idx.exists()  # no empty index bound to a model is left behind


def test_symlinked_folders_are_followed_once(tmp_path, sample_dir):
    _, unl = copy_samples(tmp_path, sample_dir, n_lab=0, n_unl=4)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").symlink_to(unl, target_is_directory=True)
    (src / "b").symlink_to(unl, target_is_directory=True)  # the same folder twice
    (src / "a_loop").symlink_to(src, target_is_directory=True)  # and a loop
    idx = tmp_path / "idx"
    r = build(idx, ("unlabeled", src))  # the loop is cut; the two links to one folder are one image a file
    assert r.exit_code == 0 and "8 images scanned" in r.output and "linked    4 path(s)" in r.output, r.output
    assert "embedded  4 " in r.output, r.output
    embedded = [p for p, (_, status, _) in catalog(idx).items() if status == "embedded"]
    assert sorted(os.path.basename(p) for p in embedded) == sorted(f.name for f in unl.glob("*.jpg"))
    assert all(p.startswith(str(src / "a") + os.sep) for p in embedded)  # the first met
    r = build(idx, ("unlabeled", src))
    assert r.exit_code == 0 and "embedded  0" in r.output and "linked    " not in r.output, r.output


def test_a_folder_and_a_link_to_it_inside_one_source_keep_the_path_indexed_first(tmp_path, sample_dir):
    """Indexed as L/b, then L given, where L/a -> b sorts first: the walk met only the
    link (a folder seen once), so b's images were embedded again under a/ and called
    missing (QA 14d D3)."""
    lab, unl = copy_samples(tmp_path, sample_dir, n_lab=3, n_unl=3)
    L = tmp_path / "L"
    L.mkdir()
    lab.rename(L / "b")
    (L / "a").symlink_to("b", target_is_directory=True)
    idx = tmp_path / "idx"
    assert build(idx, ("labeled", L / "b"), ("unlabeled", unl)).exit_code == 0
    for _ in range(2):
        r = build(idx, ("labeled", L), ("unlabeled", unl))
        assert r.exit_code == 0 and "embedded  0" in r.output and "missing" not in r.output, r.output
    with open_store(idx) as st:
        assert st.counts()["by_split_status"][("labeled", "embedded")] == 3


def test_a_link_into_the_labeled_folder_adds_no_unlabeled_copies(tmp_path, sample_dir):
    lab, unl = copy_samples(tmp_path, sample_dir, n_lab=3, n_unl=4)
    (unl / "lab_link").symlink_to(lab, target_is_directory=True)
    (unl / "nested").mkdir()
    shutil.copy(next(lab.glob("*.jpg")), unl / "nested" / "own.jpg")  # a real unlabeled image beside it
    idx = tmp_path / "idx"
    r = build(idx, ("labeled", lab), ("unlabeled", unl))
    assert r.exit_code == 0 and "11 images scanned" in r.output and "linked    3 path(s)" in r.output, r.output
    rows = catalog(idx)
    linked = {p: v for p, v in rows.items() if "lab_link" in p}  # the labeled images once, as labeled
    assert len(linked) == 3 and all(status == "failed" and reason.startswith("linked: the same file is indexed at "
                                                                             + str(lab)) for _, status, reason in linked.values())
    assert sorted(os.path.basename(p) for p, (split, status, _) in rows.items()
                  if split == "labeled" and status == "embedded") == sorted(f.name for f in lab.glob("*.jpg"))
    assert sum(split == "unlabeled" and status == "embedded" for split, status, _ in rows.values()) == 5
    r = build(idx, ("labeled", lab), ("unlabeled", unl))  # a rebuild marks nothing gone
    assert r.exit_code == 0 and "gone" not in r.output and "11 unchanged" in r.output and "linked    " not in r.output, r.output


def test_a_folder_given_with_a_link_to_it_is_indexed_once_under_the_paths_it_had(tmp_path, sample_dir):
    """A folder indexed through a link to it, then given with the link: the paths indexed
    first stay (nothing embedded again, nothing 'moved'), whichever source comes first;
    the same for a labeled folder, whose images are not doubled nor called missing (QA 14c D4)."""
    lab, unl = copy_samples(tmp_path, sample_dir, n_lab=3, n_unl=4)
    (tmp_path / "LU").symlink_to(unl, target_is_directory=True)
    (tmp_path / "LL").symlink_to(lab, target_is_directory=True)
    idx = tmp_path / "idx"
    assert build(idx, ("labeled", tmp_path / "LL"), ("unlabeled", tmp_path / "LU")).exit_code == 0
    for order in ((unl, tmp_path / "LU"), (tmp_path / "LU", unl)):
        r = build(idx, ("labeled", lab), ("labeled", tmp_path / "LL"), *[("unlabeled", u) for u in order])
        assert r.exit_code == 0 and "embedded  0" in r.output and "moved" not in r.output, r.output
        assert "missing" not in r.output and "gone" not in r.output and "duplicates" not in r.output, r.output
    with open_store(idx) as st:
        c = st.counts()["by_split_status"]
        assert c[("labeled", "embedded")] == 3 and c[("unlabeled", "embedded")] == 4
        paths = [p for (p,) in st.db.execute("SELECT path FROM images WHERE status = 'embedded'")]
    assert all(p.startswith((str(tmp_path / "LL"), str(tmp_path / "LU"))) for p in paths)


def test_a_folder_that_cannot_be_listed_hides_nothing_as_gone(tmp_path):
    from novelty.sources import _walk, was_listed

    unlisted: list[str] = []
    assert list(_walk(tmp_path / "vanished", unlisted)) == [] and unlisted == [str(tmp_path / "vanished")]
    assert not was_listed(str(tmp_path / "vanished" / "a.jpg"), None, unlisted)  # unknown, not gone
    assert not was_listed(str(tmp_path / "vanished" / "sub" / "b.jpg"), None, unlisted)
    assert was_listed(str(tmp_path / "vanished-too" / "a.jpg"), None, unlisted)  # a sibling with a common prefix
    assert was_listed(str(tmp_path / "x.jpg"), None, unlisted)


def test_a_stopped_build_says_why_in_info_and_resumes(tmp_path, sample_dir):
    """Ctrl-C during embedding: the run stays unfinished with its reason, info names it,
    the shards done are kept and the next run finishes the rest."""
    from novelty.config import BuildCfg, EncoderCfg, ReaderCfg
    from novelty.indexer import build_index

    idx = tmp_path / "idx"
    calls = []

    def bar(total):
        def update(k):  # told after each batch of 8, before its shard of 16 is committed
            calls.append(k)
            if len(calls) == 3:
                raise KeyboardInterrupt
        return update

    cfg = BuildCfg(encoder=EncoderCfg(model=TINY, pretrained="none", device="cpu"),
                   reader=ReaderCfg(batch_size=8, workers=0), shard_size=16)
    with pytest.raises(KeyboardInterrupt):
        build_index(idx, [sample_dir / "labeled"], [sample_dir / "unlabeled"], cfg, progress_factory=bar)
    r = run("info", "--index", idx)
    assert r.exit_code == 0 and "build  (stopped: interrupted (Ctrl-C))" in r.output, r.output
    with open_store(idx) as st:
        done = st.counts()["by_split_status"].get(("labeled", "embedded"), 0)
    assert done == 16  # the first shard was committed before the bar was told
    r = build(idx, ("labeled", sample_dir / "labeled"), ("unlabeled", sample_dir / "unlabeled"), extra=["--shard-size", 16])
    assert r.exit_code == 0 and "resumed from an interrupted run" in r.output, r.output
    info = run("info", "--index", idx).output
    assert info.count("(stopped:") == 1 and "not finished" not in info  # the first run's reason stays; the second finished


def test_info_shows_a_damaged_shard_and_fails_like_other_readers(tmp_path, sample_dir):
    lab, unl = copy_samples(tmp_path, sample_dir, n_lab=4, n_unl=10)
    idx = tmp_path / "idx"
    assert build(idx, ("labeled", lab), ("unlabeled", unl), extra=["--shard-size", 4, "--batch-size", 4]).exit_code == 0
    victim, cut = sorted((idx / "shards").glob("*.npy"))[1:3]
    victim.unlink()
    cut.write_bytes(cut.read_bytes()[:cut.stat().st_size // 2])
    r = run("info", "--index", idx)
    assert r.exit_code == 3 and "model      open_clip tiny-clip" in r.output, r.output  # the rest is still shown
    assert f"damaged    shard {victim.stem}: the file is missing" in r.output
    assert f"damaged    shard {cut.stem}: the file is damaged: it is shorter than its header says (cut short)" in r.output
    assert r.output.strip().splitlines()[-1].startswith("novelty: error: 2 shard(s) missing or damaged; re-run build-index")
    assert build(idx, ("labeled", lab), ("unlabeled", unl), extra=["--shard-size", 4, "--batch-size", 4]).exit_code == 0
    r = run("info", "--index", idx)
    assert r.exit_code == 0 and "damaged    shard" not in r.output, r.output


def test_skip_existing_says_when_skipped_rows_differ_from_the_index(tmp_path):
    rng = np.random.default_rng(4)
    V = rng.normal(size=(50, 16)).astype(np.float32)
    np.save(tmp_path / "v.npy", V)
    (tmp_path / "ids.txt").write_text("\n".join(f"k{i}" for i in range(50)))
    idx = tmp_path / "idx"

    def imp(vectors, split="unlabeled"):
        return run("import-embeddings", vectors, "--ids", tmp_path / "ids.txt", "--split", split, "--index", idx,
                   "--skip-existing")

    assert imp(tmp_path / "v.npy").exit_code == 0
    r = imp(tmp_path / "v.npy")  # the same file again: nothing to say
    assert r.exit_code == 0 and "skipped 50 already in the index" in r.output and "warning" not in r.output, r.output
    W = V.copy()
    W[5] = -W[5]
    W[7] *= 3.0  # the same direction: the same unit vector, no difference
    np.save(tmp_path / "w.npy", W)
    r = imp(tmp_path / "w.npy")
    assert r.exit_code == 0 and "of the 50 skipped, 1 have another vector in the file" in r.output, r.output
    r = imp(tmp_path / "v.npy", split="labeled")
    assert r.exit_code == 0 and "0 have another vector in the file than in the index and 50 are indexed as the other split" \
        in r.output, r.output

    # block by block, the counts are those of one block, and of a row-by-row comparison
    from novelty.importer import skipped_differences
    keys = [f"k{i}" for i in range(50)]
    W[[11, 30, 49]] = -W[[11, 30, 49]]
    with open_store(idx) as st:
        counts = {b: skipped_differences(st, "ext_id", keys, W, set(keys[3:]), "unlabeled", block=b) for b in (1, 7, 50)}
        held = st.find_keys("ext_id", keys, ("id",))
        _, X = st.vectors(ids=np.array([held[k][0] for k in keys[3:]], dtype=np.int64))
    unit = W[3:] / np.linalg.norm(W[3:], axis=1, keepdims=True)
    brute = sum(not np.allclose(x.astype(np.float32), w, atol=2e-3) for x, w in zip(X, unit))
    assert brute == 4 and set(counts.values()) == {(brute, 0)}, counts


def test_imported_rows_of_huge_or_tiny_values_are_normalised_not_zeroed(tmp_path):
    """A float32 row of 3e38 overflowed its norm to inf and went in as a row of zeros (at
    distance 1 from everything, so picked first); a row of 1e-30 was refused as 'all
    zeros'. Both are directions like any other."""
    from novelty.importer import normalised_blocks

    rng = np.random.default_rng(0)
    X = rng.normal(size=(5, 16)).astype(np.float32)
    X[1] *= np.float32(1e37)
    X[2] *= np.float32(1e-31)
    X[3] = np.float32(3e38)
    with np.errstate(all="raise"):  # no overflow warning leaks to the user either
        (B,) = normalised_blocks(X)
    X64 = X.astype(np.float64)  # in float64 these norms neither overflow nor underflow
    np.testing.assert_allclose(B, X64 / np.linalg.norm(X64, axis=1, keepdims=True), rtol=1e-6, atol=1e-7)
    np.save(tmp_path / "v.npy", X)
    (tmp_path / "ids.txt").write_text("".join(f"x{i}\n" for i in range(5)))
    r = run("import-embeddings", tmp_path / "v.npy", "--ids", tmp_path / "ids.txt", "--split", "unlabeled",
            "--index", tmp_path / "idx")
    assert r.exit_code == 0 and "Warning" not in r.output, r.output
    with open_store(tmp_path / "idx") as st:
        _, V = st.vectors()
        np.testing.assert_allclose(V.astype(np.float32), B, atol=1e-3)


def test_a_link_in_the_labeled_folder_to_the_unlabeled_one_is_refused(tmp_path, sample_dir):
    """A link inside the labeled folder to the unlabeled one (or above it) made every
    image labeled, and nothing said so (QA 14d D4); taking it out later left them as
    labeled centers of files gone (QA 14e D1). Refused before any work, like an unlabeled
    folder inside a labeled one. A link the other way is fine: those are labeled images,
    noted once."""
    lab, unl = copy_samples(tmp_path, sample_dir, n_lab=2, n_unl=3)
    idx = tmp_path / "idx"
    for target in (unl, tmp_path):
        (lab / "back").symlink_to(target, target_is_directory=True)
        r = build(idx, ("labeled", lab), ("unlabeled", unl))
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
        assert f"--labeled {lab} links to --unlabeled {unl} at {lab / 'back'}" in r.output, r.output
        assert not idx.exists()
        (lab / "back").unlink()
    (unl / "lab").symlink_to(lab, target_is_directory=True)
    r = build(idx, ("labeled", lab), ("unlabeled", unl))
    assert r.exit_code == 0 and "note: 2 path(s) given under --unlabeled reach files of a --labeled source" in r.output
    r = build(idx, ("labeled", lab), ("unlabeled", unl))
    assert r.exit_code == 0 and "given under --unlabeled" not in r.output, r.output  # said once
