"""HAM10000 ("Human Against Machine", Tschandl et al. 2018) from the Kaggle download.

Reads ``HAM10000_metadata.csv`` and the JPEGs from a user-given folder and
returns :class:`~jaxcam.data.manual.Item` records; the TFDS builder in
:mod:`jaxcam.data.builders` writes them. Layouts accepted (case-insensitive):
the two image folders, the two zip files, or all JPEGs in the folder itself.
"""

from __future__ import annotations

import math
from pathlib import Path

from jaxcam.data.manual import BadInputError, Item, find_ci, index_images, layout_error, read_csv

DISPLAY = "HAM10000"
URL = "https://www.kaggle.com/datasets/kmader/skin-cancer-mnist-ham10000"
DATAVERSE_URL = "https://doi.org/10.7910/DVN/DBW86T"  # the authors' release (Harvard Dataverse)
METADATA = "HAM10000_metadata.csv"
CLASS_NAMES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
DISPLAY_NAMES: tuple[str, ...] = (
    "Actinic keratosis / intraepithelial carcinoma",
    "Basal cell carcinoma",
    "Benign keratosis-like lesion",
    "Dermatofibroma",
    "Melanoma",
    "Melanocytic nevus",
    "Vascular lesion",
)
MALIGNANT: tuple[bool, ...] = (True, True, False, False, True, False, False)
COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")

LAYOUT = f"""\
Expected the Kaggle "Skin Cancer MNIST: HAM10000" download, unzipped
({URL}):
  MANUAL_DIR/
    {METADATA}            (columns: {", ".join(COLUMNS)})
    HAM10000_images_part_1/ISIC_0024306.jpg ...
    HAM10000_images_part_2/ISIC_0029306.jpg ...
  or the two archives HAM10000_images_part_1.zip and HAM10000_images_part_2.zip
  in MANUAL_DIR, or all ISIC_*.jpg directly in MANUAL_DIR.
Download it yourself (jaxcam never downloads data) from
  Kaggle (free account): {URL}
  or Harvard Dataverse:  {DATAVERSE_URL} (HAM10000_images_part1.zip,
                         HAM10000_images_part2.zip and HAM10000_metadata, saved as
                         {METADATA}, comma-separated)
Then run: jaxcam data build ham10000 --manual-dir MANUAL_DIR"""


def image_sources(manual_dir: Path) -> list[Path]:
    """The folder itself, then image folders and zips named ``HAM10000_images_part*``."""
    parts = [
        p
        for p in sorted(manual_dir.iterdir())
        if p.name.lower().startswith("ham10000_images_part")
        and (p.is_dir() or p.suffix.lower() == ".zip")
    ]
    return [manual_dir, *parts]


def read_items(manual_dir: str | Path) -> list[Item]:
    """Validate the folder and return one item per metadata row (image None if absent).

    Raises ``FileNotFoundError`` (no folder, no metadata, no images at all) or
    :class:`BadInputError` (wrong columns, unknown ``dx``, duplicated image ids),
    each with the expected layout.
    """
    manual_dir = Path(manual_dir).expanduser()
    if not manual_dir.is_dir():
        raise layout_error(
            FileNotFoundError, f"{DISPLAY} folder {manual_dir} does not exist.", LAYOUT
        )
    meta = find_ci(manual_dir, METADATA)
    if meta is None:
        raise layout_error(FileNotFoundError, f"No {METADATA} in {manual_dir}.", LAYOUT)
    rows = read_csv(meta, COLUMNS, LAYOUT)
    if not rows:
        raise layout_error(BadInputError, f"{meta} has no rows.", LAYOUT)
    images = index_images(image_sources(manual_dir), (".jpg", ".jpeg"))
    if not images:
        raise layout_error(
            FileNotFoundError, f"No HAM10000 JPEG images found in {manual_dir}.", LAYOUT
        )
    items, seen = [], set()
    unknown = []
    for line, row in enumerate(rows, start=2):
        dx = row["dx"].lower()
        if dx not in CLASS_NAMES:
            unknown.append(f"line {line}: dx={row['dx']!r}")
            continue
        image_id = row["image_id"]
        if not image_id or not row["lesion_id"]:
            raise BadInputError(f"{meta} line {line}: empty image_id or lesion_id.")
        if image_id in seen:
            raise BadInputError(f"{meta} line {line}: image_id {image_id} appears twice.")
        seen.add(image_id)
        try:
            age = float(row["age"]) if row["age"] else math.nan
        except ValueError:
            age = math.nan
        label = CLASS_NAMES.index(dx)
        items.append(
            Item(
                key=image_id,
                image=images.get(image_id),
                label=label,
                group=row["lesion_id"],
                fields={
                    "image_id": image_id,
                    "lesion_id": row["lesion_id"],
                    "dx_type": row["dx_type"],
                    "age": age,
                    "sex": row["sex"],
                    "localization": row["localization"],
                    "malignant": MALIGNANT[label],
                },
            )
        )
    if unknown:
        raise BadInputError(
            f"{meta}: unknown dx value(s) (expected one of {list(CLASS_NAMES)}): "
            + "; ".join(unknown[:10])
            + (f"; ... {len(unknown) - 10} more" if len(unknown) > 10 else "")
        )
    return items
