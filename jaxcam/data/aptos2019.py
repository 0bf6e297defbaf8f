"""APTOS 2019 Blindness Detection (Kaggle competition) from its training download.

``train.csv`` (id_code, diagnosis 0-4) and ``train_images/<id_code>.png``;
the competition's test set has no labels, so train/validation/test are all
carved out of ``train.csv`` (stratified by grade). The "malignant" flag of the
other datasets is, here, *referable* diabetic retinopathy (grade >= 2).
"""

from __future__ import annotations

from pathlib import Path

from jaxcam.data.manual import BadInputError, Item, find_ci, index_images, layout_error, read_csv

DISPLAY = "APTOS 2019"
URL = "https://www.kaggle.com/competitions/aptos2019-blindness-detection/data"
CLASS_NAMES: tuple[str, ...] = ("no_dr", "mild", "moderate", "severe", "proliferative_dr")
DISPLAY_NAMES: tuple[str, ...] = (
    "No diabetic retinopathy",
    "Mild",
    "Moderate",
    "Severe",
    "Proliferative diabetic retinopathy",
)
MALIGNANT: tuple[bool, ...] = (False, False, True, True, True)  # referable DR
COLUMNS: tuple[str, ...] = ("id_code", "diagnosis")

LAYOUT = f"""\
Expected the Kaggle "APTOS 2019 Blindness Detection" download, unzipped
({URL}):
  MANUAL_DIR/
    train.csv                 (columns: id_code, diagnosis with grades 0-4)
    train_images/000c1434d8d7.png ...
  (train_images.zip in MANUAL_DIR is accepted too; test_images/ is not used.)
Download it (jaxcam never downloads data) from the competition's data page on Kaggle,
  {URL}
  (sign in and accept the competition rules first), then unzip it into MANUAL_DIR.
Then run: jaxcam data build aptos2019 --manual-dir MANUAL_DIR"""


def read_items(manual_dir: str | Path) -> list[Item]:
    """Validate the folder and return one item per ``train.csv`` row (image None if absent)."""
    manual_dir = Path(manual_dir).expanduser()
    if not manual_dir.is_dir():
        raise layout_error(
            FileNotFoundError, f"{DISPLAY} folder {manual_dir} does not exist.", LAYOUT
        )
    csv_path = find_ci(manual_dir, "train.csv")
    if csv_path is None:
        raise layout_error(FileNotFoundError, f"No train.csv in {manual_dir}.", LAYOUT)
    rows = read_csv(csv_path, COLUMNS, LAYOUT)
    if not rows:
        raise layout_error(BadInputError, f"{csv_path} has no rows.", LAYOUT)
    sources = [
        p
        for p in (find_ci(manual_dir, "train_images"), find_ci(manual_dir, "train_images.zip"))
        if p
    ]
    images = index_images(sources, (".png", ".jpg", ".jpeg"))
    if not images:
        raise layout_error(
            FileNotFoundError, f"No images in {manual_dir / 'train_images'}.", LAYOUT
        )
    items, seen, bad = [], set(), []
    for line, row in enumerate(rows, start=2):
        id_code, grade = row["id_code"], row["diagnosis"]
        if not grade.isdigit() or int(grade) >= len(CLASS_NAMES):
            bad.append(f"line {line}: diagnosis={grade!r}")
            continue
        if not id_code:
            raise BadInputError(f"{csv_path} line {line}: empty id_code.")
        if id_code in seen:
            raise BadInputError(f"{csv_path} line {line}: id_code {id_code} appears twice.")
        seen.add(id_code)
        label = int(grade)
        items.append(
            Item(
                key=id_code,
                image=images.get(id_code),
                label=label,
                group=id_code,
                fields={"id_code": id_code, "malignant": MALIGNANT[label]},
            )
        )
    if bad:
        raise BadInputError(
            f"{csv_path}: diagnosis must be an integer grade 0-4: "
            + "; ".join(bad[:10])
            + (f"; ... {len(bad) - 10} more" if len(bad) > 10 else "")
        )
    return items
