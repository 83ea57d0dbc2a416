"""What the selection writers and the CLI write for values that are not ordinary numbers:
non-finite scores in every format, and small means in `novelty uncertainty`'s summary."""
import csv
import json
import math
import os

import pytest

from novelty import export
from tests.conftest import run

ROW = {"rank": 1, "id": "a", "path": "/x/a.jpg", "priority": math.inf, "novelty": None, "uncertainty": math.nan,
       "nearest_labeled_id": None, "nearest_labeled_distance": None, "labeled_neighbors": 0, "distance_at_pick": -math.inf}
NON_FINITE = ("priority", "uncertainty", "distance_at_pick")


def refuse(token):
    raise ValueError(f"{token} is not JSON")


def test_non_finite_values_are_missing_in_every_format(tmp_path):
    rows = [ROW, {**ROW, "rank": 2, "id": "b", "priority": 0.5}]
    ls, _ = export.write_selection(tmp_path / "s.jsonl", rows)
    got = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert all(got[0][k] is None for k in NON_FINITE) and got[1]["priority"] == 0.5
    tasks = json.loads(ls.read_text(), parse_constant=refuse)
    assert all(tasks[0]["meta"][k] is None and tasks[0]["data"][f"novelty_{k}"] is None for k in NON_FINITE)
    export.write_csv(tmp_path / "s.csv", rows)
    with open(tmp_path / "s.csv") as f:
        got = list(csv.DictReader(f))
    assert all(got[0][k] == "" for k in NON_FINITE) and got[0]["labeled_neighbors"] == "0"
    pq = pytest.importorskip("pyarrow.parquet")
    export.write_parquet(tmp_path / "s.parquet", rows)
    got = pq.read_table(tmp_path / "s.parquet").to_pylist()
    assert all(got[0][k] is None for k in NON_FINITE) and got[1]["priority"] == 0.5


def test_parquet_columns_keep_their_types_when_every_value_is_missing(tmp_path):
    """A round without scores or a labeled set writes all-missing columns; they were
    typed null, so two rounds' files had different schemas and would not concatenate."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    empty = {**ROW, "priority": None, "uncertainty": None, "distance_at_pick": None, "labeled_neighbors": None}
    export.write_parquet(tmp_path / "a.parquet", [empty])
    export.write_parquet(tmp_path / "b.parquet", [{**ROW, "rank": 2, "novelty": 0.3, "uncertainty": 0.7,
                                                   "nearest_labeled_id": "L1", "nearest_labeled_distance": 0.3}])
    a, b = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert a.schema == b.schema and pa.types.is_float64(a.schema.field("uncertainty").type)
    both = pa.concat_tables([a, b]).to_pylist()
    assert [r["uncertainty"] for r in both] == [None, 0.7] and both[1]["nearest_labeled_id"] == "L1"


SURE = """
import torch
from torch import nn


class Sure(nn.Module):
    # a segmenter whose dropout only nudges its logits by 1e-3: the passes nearly agree
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):  # [B, 3, H, W] -> logits [B, 3, H, W]
        base = torch.stack([8 * x[:, 0] - 4, -4 + 0 * x[:, 0], -4 + 0 * x[:, 0]], 1)
        return base + 1e-3 * self.drop(x)


def build():
    return Sure()
