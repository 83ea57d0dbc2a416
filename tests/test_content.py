"""What an image's bytes say about its earlier rows (novelty._content): new bytes under
an old path lose the old bytes' uncertainty scores; old bytes under a new path take
their marks (labeled, excluded) and scores along, and the old row leaves the pool."""
import csv
import os
import shutil

import pytest
from PIL import Image

from novelty.store import open_store
from tests.conftest import TINY, copy_samples, run


def build(index, lab, unl):
    return run("build-index", "--index", index, "--labeled", lab, "--unlabeled", unl, "--model", TINY, "--pretrained", "none",
               "--device", "cpu", "--workers", 0)


@pytest.fixture
def indexed(tmp_path, sample_dir):
    """10 unlabeled images indexed, each scored 0.1, 0.2, ... by import-uncertainty."""
    lab, unl = copy_samples(tmp_path, sample_dir, n_lab=4, n_unl=10)
    idx = tmp_path / "idx"
    assert build(idx, lab, unl).exit_code == 0
    files = sorted(unl.iterdir())
    with open(tmp_path / "u.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "uncertainty"])
        w.writerows((p, (k + 1) / 10) for k, p in enumerate(files))
    assert run("import-uncertainty", tmp_path / "u.csv", "--index", idx).exit_code == 0
    return idx, lab, unl, files


def scores(idx) -> dict[str, float]:
    """path -> its score in the latest uncertainty run."""
    with open_store(idx) as st:
        return dict(st.db.execute("SELECT i.path, u.value FROM uncertainty u JOIN images i ON i.id = u.image "
                                  "WHERE u.run = (SELECT MAX(run) FROM uncertainty)").fetchall())


def row(idx, path):
    with open_store(idx) as st:
        return st.db.execute("SELECT i.split, i.status, i.reason, i.labeled_at IS NOT NULL, x.reason FROM images i "
                             "LEFT JOIN excluded x ON x.image = i.id WHERE i.path = ?", (str(path),)).fetchone()


def pool(idx) -> set[str]:
    with open_store(idx) as st:
        ids, _ = st.pool_ids()
        return {st.path_of(int(i)) for i in ids}


def test_new_bytes_drop_the_old_scores_and_keep_marks_with_a_warning(indexed, tmp_path):
    idx, lab, unl, files = indexed
    marked, skipped, plain, touched = (str(p) for p in files[:4])
    (tmp_path / "m.txt").write_text(marked + "\n")
    (tmp_path / "x.txt").write_text(skipped + "\n")
    assert run("mark-labeled", tmp_path / "m.txt", "--index", idx).exit_code == 0
    assert run("exclude", tmp_path / "x.txt", "--reason", "blank", "--index", idx).exit_code == 0
    before = scores(idx)
    for k, p in enumerate((marked, skipped, plain)):  # a name reused for a new picture
        Image.new("RGB", (64, 48), (40 * k, 200, 90)).save(p)
    st = os.stat(touched)
    os.utime(touched, (st.st_atime, st.st_mtime + 100))  # touched, the same bytes
    r = build(idx, lab, unl)
    assert r.exit_code == 0, r.output
    assert "new bytes 3 scored image(s) changed since" in r.output, r.output
    assert "3 uncertainty score(s) of their old content dropped" in r.output, r.output
    assert "warning: 1 marked labeled and 1 excluded image(s) hold new bytes" in r.output, r.output
    after = scores(idx)
    assert set(before) - set(after) == {marked, skipped, plain}  # those of the old pictures, gone
    assert after[touched] == before[touched]  # the same bytes keep their score
    assert row(idx, marked)[0] == "labeled" and row(idx, skipped)[4] == "blank"  # kept, and said
    assert plain in pool(idx) and skipped not in pool(idx)
    r = run("select", "--budget", 3, "--strategy", "hybrid", "--index", idx, "--out", tmp_path / "s.csv")
    assert r.exit_code == 0 and "1 unlabeled image(s) have no uncertainty score" in r.output, r.output


def test_a_renamed_image_takes_its_exclusion_mark_and_scores_along(indexed, tmp_path):
    idx, lab, unl, files = indexed
    skipped, marked, other = files[0], files[1], files[2]
    (tmp_path / "x.txt").write_text(f"{skipped}\n")
    (tmp_path / "m.txt").write_text(f"{marked}\n")
    assert run("exclude", tmp_path / "x.txt", "--reason", "private", "--index", idx).exit_code == 0
    assert run("mark-labeled", tmp_path / "m.txt", "--index", idx).exit_code == 0
    before = scores(idx)
    new = {p: p.with_name(f"cam1_{p.name}") for p in (skipped, marked, other)}
    for old, moved in new.items():
        old.rename(moved)
    r = build(idx, lab, unl)
    assert r.exit_code == 0, r.output
    assert "moved     3 image(s) turned up at a new path" in r.output, r.output
    assert "carried to the new paths: 1 marked labeled, 1 excluded, 3 uncertainty score(s)" in r.output, r.output
    assert "gone" not in r.output and "missing" not in r.output  # the old rows moved; nothing was deleted
    assert row(idx, new[skipped])[4] == "private" and row(idx, new[marked])[:1] == ("labeled",)
    assert row(idx, new[marked])[3] == 1  # as mark-labeled's: a later scan of the folder keeps it labeled
    for old, moved in new.items():
        split, status, reason, _, _ = row(idx, old)
        assert status == "failed" and reason == f"moved: its bytes are now at {moved}"
    after = scores(idx)
    assert after[str(new[other])] == before[str(other)] and after[str(new[skipped])] == before[str(skipped)]
    p = pool(idx)
    assert str(new[skipped]) not in p and str(new[marked]) not in p and str(new[other]) in p
    assert not any(str(old) in p for old in new)
    r = build(idx, lab, unl)  # once more: nothing changes
    assert r.exit_code == 0 and "moved" not in r.output and row(idx, new[marked])[0] == "labeled", r.output
    shutil.copy(new[other], other)  # the old file comes back (a share mounted again): read again, a copy now
    r = build(idx, lab, unl)
    assert r.exit_code == 0 and "moved" not in r.output, r.output
    assert row(idx, other)[1] == "embedded" and str(other) in pool(idx) and str(new[other]) in pool(idx)


def test_a_renamed_folder_does_not_double_the_pool(indexed, tmp_path):
    """The old folder is no longer given, so no scan sees its files gone: the bytes do."""
    idx, lab, unl, files = indexed
    before, scored = pool(idx), scores(idx)
    raw = tmp_path / "raw"
    unl.rename(raw)
    r = build(idx, lab, raw)
    assert r.exit_code == 0, r.output
    after = pool(idx)
    assert len(after) == len(before) == 10 and all(p.startswith(str(raw) + os.sep) for p in after)
    assert scores(idx) == {p.replace(str(unl), str(raw), 1): v for p, v in scored.items()}  # moved, not copied


def test_a_copy_is_not_a_move(indexed, tmp_path):
    """The same bytes at a second path while the first is still there: two images, both
    candidates, the copy with no marks (a duplicate, as before)."""
    idx, lab, unl, files = indexed
    (tmp_path / "x.txt").write_text(f"{files[0]}\n")
    assert run("exclude", tmp_path / "x.txt", "--index", idx).exit_code == 0
    shutil.copy(files[0], unl / "copy.jpg")
    r = build(idx, lab, unl)
    assert r.exit_code == 0 and "moved" not in r.output, r.output
    assert row(idx, files[0])[1] == "embedded" and row(idx, unl / "copy.jpg")[4] is None
    assert str(unl / "copy.jpg") in pool(idx)


def test_an_undo_at_the_new_path_holds_when_the_file_moves_back(indexed, tmp_path):
    """Marks move with the bytes, they are not copied: an exclusion or a mark undone at
    the new path does not come back from the old row when the file goes back."""
    idx, lab, unl, files = indexed
    skipped, marked = files[0], files[1]
    (tmp_path / "x.txt").write_text(f"{skipped}\n")
    (tmp_path / "m.txt").write_text(f"{marked}\n")
    assert run("exclude", tmp_path / "x.txt", "--index", idx).exit_code == 0
    assert run("mark-labeled", tmp_path / "m.txt", "--index", idx).exit_code == 0
    away = {p: p.with_name(f"B_{p.name}") for p in (skipped, marked)}
    for p, q in away.items():
        p.rename(q)
    assert build(idx, lab, unl).exit_code == 0
    (tmp_path / "ux.txt").write_text(f"{away[skipped]}\n")
    (tmp_path / "um.txt").write_text(f"{away[marked]}\n")
    assert run("exclude", "--undo", tmp_path / "ux.txt", "--index", idx).exit_code == 0
    assert run("mark-labeled", "--undo", tmp_path / "um.txt", "--index", idx).exit_code == 0
    for p, q in away.items():
        q.rename(p)
    r = build(idx, lab, unl)
    assert r.exit_code == 0 and "moved     2 image(s)" in r.output, r.output
    assert row(idx, skipped)[1:] == ("embedded", None, 0, None) and row(idx, marked)[:2] == ("unlabeled", "embedded")
    assert {str(skipped), str(marked)} <= pool(idx) and not {str(q) for q in away.values()} & pool(idx)


def test_the_same_bytes_at_two_new_paths_count_one_move(indexed, tmp_path):
    idx, lab, unl, files = indexed
    shutil.copy(files[0], unl / "a.jpg")
    shutil.copy(files[0], unl / "b.jpg")
    files[0].unlink()
    r = build(idx, lab, unl)
    assert r.exit_code == 0 and "moved     1 image(s)" in r.output, r.output
    assert {str(unl / "a.jpg"), str(unl / "b.jpg")} <= pool(idx) and str(files[0]) not in pool(idx)


def test_a_selection_made_before_files_were_renamed_still_names_them(indexed, tmp_path):
    """The usual order: select, files reorganised while the labelers work, then
    mark-labeled --selection and exclude by the old paths: they act on the images at
    their new paths, which are not picked again (before, they acted on the dead rows)."""
    idx, lab, unl, files = indexed
    sel = tmp_path / "sel.csv"
    assert run("select", "--budget", 3, "--strategy", "kcenter", "--index", idx, "--out", sel).exit_code == 0
    picked = [r["path"] for r in csv.DictReader(open(sel))]
    for p in picked:
        os.rename(p, p.replace("unlabeled_", "MV_unlabeled_"))
    assert build(idx, lab, unl).exit_code == 0
    skipped = tmp_path / "skip.txt"
    skipped.write_text(f"{picked[2]}\n")
    r = run("exclude", skipped, "--index", idx)
    assert r.exit_code == 0 and "1 of the images named have moved since" in r.output, r.output
    (tmp_path / "done.csv").write_text("id,path\n" + "".join(f"{row['id']},{row['path']}\n" for row in
                                                             list(csv.DictReader(open(sel)))[:2]))
    r = run("mark-labeled", "--selection", tmp_path / "done.csv", "--index", idx)
    assert r.exit_code == 0 and "2 of the images named have moved since" in r.output and "marked 2" in r.output, r.output
    now = [p.replace("unlabeled_", "MV_unlabeled_") for p in picked]
    assert row(idx, now[0])[0] == row(idx, now[1])[0] == "labeled" and row(idx, now[2])[4] is None  # no --reason given
    assert not set(now) & pool(idx)
    with open_store(idx) as st:
        assert st.db.execute("SELECT labeled_by FROM images WHERE path=?", (now[0],)).fetchone()[0] is not None  # its select run
    r = run("mark-labeled", "--undo", "--selection", tmp_path / "done.csv", "--index", idx)  # undo by the same file
    assert r.exit_code == 0 and "moved 2 image(s) back to unlabeled" in r.output, r.output
    assert set(now[:2]) <= pool(idx)


def test_a_move_is_followed_only_to_the_same_bytes(indexed, tmp_path):
    """A name the image moved to, since given to another picture, is not the image: the
    old path then names nothing alive, and mark-labeled marks no stranger."""
    idx, lab, unl, files = indexed
    picked, other = files[0], files[1]
    (tmp_path / "p.txt").write_text(f"{picked}\n")
    picked.rename(unl / "B.jpg")
    assert build(idx, lab, unl).exit_code == 0
    (unl / "B.jpg").rename(tmp_path / "archive.jpg")  # archived out of the data set...
    other.rename(unl / "B.jpg")  # ...and its name reused by another picture
    assert build(idx, lab, unl).exit_code == 0
    r = run("mark-labeled", tmp_path / "p.txt", "--index", idx)
    assert r.exit_code == 0 and "have moved since" not in r.output, r.output
    assert row(idx, unl / "B.jpg")[:2] == ("unlabeled", "embedded")  # the other picture: not marked


def test_a_recorded_selection_is_read_at_the_paths_its_picks_have_now(indexed, tmp_path):
    """export --run, report --selection, neighbors and info's history, after the folder
    the picks were in was renamed: the picks at their new paths, not 'has no vector'."""
    idx, lab, unl, files = indexed
    sel = tmp_path / "sel.csv"
    assert run("select", "--budget", 3, "--strategy", "kcenter", "--index", idx, "--out", sel).exit_code == 0
    pool_dir = tmp_path / "pool"
    unl.rename(pool_dir)
    assert build(idx, lab, pool_dir).exit_code == 0
    assert run("mark-labeled", "--selection", sel, "--index", idx).exit_code == 0
    r = run("info", "--index", idx)
    assert "kcenter 3 picks — 3 marked labeled" in r.output, r.output
    r = run("export", "--latest", "--out", tmp_path / "again.csv", "--index", idx)
    assert r.exit_code == 0 and "3 of the picks have moved since" in r.output, r.output
    paths = [row_["path"] for row_ in csv.DictReader(open(tmp_path / "again.csv"))]
    assert len(paths) == 3 and all(p.startswith(str(pool_dir) + os.sep) and os.path.isfile(p) for p in paths)
    r = run("report", "--selection", sel, "--out", tmp_path / "r.html", "--index", idx)
    assert r.exit_code == 0 and "3 of the picks have moved since" in r.output, r.output
    old = next(p for p in csv.DictReader(open(sel)))["path"]
    r = run("neighbors", old, "--index", idx, "--k", 2)
    assert r.exit_code == 0 and f"{old} is indexed at " in r.output and "(the file moved there" in r.output, r.output


def test_an_image_moved_into_the_labeled_folder_leaves_no_mark_behind(indexed, tmp_path):
    idx, lab, unl, files = indexed
    (tmp_path / "x.txt").write_text(f"{files[0]}\n")
    assert run("exclude", tmp_path / "x.txt", "--index", idx).exit_code == 0
    files[0].rename(lab / "now_labeled.jpg")
    r = build(idx, lab, unl)
    assert r.exit_code == 0 and "moved     1 image(s)" in r.output, r.output
    assert row(idx, files[0])[4] is None and row(idx, lab / "now_labeled.jpg")[0] == "labeled"
    r = run("info", "--index", idx)
    assert "excluded" not in r.output.split("history")[0], r.output  # labeled now: nothing left excluded


def test_scores_imported_by_a_path_an_image_moved_from_go_to_it(indexed, tmp_path):
    idx, lab, unl, files = indexed
    moved = unl / "moved.jpg"
    files[0].rename(moved)
    assert build(idx, lab, unl).exit_code == 0
    (tmp_path / "old.csv").write_text(f"id,uncertainty\n{files[0]},0.75\n")
    r = run("import-uncertainty", tmp_path / "old.csv", "--index", idx)
    assert r.exit_code == 0 and "1 of the images scored have moved since" in r.output, r.output
    assert scores(idx) == {str(moved): 0.75}


def build_srcs(index, *srcs):
    args = ["build-index", "--index", index, "--model", TINY, "--pretrained", "none", "--device", "cpu", "--workers", 0]
    for src in srcs:
        args += [src] if isinstance(src, str) else [f"--{src[0]}", src[1]]  # (split, source), or a flag
    return run(*args)


def test_one_file_reached_through_two_paths_is_one_image(tmp_path, sample_dir):
    """A list of symlinks into a scanned folder, and a hard link: each file is indexed
    once, under the path met first; the others are recorded as linked to it."""
    lab, unl = copy_samples(tmp_path, sample_dir, n_lab=2, n_unl=6)
    files = sorted(unl.iterdir())
    links = tmp_path / "links"
    links.mkdir()
    for f in files[:3]:
        (links / f.name).symlink_to(f)
    os.link(files[3], unl / "zz_hard.jpg")
    (tmp_path / "list.txt").write_text("".join(f"{links / f.name}\n" for f in files[:3]))
    (lab / "lab_link.jpg").symlink_to(files[4])  # labeled wins, wherever it is met
    idx = tmp_path / "idx"
    r = build_srcs(idx, ("labeled", lab), ("unlabeled", unl), ("unlabeled", tmp_path / "list.txt"))
    assert r.exit_code == 0 and "linked    5 path(s)" in r.output and "duplicates" not in r.output, r.output
    for f in files[:3]:
        assert row(idx, f)[:2] == ("unlabeled", "embedded")
        assert row(idx, links / f.name)[1:3] == ("failed", f"linked: the same file is indexed at {f}")
    assert row(idx, files[3])[1] == "embedded" and row(idx, unl / "zz_hard.jpg")[1] == "failed"
    assert row(idx, lab / "lab_link.jpg")[:2] == ("labeled", "embedded") and row(idx, files[4])[1] == "failed"
    assert pool(idx) == {str(files[3]), str(files[5]), *map(str, files[:3])}
    r = build_srcs(idx, ("labeled", lab), ("unlabeled", unl), ("unlabeled", tmp_path / "list.txt"))
    assert r.exit_code == 0 and "embedded  0" in r.output and "failed    0" in r.output, r.output


def test_a_file_indexed_under_two_paths_keeps_its_marks_at_the_path_kept(tmp_path, sample_dir):
    """Indexed twice by runs that each met one path (a folder, then a list of links to
    it), in an index made before file identities were recorded (a later run now links
    the second path at once: the test above): a run that meets both keeps the first one
    scanned, and the marks of the other go to it, as for a move; a list naming the
    dropped path is followed to it."""
    lab, unl = copy_samples(tmp_path, sample_dir, n_lab=2, n_unl=4)
    f = sorted(unl.iterdir())[0]
    link = tmp_path / "links" / "a.jpg"
    link.parent.mkdir()
    link.symlink_to(f)
    lst = tmp_path / "list.txt"
    lst.write_text(f"{link}\n")
    idx = tmp_path / "idx"
    assert build_srcs(idx, ("labeled", lab), ("unlabeled", unl)).exit_code == 0
    (tmp_path / "x.txt").write_text(f"{f}\n")
    assert run("exclude", tmp_path / "x.txt", "--reason", "blank", "--index", idx).exit_code == 0
    with open_store(idx, writable=True) as st:
        st.db.execute("UPDATE images SET file = NULL")  # as a catalog from before session 14 holds them
    r = build_srcs(idx, ("unlabeled", lst))
    assert r.exit_code == 0 and "duplicates 2 images" in r.output and str(link) in pool(idx), r.output  # met apart: two
    r = build_srcs(idx, ("labeled", lab), ("unlabeled", lst), ("unlabeled", unl))  # both met: the list's is first
    assert r.exit_code == 0 and "linked    1 path(s)" in r.output and "1 excluded" in r.output, r.output
    assert "0 changed" in r.output, r.output  # the path that became a link is on the linked line, not "changed"
    assert row(idx, f)[1:3] == ("failed", f"linked: the same file is indexed at {link}")
    assert row(idx, link)[4] == "blank" and str(link) not in pool(idx) and str(f) not in pool(idx)
    r = run("exclude", tmp_path / "x.txt", "--undo", "--index", idx)  # names the dropped path: followed
    assert r.exit_code == 0 and str(link) in pool(idx), r.output


def test_a_path_linked_from_its_first_scan_is_followed_by_marks(tmp_path, sample_dir):
    """A hard link met after the file it links (so never read, no hash): mark-labeled and
    exclude given that path act on the image, and their undos too (they marked the dead
    row, and select picked the image; QA 14c D2)."""
    lab, unl = copy_samples(tmp_path, sample_dir, n_lab=2, n_unl=4)
    files = sorted(unl.iterdir())
    hard = tmp_path / "zz_hard"
    hard.mkdir()
    for f in files[:2]:
        os.link(f, hard / f.name)
    idx = tmp_path / "idx"
    r = build_srcs(idx, ("labeled", lab), ("unlabeled", unl), ("unlabeled", hard))
    assert r.exit_code == 0 and "linked    2 path(s)" in r.output, r.output
    r = build_srcs(idx, ("labeled", lab), ("unlabeled", unl), ("unlabeled", hard), "--retry-failed")
    assert r.exit_code == 0 and "linked    " not in r.output and "tried again" not in r.output, r.output  # not failures
    (tmp_path / "m.txt").write_text(f"{hard / files[0].name}\n")
    (tmp_path / "x.txt").write_text(f"{hard / files[1].name}\n")
    r = run("mark-labeled", tmp_path / "m.txt", "--index", idx)
    assert r.exit_code == 0 and "marked 1 image(s) labeled" in r.output and "no vector" not in r.output, r.output
    assert run("exclude", tmp_path / "x.txt", "--reason", "blank", "--index", idx).exit_code == 0
    assert row(idx, files[0])[0] == "labeled" and row(idx, files[1])[4] == "blank"
    assert pool(idx) == {str(f) for f in files[2:]}
    assert run("mark-labeled", tmp_path / "m.txt", "--undo", "--index", idx).exit_code == 0
    assert run("exclude", tmp_path / "x.txt", "--undo", "--index", idx).exit_code == 0
    assert pool(idx) == {str(f) for f in files}


def test_a_linked_path_met_alone_later_stays_linked(tmp_path, sample_dir):
    """A folder indexed with a link to it, then only the link given: the linked rows were
    read again as 'changed' and every image was in the pool twice, the excluded ones too
    (QA 14d D1). Also a link from the unlabeled folder into the labeled one, met alone."""
    lab, unl = copy_samples(tmp_path, sample_dir, n_lab=2, n_unl=5)
    (tmp_path / "UL").symlink_to(unl, target_is_directory=True)
    (unl / "Lk").symlink_to(lab, target_is_directory=True)
    idx = tmp_path / "idx"
    assert build_srcs(idx, ("labeled", lab), ("unlabeled", unl), ("unlabeled", tmp_path / "UL")).exit_code == 0
    files = sorted(unl.glob("*.jpg"))
    (tmp_path / "x.txt").write_text("".join(f"{f}\n" for f in files[:3]))
    assert run("exclude", tmp_path / "x.txt", "--index", idx).exit_code == 0
    before = pool(idx)
    assert before == {str(f) for f in files[3:]}
    for srcs in ((("labeled", lab), ("unlabeled", tmp_path / "UL")), (("unlabeled", unl),)):
        r = build_srcs(idx, *srcs)
        assert r.exit_code == 0 and "embedded  0" in r.output and "duplicates" not in r.output, r.output
        assert pool(idx) == before, srcs
    with open_store(idx) as st:
        c = st.counts()["by_split_status"]
    assert c[("labeled", "embedded")] == 2 and c[("unlabeled", "embedded")] == 5


def test_marks_kept_on_a_symlink_follow_its_target_when_that_is_renamed(tmp_path, sample_dir):
    """The link met first is the path kept, with the marks; its target renamed leaves it
    broken ('not found'), and the marks went nowhere: the image came back unlabeled, or
    included (QA 14d D2). They now follow the bytes, as for a plain rename."""
    _, unl = copy_samples(tmp_path, sample_dir, n_lab=0, n_unl=3)
    files = sorted(unl.glob("*.jpg"))
    (unl / "a_link.jpg").symlink_to(files[1].name)
    (unl / "a_link2.jpg").symlink_to(files[2].name)
    lab = tmp_path / "lab"
    lab.mkdir()
    shutil.copy(sample_dir / "labeled" / sorted(p.name for p in (sample_dir / "labeled").glob("*.jpg"))[0], lab / "l.jpg")
    idx = tmp_path / "idx"
    r = build(idx, lab, unl)
    assert r.exit_code == 0 and row(idx, files[1])[2] == f"linked: the same file is indexed at {unl / 'a_link.jpg'}"
    (tmp_path / "m.txt").write_text(f"{files[1]}\n")
    (tmp_path / "x.txt").write_text(f"{files[2]}\n")
    assert run("mark-labeled", tmp_path / "m.txt", "--index", idx).exit_code == 0
    assert run("exclude", tmp_path / "x.txt", "--index", idx).exit_code == 0
    files[1].rename(unl / "renamed.jpg")
    files[2].rename(unl / "z0.jpg")
    r = build(idx, lab, unl)
    assert r.exit_code == 0, r.output
    assert row(idx, unl / "renamed.jpg")[:2] == ("labeled", "embedded")
    assert str(unl / "z0.jpg") not in pool(idx) and pool(idx) == {str(files[0])}  # excluded where it went
    r = run("exclude", tmp_path / "x.txt", "--undo", "--index", idx)  # the old path still names the image
    assert r.exit_code == 0 and str(unl / "z0.jpg") in pool(idx), r.output


def test_a_link_met_in_a_later_run_is_linked_to_the_image_indexed_before(tmp_path, sample_dir):
    """A folder indexed, images excluded and marked; then only a new folder of links to it
    given: each link path is linked to the row indexed before, so the pool is not doubled
    and the excluded and marked images are not picked under their new paths (QA 14e D2)."""
    lab, unl = copy_samples(tmp_path, sample_dir, n_lab=2, n_unl=5)
    idx = tmp_path / "idx"
    assert build(idx, lab, unl).exit_code == 0
    files = sorted(unl.glob("*.jpg"))
    (tmp_path / "x.txt").write_text(f"{files[0]}\n")
    (tmp_path / "m.txt").write_text(f"{files[1]}\n")
    assert run("exclude", tmp_path / "x.txt", "--index", idx).exit_code == 0
    assert run("mark-labeled", tmp_path / "m.txt", "--index", idx).exit_code == 0
    before = pool(idx)
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "link").symlink_to(unl, target_is_directory=True)
    r = build_srcs(idx, ("labeled", lab), ("unlabeled", tmp_path / "pool"))
    assert r.exit_code == 0 and "embedded  0" in r.output and "linked    5 path(s)" in r.output, r.output
    assert pool(idx) == before and len(before) == 3
    r = build_srcs(idx, ("labeled", lab), ("unlabeled", tmp_path / "pool"))
    assert r.exit_code == 0 and "embedded  0" in r.output and "linked    " not in r.output, r.output
    assert pool(idx) == before
