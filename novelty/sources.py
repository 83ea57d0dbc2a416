"""Turn SRC arguments into image records: a directory (scanned recursively), a list
file (one path per line, relative paths against the list's folder), or one image."""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from ._content import NOT_FOUND
from .config import IMAGE_EXTENSIONS
from .errors import ConfigError, SourceError
from .store import ImageRecord, text_key

log = logging.getLogger(__name__)


def record(path: str, split: str) -> ImageRecord:
    """An image file's size and mtime, or the reason it cannot be one (gone, unreadable,
    a folder, a name that is not UTF-8)."""
    if text_key(path) != path:  # undecodable bytes in the name: recorded under its escaped form, never opened
        return ImageRecord(text_key(path), split, -1, 0.0, "unreadable: the file name is not valid UTF-8; rename the file")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ImageRecord(path, split, -1, 0.0, NOT_FOUND)
    except OSError as e:
        return ImageRecord(path, split, -1, 0.0, f"unreadable: {type(e).__name__}: {e.strerror or e}")
    except ValueError:  # a NUL byte in a list file's line
        return ImageRecord(path, split, -1, 0.0, "unreadable: the path holds a NUL byte")
    if not os.path.isfile(path):
        return ImageRecord(path, split, -1, 0.0, "not a file")
    return ImageRecord(path, split, st.st_size, st.st_mtime, file=f"{st.st_dev}:{st.st_ino}" if st.st_ino else None)


def _walk(root: Path, unlisted: list[str] | None = None) -> Iterator[str]:
    """Image files under `root`, in sorted order. Symlinked folders are followed (a
    dataset laid out with links is scanned whole), except a link back to a folder above
    it (a loop). A folder reached twice otherwise (a folder and a link to it) is walked
    under both paths: Store.sync_sources keeps one image per file, under the path
    indexed before. Folders that cannot be listed are warned about and appended to
    `unlisted`: their images are unknown, not gone."""
    def cannot_list(e: OSError) -> None:
        log.warning("cannot list %s: %s", e.filename, e)
        if unlisted is not None and e.filename:
            unlisted.append(os.path.abspath(e.filename))

    above: dict[str, frozenset] = {}  # a folder's path -> the folders on its way down from root, itself included
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=cannot_list):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        up = above.get(os.path.dirname(dirpath), frozenset()) if dirpath != str(root) else frozenset()
        if (st.st_dev, st.st_ino) in up:  # a loop
            dirnames[:] = []
            continue
        above[dirpath] = up | {(st.st_dev, st.st_ino)}
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                yield os.path.join(dirpath, name)


def list_path(base: Path, line: str) -> str:
    """A list file's line as an absolute path: relative lines are read against the list's folder."""
    return os.path.abspath(line if os.path.isabs(line) else base / line)


def list_entries(lines: Iterable[str], names: Callable[[str], bool], comments: bool = True) -> Iterator[str]:
    """The entries of a list file, one a line (build-index's list sources, mark-labeled's
    and exclude's lists, import-embeddings' ids). Blank lines are skipped, and so are #
    comments (with `comments`: an ids file has none, its lines follow the vectors);
    spaces around an entry are dropped. A file name may start with # or a space, though:
    a line like that is taken as written when `names(line)` says it names an image."""
    for line in lines:
        raw = line.rstrip("\r\n")
        text = raw.strip()
        if not text:
            continue
        comment = comments and text.startswith("#")
        if (raw != text or comment) and names(raw):
            yield raw
        elif not comment:
            yield text


def _read_list(list_file: Path) -> Iterator[str]:
    base = list_file.parent
    try:
        with open(list_file, encoding="utf-8-sig", newline="") as f:
            for entry in list_entries(f, lambda line: os.path.isfile(list_path(base, line))):
                yield list_path(base, entry)
    except UnicodeDecodeError:
        raise SourceError(f"{list_file} is not a directory, an image, or a UTF-8 list of image paths") from None


def parse_part(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N), 1 <= K <= N: this machine's share of the images (build-index --part)."""
    k, sep, n = text.partition("/")
    try:
        part = (int(k), int(n))
    except ValueError:
        part = None
    if not sep or part is None or not 1 <= part[0] <= part[1] or part[1] > 1_000_000:
        raise ConfigError(f"--part must be K/N with 1 <= K <= N <= 1,000,000 (e.g. 2/8), got {text!r}")
    return part


def in_part(path: str, part: tuple[int, int] | None) -> bool:
    """Whether an absolute path falls in part K of N. By a hash of the path, so every
    machine that lists the same files splits them the same way, and a path given under
    both splits lands in one part, where labeled wins as usual."""
    if part is None:
        return True
    digest = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % part[1] == part[0] - 1


