"""Reading manually downloaded datasets: image references, CSVs, image checks.

Shared by the HAM10000 and APTOS 2019 readers. Everything here runs *before*
a TFDS build writes anything, so a wrong folder or a bad file is reported in
seconds (layout, CSV columns, missing files) or after one read-only pass over
the images (unreadable or truncated files), never half-way through a build.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import threading
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

MAX_LISTED = 20  # bad files named in one error message


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """An image file on disk, or a member of a zip archive."""

    path: Path
    member: str | None = None

    def __str__(self) -> str:
        return f"{self.path}:{self.member}" if self.member else str(self.path)

    def read_bytes(self) -> bytes:
        if self.member is None:
            return self.path.read_bytes()
        return _open_zip(self.path).read(self.member)


_ZIPS = threading.local()


def _open_zip(path: Path) -> zipfile.ZipFile:
    """One open handle per archive and thread: parsing the central directory of
    a 5000-member zip for every image would dominate the build; ZipFile reads
    are not thread-safe, hence per thread."""
    handles = _ZIPS.__dict__.setdefault("handles", {})
    if path not in handles:
        handles[path] = zipfile.ZipFile(path)
    return handles[path]


@dataclasses.dataclass(frozen=True)
class Item:
    """One example of a manual dataset before encoding.

    ``key`` is unique and stable (the image id); ``group`` is what the split
    keeps together (lesion id, or the image id itself); ``fields`` are the
    extra TFDS features (metadata).
    """

    key: str
    image: ImageRef | None
    label: int
    group: str
    fields: dict[str, Any]


class BadInputError(ValueError):
    """The manual folder or its files are not what the builder expects."""


def layout_error(kind: type[Exception], problem: str, layout: str) -> Exception:
    return kind(f"{problem}\n\n{layout}")


def read_csv(path: Path, required: Sequence[str], layout: str) -> list[dict[str, str]]:
    """Rows of a CSV as dicts; raises naming the file and the missing columns."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in required if c not in columns]
            if missing:
                raise layout_error(
                    BadInputError,
                    f"{path} has columns {columns}; missing required column(s) {missing} "
                    f"(expected at least {list(required)}).",
                    layout,
                )
            return [
                {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
                for row in reader
            ]
    except UnicodeDecodeError as e:
        raise layout_error(BadInputError, f"{path} is not a UTF-8 CSV file ({e}).", layout) from e


def find_ci(directory: Path, name: str) -> Path | None:
    """``directory / name`` matched case-insensitively (Kaggle ships both cases)."""
    exact = directory / name
    if exact.exists():
        return exact
    for p in sorted(directory.iterdir()):
        if p.name.lower() == name.lower():
            return p
    return None


def index_images(sources: Sequence[Path], suffixes: Sequence[str]) -> dict[str, ImageRef]:
    """Map image stem -> reference over folders and zip files (first occurrence wins)."""
    found: dict[str, ImageRef] = {}
    suffixes = tuple(s.lower() for s in suffixes)
    for src in sources:
        if src.is_dir():
            for p in sorted(src.iterdir()):
                if p.is_file() and p.suffix.lower() in suffixes:
                    found.setdefault(p.stem, ImageRef(p))
        elif src.is_file() and src.suffix.lower() == ".zip":
            try:
                with zipfile.ZipFile(src) as zf:
                    names = sorted(zf.namelist())
            except zipfile.BadZipFile as e:
                raise BadInputError(
                    f"{src} is not a readable zip file ({e}); re-download it."
                ) from e
            for m in names:
                pm = Path(m)
                if pm.suffix.lower() in suffixes and not pm.name.startswith("."):
                    found.setdefault(pm.stem, ImageRef(src, m))
    return found


@dataclasses.dataclass(frozen=True)
class CheckedImage:
    """Result of reading one image fully: its size and PIL mode, or the error."""

    size: tuple[int, int] | None  # (width, height)
    mode: str | None
    error: str | None


def check_image(ref: ImageRef) -> CheckedImage:
    """Decode the whole image (catches truncated files, which ``verify()`` misses)."""
    try:
        data = ref.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return CheckedImage(size=im.size, mode=im.mode, error=None)
    except FileNotFoundError:
        return CheckedImage(None, None, "missing")
    except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"
        return CheckedImage(None, None, f"unreadable ({type(e).__name__}: {e})")


def screen_items(
    items: Sequence[Item],
    skip_bad: bool,
    progress: bool,
    dataset: str,
    check: Callable = check_image,
    num_threads: int = 2,
) -> tuple[list[Item], dict[str, CheckedImage], list[tuple[str, str]]]:
    """Check every item's image (decoded in ``num_threads`` threads); return
    (good items, checks by key, skipped (name, reason)).

    Items without an image (``image is None``) are "missing". With
    ``skip_bad=False`` any bad item raises :class:`BadInputError` listing them.
    """
    good, checks, bad = [], {}, []
    with ThreadPoolExecutor(max_workers=num_threads) as pool:  # decoders release the GIL
        results = pool.map(lambda it: None if it.image is None else check(it.image), items)
        bar = tqdm(
            zip(items, results, strict=True),
            total=len(items),
            desc=f"Checking {dataset} images",
            unit="img",
            disable=not progress,
        )
        pairs = list(bar)
    for item, result in pairs:
        if result is None:
            bad.append((item.key, "missing: no image file with this id"))
            continue
        if result.error is not None:
            bad.append((str(item.image), result.error))
            continue
        checks[item.key] = result
        good.append(item)
    if bad and not skip_bad:
        listed = "\n".join(f"  {name}: {why}" for name, why in bad[:MAX_LISTED])
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise BadInputError(
            f"{len(bad)} of {len(items)} {dataset} images are missing or unreadable:\n"
            f"{listed}{more}\n"
            "Fix or re-download these files, or pass skip_bad=True "
            "(CLI: --skip-bad) to leave them out; they are then counted in the build summary."
        )
    return good, checks, bad


def encode_image(ref: ImageRef, check: CheckedImage, max_size: int | None) -> bytes:
    """The stored bytes: the original file when it is RGB and small enough, else
    an RGB re-encode (JPEG quality 95) with the longer side resized to ``max_size``."""
    data = ref.read_bytes()
    w, h = check.size
    if check.mode == "RGB" and (max_size is None or max(w, h) <= max_size):
        return data
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if max_size is not None and max(w, h) > max_size:
            scale = max_size / max(w, h)
            im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)
        return buf.getvalue()


def png_bytes(array: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 ``(H, W)`` or ``(H, W, 3)`` array (fast zlib level 1:
    textured images barely compress further, and level 6 costs ~10x the time)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