"""


def test_uncertainty_prints_a_small_mean_with_its_digits(tmp_path, sample_dir):
    from novelty import records
    from novelty.store import open_store
    from tests.conftest import TINY

    src = tmp_path / "u"
    src.mkdir()
    for f in sorted((sample_dir / "unlabeled").glob("unlabeled_*.jpg"))[:3]:
        (src / f.name).write_bytes(f.read_bytes())
    idx = tmp_path / "idx"
    assert run("build-index", "--unlabeled", src, "--model", TINY, "--pretrained", "none", "--device", "cpu",
               "--index", idx).exit_code == 0
    (tmp_path / "sure.py").write_text(SURE)
    r = run("uncertainty", "--detector", f"{tmp_path / 'sure.py'}:build", "--kind", "segmentation", "--passes", 4,
            "--image-size", 32, "--index", idx)
    assert r.exit_code == 0, r.output
    with open_store(idx) as st:
        mean = float(records.latest_uncertainty(st).values.mean())
    assert 0 < mean < 5e-5  # 4 decimals would print 0.0000
    assert f"mean score {mean:.4g} (" in r.output, r.output


def test_label_studio_root_writes_local_files_urls(tmp_path, sample_dir):
    from novelty.store import open_store
    from tests.conftest import TINY

    served = tmp_path / "served"
    for split, folder, n in (("labeled", served / "labeled", 3), ("unlabeled", served / "un labeled", 4),
                             ("unlabeled", tmp_path / "elsewhere", 1)):
        folder.mkdir(parents=True)
        for f in sorted((sample_dir / split).glob(f"{split}_*.jpg"))[:n]:
            (folder / f.name).write_bytes(f.read_bytes())
    idx = tmp_path / "idx"
    assert run("build-index", "--labeled", served / "labeled", "--unlabeled", served / "un labeled", "--unlabeled",
               tmp_path / "elsewhere", "--model", TINY, "--pretrained", "none", "--device", "cpu", "--index", idx).exit_code == 0
    r = run("select", "--budget", 5, "--out", tmp_path / "s.csv", "--label-studio-root", served, "--index", idx)
    assert r.exit_code == 0 and "warning: 1 picked image(s) lie outside --label-studio-root" in r.output, r.output
    tasks = json.loads((tmp_path / "s.label-studio.json").read_text())
    with open(tmp_path / "s.csv") as f:
        paths = [row["path"] for row in csv.DictReader(f)]
    want = [p if "elsewhere" in p else "/data/local-files/?d=un%20labeled/" + p.rsplit("/", 1)[1] for p in paths]
    assert [t["data"]["image"] for t in tasks] == want and len(want) == 5
    r = run("export", "--latest", "--out", tmp_path / "e.csv", "--label-studio-root", served, "--index", idx)
    assert r.exit_code == 0 and json.loads((tmp_path / "e.label-studio.json").read_text())[0]["data"]["image"] == want[0]
    with open_store(idx) as st:
        before = st.db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    r = run("select", "--budget", 2, "--out", tmp_path / "t.csv", "--label-studio-root", tmp_path / "nope", "--index", idx)
    assert r.exit_code == 2 and "is not an existing folder" in r.output and len(r.output.strip().splitlines()) == 1
    with open_store(idx) as st:
        assert st.db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == before  # refused before any work


def test_temporary_files_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    """A select or export killed with -9 cannot remove its temporary files; the next write
    of the same file removes those whose process is gone, on this host, and no others."""
    import socket
    import subprocess
    import sys

    from novelty._files import temp_beside

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now
    host = socket.gethostname()
    for name in ("s.csv", "s.label-studio.json"):
        (tmp_path / f".{name}.~{dead.pid}@{host}~0badc0de.part").write_text("half")
    alive = tmp_path / f".s.csv.~{os.getpid()}@{host}~feedf00d.part"  # a writer still at work
    elsewhere = tmp_path / f".s.csv.~{dead.pid}@another-host~0badc0de.part"  # a shared folder: not ours to judge
    other = tmp_path / f".t.csv.~{dead.pid}@{host}~0badc0de.part"  # another file's
    for f in (alive, elsewhere, other):
        f.write_text("x")
    export.write_selection(tmp_path / "s.csv", [ROW])
    left = sorted(f.name for f in tmp_path.iterdir())
    assert left == sorted([alive.name, elsewhere.name, other.name, "s.csv", "s.label-studio.json"]), left
    assert temp_beside(tmp_path / "s.csv").name.startswith(f".s.csv.~{os.getpid()}@{host}~")