def iter_source(src: Path, split: str, part: tuple[int, int] | None = None,
                unlisted: list[str] | None = None) -> Iterator[ImageRecord]:
    """Records for one SRC (with `part`, only the paths in it: the others are not even
    stat'ed). Raises SourceError when it is missing; check_sources, run before any
    scan, refuses one that holds no image."""
    src = Path(src)
    if not src.exists():
        raise SourceError(f"source {src} does not exist")
    if src.is_dir():
        paths: Iterator[str] = _walk(src, unlisted)
    elif src.suffix.lower() in IMAGE_EXTENSIONS:
        paths = iter([str(src)])
    else:
        paths = _read_list(src)
    for p in paths:
        p = os.path.abspath(p)
        if in_part(p, part):
            yield record(p, split)


def scan(labeled: Sequence[Path], unlabeled: Sequence[Path], part: tuple[int, int] | None = None,
         unlisted: list[str] | None = None) -> Iterator[ImageRecord]:
    """Records for every source of both splits (with `part`, of that part only); the
    folders that could not be listed are appended to `unlisted`. Labeled sources go
    first. Every path to a file is met (a folder and a link to it, in one source or two;
    only loops are cut), and the catalog keeps one image per file (Store.sync_sources: the labeled
    path, else the one indexed before, else the first met; a path met under both splits
    is labeled)."""
    for src in labeled:
        yield from iter_source(src, "labeled", part, unlisted)
    for src in unlabeled:
        yield from iter_source(src, "unlabeled", part, unlisted)


def was_listed(path: str, part: tuple[int, int] | None, unlisted: Sequence[str]) -> bool:
    """Whether a scan that did not find `path` has shown it is gone: it is in this part,
    and no folder above it failed to list."""
    return in_part(path, part) and not any(path.startswith(d.rstrip(os.sep) + os.sep) for d in unlisted)


def _check_holds_images(src: Path) -> None:
    """A folder must hold an image file, and a list file must name at least one file
    that exists (any other text file, a script say, would fill the index with junk
    rows). Stops at the first hit, so a big source costs one folder listing or line."""
    if src.is_dir():
        if next(_walk(src), None) is None:
            raise SourceError(f"directory {src} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    elif src.suffix.lower() not in IMAGE_EXTENSIONS:
        n = 0
        for n, path in enumerate(_read_list(src), start=1):
            if os.path.isfile(path):
                return
        what = "holds no image path" if n == 0 else f"names {n} path(s) and none is a file"
        raise SourceError(f"list file {src} {what}; a list holds one image path per line")


def check_sources(labeled: Sequence[Path], unlabeled: Sequence[Path]) -> None:
    """Fail fast, before any work, on a source that does not exist or holds no image,
    or on an unlabeled source that is a labeled folder or lies inside one: every image
    in it would count as labeled. A labeled folder inside the unlabeled one is fine (its
    images are labeled, the rest unlabeled)."""
    for p in (*labeled, *unlabeled):
        if not Path(p).exists():
            raise SourceError(f"source {p} does not exist")
        _check_holds_images(Path(p))
    for u in unlabeled:
        for lab in labeled:
            ru, rl = Path(u).resolve(), Path(lab).resolve()
            if ru == rl or (rl.is_dir() and ru.is_relative_to(rl)):
                how = "is also given as --labeled" if ru == rl else f"lies inside --labeled {lab}"
                raise SourceError(f"--unlabeled {u} {how}: every image in it would count as labeled; "
                                  f"give each folder to one split")
    _check_no_link_into_unlabeled(labeled, unlabeled)


def _check_no_link_into_unlabeled(labeled: Sequence[Path], unlabeled: Sequence[Path]) -> None:
    """A link inside a labeled folder to an unlabeled one (or a folder above it) would
    make every image there labeled, and taking the link out later would leave them as
    labeled centers whose files left: refused, like an unlabeled folder inside a labeled
    one. Walks the labeled folders' folders (one listing each)."""
    def key(p) -> tuple[int, int] | None:
        try:
            st = os.stat(p)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    targets = {}
    for u in unlabeled:
        if Path(u).is_dir():
            for d in (Path(u).resolve(), *Path(u).resolve().parents):
                targets.setdefault(key(d), u)
    targets.pop(None, None)
    for lab in labeled:
        if not Path(lab).is_dir():
            continue
        for dirpath, dirnames, _ in os.walk(lab, followlinks=False):
            for name in dirnames:
                link = os.path.join(dirpath, name)
                if os.path.islink(link) and key(link) in targets:
                    raise SourceError(f"--labeled {lab} links to --unlabeled {targets[key(link)]} at {link}: every "
                                      f"image there would count as labeled; take the link out, or give that folder "
                                      f"to one split")
