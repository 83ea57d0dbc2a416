"""Writers for selections: CSV, JSON lines, Parquet (by extension) and a Label Studio
import file. Every file is written to a temporary name and os.replace'd."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import ConfigError
from ._files import atomic_path

COLUMNS = ["rank", "id", "path", "priority", "novelty", "uncertainty",
           "nearest_labeled_id", "nearest_labeled_distance", "labeled_neighbors", "distance_at_pick"]

Rows = Sequence[dict]


def _clean(v):
    """None for NaN and +-inf: JSON has no such numbers (json.dumps would write the
    invalid tokens NaN and Infinity), and every format writes a missing value the same
    way, as `export` of the run does (the catalog stores a non-finite priority as NULL)."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("writing .parquet needs pyarrow: pip install -c constraints.txt 'novelty[parquet]'") from None
    return pa, pq


def _write(path: Path, data: bytes) -> None:
    """The writers' last step, on write_selection's temporary names: written and fsync'd
    here, so both files are on disk before either is renamed into place."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_csv(path: Path, rows: Rows) -> None:
    """Missing and non-finite values are empty cells: pandas reads them as NaN, and a
    spreadsheet or Label Studio does not see the text 'inf' in a number column."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if _clean(r.get(k)) is None else r.get(k)) for k in COLUMNS})
    _write(path, buf.getvalue().encode())


def write_jsonl(path: Path, rows: Rows) -> None:
    _write(path, "".join(json.dumps({k: _clean(r.get(k)) for k in COLUMNS}, allow_nan=False) + "\n"
                         for r in rows).encode())


# Parquet's types, fixed: inferred from the values, a column with none (no uncertainty, no
# labeled set, random's priority) came out as type null, and files of two rounds would not concatenate
TYPES = {"rank": "int64", "id": "string", "path": "string", "priority": "float64", "novelty": "float64",
         "uncertainty": "float64", "nearest_labeled_id": "string", "nearest_labeled_distance": "float64",
         "labeled_neighbors": "int64", "distance_at_pick": "float64"}


def write_parquet(path: Path, rows: Rows) -> None:
    pa, pq = _pyarrow()
    schema = pa.schema([(k, getattr(pa, TYPES[k])()) for k in COLUMNS])
    table = pa.Table.from_pylist([{k: _clean(r.get(k)) for k in COLUMNS} for r in rows], schema=schema)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    _write(path, buf.getvalue().to_pybytes())


def local_files_url(path: str, root: str) -> str | None:
    """Label Studio's URL for a file under its local-files document root
    (LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT), or None when `path` is not under `root`."""
    rel = os.path.relpath(path, root)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        return None
    return "/data/local-files/?d=" + urllib.parse.quote(Path(rel).as_posix(), safe="/")


def write_label_studio(path: Path, rows: Rows, image_root: str | None = None) -> int:
    """Label Studio tasks: {"data": {"image": ..., <scores>}, "meta": {...}}. With
    `image_root` (the folder Label Studio serves local files from) images are referenced
    as local-files URLs; otherwise, and for images outside it, by their plain path.
    -> the number of images outside `image_root`."""
    tasks, outside = [], 0
    for r in rows:
        p = r.get("path")
        url = local_files_url(p, image_root) if p and image_root else None
        outside += bool(p and image_root and url is None)
        scores = {k: _clean(r.get(k)) for k in COLUMNS if k not in ("path",)}
        tasks.append({"data": {"image": url or p or str(r["id"]), **{f"novelty_{k}": v for k, v in scores.items()}},
                      "meta": scores})
    _write(path, json.dumps(tasks, indent=1, allow_nan=False).encode())
    return outside


def check_label_studio_root(root: Path | None) -> None:
    if root is not None and not Path(root).is_dir():
        raise ConfigError(f"--label-studio-root {root} is not an existing folder")


_FORMATS: dict[str, Callable[[Path, Rows], None]] = {".csv": write_csv, ".jsonl": write_jsonl, ".parquet": write_parquet}


def list_formats() -> list[str]:
    return list(_FORMATS)


def check_out(path: Path) -> None:
    """Fail before any work when `path` cannot be written: its folder must exist and be writable."""
    folder = Path(path).parent
    if not folder.is_dir():
        raise ConfigError(f"cannot write {path}: {folder} is not an existing folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {path}: no permission to write in {folder}")


def check_page_out(path: Path) -> None:
    """check_out for an HTML page, whose name must end in .html or .htm: a page written
    over the command's own CSV, a selection or an image would destroy it."""
    check_out(path)
    if Path(path).suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"cannot write {path}: an HTML page's name must end in .html or .htm")


def get_writer(path: Path) -> Callable[[Path, Rows], None]:
    """The writer for `path`'s extension. Fails, before any work, on an unknown extension
    or a format whose library is not installed (.parquet without pyarrow)."""
    ext = Path(path).suffix.lower()
    if ext not in _FORMATS:
        raise ConfigError(f"cannot write {path}: the extension must be one of {', '.join(_FORMATS)}")
    if ext == ".parquet":
        _pyarrow()
    return _FORMATS[ext]


def sidecar(path: Path) -> Path:
    """The Label Studio file written beside a selection file."""
    path = Path(path)
    return path.with_name(path.stem + ".label-studio.json")


def check_selection_out(path: Path) -> None:
    """check_out for a selection file and the Label Studio file beside it."""
    check_out(path)
    if sidecar(path).is_dir():
        raise ConfigError(f"cannot write {sidecar(path)}, the Label Studio file beside {path}: it is a folder")


def write_selection(path: Path, rows: Rows, image_root: Path | None = None) -> tuple[Path, int]:
    """Write the selection, and a Label Studio file beside it (<stem>.label-studio.json),
    both or neither: each is written whole under a temporary name, then both are renamed.
    -> (that file, the number of images outside `image_root`)."""
    path, ls = Path(path), sidecar(path)
    with atomic_path(path, sync=False, suffix=".part") as t0, atomic_path(ls, sync=False, suffix=".part") as t1:
        # fsync'd by the writers (_write), renamed when both are written: ls, then path
        get_writer(path)(t0, rows)
        outside = write_label_studio(t1, rows, os.path.abspath(image_root) if image_root else None)
    return ls, outside
