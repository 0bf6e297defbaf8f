"""TFDS builds from tiny fake Kaggle folders (HAM10000, APTOS 2019) and of the synthetic set:
counts, labels, grouped splits, stratification, determinism, bad input, interrupted rebuilds."""

import io
import json
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jaxcam.data as data
from jaxcam.data import ham10000, synthetic

HAM_COLUMNS = "lesion_id,image_id,dx,dx_type,age,sex,localization"
DXS = ham10000.CLASS_NAMES
TINY_SYNTH = {"num_train": 12, "num_validation": 4, "num_test": 4, "image_size": 32}


def _jpeg(seed: int, size=(20, 15)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buf, format="JPEG"
    )
    return buf.getvalue()


def _png(seed: int, size=(24, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buf, format="PNG"
    )
    return buf.getvalue()


def ham_rows():
    """42 images of 24 lesions: every dx, several lesions with 2-3 images."""
    rows = []
    image = 0
    for lesion in range(24):
        dx = DXS[lesion % len(DXS)]
        for _ in range(1 + (lesion % 3 == 0) + (lesion % 5 == 0) * 2):
            age = "" if image == 3 else str(30 + image)
            rows.append(
                (f"HAM_{lesion:07d}", f"ISIC_{image:07d}", dx, "histo", age, "male", "back")
            )
            image += 1
    return rows


def write_ham(
    root: Path, layout: str = "folders", rows=None, columns: str = HAM_COLUMNS
) -> list[tuple]:
    rows = ham_rows() if rows is None else rows
    root.mkdir(parents=True, exist_ok=True)
    (root / "HAM10000_metadata.csv").write_text(
        columns + "\n" + "\n".join(",".join(r) for r in rows) + "\n"
    )
    half = len(rows) // 2
    for part, chunk in ((1, rows[:half]), (2, rows[half:])):
        if layout == "folders":
            folder = root / f"HAM10000_images_part_{part}"
            folder.mkdir(exist_ok=True)
            for r in chunk:
                (folder / f"{r[1]}.jpg").write_bytes(_jpeg(int(r[1][5:])))
        elif layout == "zips":
            with zipfile.ZipFile(root / f"HAM10000_images_part_{part}.zip", "w") as zf:
                for r in chunk:
                    zf.writestr(f"{r[1]}.jpg", _jpeg(int(r[1][5:])))
        else:  # flat
            for r in chunk:
                (root / f"{r[1]}.jpg").write_bytes(_jpeg(int(r[1][5:])))
    return rows


def write_aptos(root: Path, n: int = 30) -> list[tuple[str, int]]:
    root.mkdir(parents=True, exist_ok=True)
    rows = [(f"{i:012x}", i % 5) for i in range(n)]
    (root / "train.csv").write_text(
        "id_code,diagnosis\n" + "\n".join(f"{a},{b}" for a, b in rows) + "\n"
    )
    (root / "train_images").mkdir(exist_ok=True)
    for i, (code, _) in enumerate(rows):
        (root / "train_images" / f"{code}.png").write_bytes(_png(i))
    return rows


def _read_all(name, data_dir, **config):
    out = {}
    for split in data.SPLIT_NAMES:
        src = data.load(name, split, data_dir=data_dir, **config)
        out[split] = [src[i] for i in range(len(src))]
    return out


def _built(data_dir: Path) -> list[Path]:
    return sorted(data_dir.rglob("dataset_info.json")) if data_dir.exists() else []


# ----------------------------------------------------------------------------- HAM10000


@pytest.fixture(scope="module")
def ham_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("ham")
    rows = write_ham(root / "manual")
    data.build(
        "ham10000",
        manual_dir=root / "manual",
        data_dir=root / "tfds",
        progress=False,
        verbose=False,
    )
    return rows, root, _read_all("ham10000", root / "tfds")


def test_ham_counts_labels_and_metadata(ham_build):
    rows, _, splits = ham_build
    by_id = {r[1]: r for r in rows}
    seen = [ex for exs in splits.values() for ex in exs]
    assert sorted(ex["image_id"].decode() for ex in seen) == sorted(by_id)
    for ex in seen:
        r = by_id[ex["image_id"].decode()]
        assert ham10000.CLASS_NAMES[ex["label"]] == r[2]
        assert ex["lesion_id"].decode() == r[0]
        assert ex["malignant"] == (r[2] in ("mel", "bcc", "akiec"))
        assert ex["localization"].decode() == "back" and ex["dx_type"].decode() == "histo"
        assert np.isnan(ex["age"]) if r[4] == "" else ex["age"] == float(r[4])
        # Stored bytes are the original JPEG: decoding gives the same pixels as PIL on the file.
        expected = np.asarray(Image.open(io.BytesIO(_jpeg(int(r[1][5:])))))
        np.testing.assert_array_equal(ex["image"], expected)


def test_ham_no_lesion_in_two_splits_and_stratified(ham_build):
    rows, _, splits = ham_build
    lesion_split = {}
    for name, exs in splits.items():
        for ex in exs:
            assert lesion_split.setdefault(ex["lesion_id"], name) == name
    sizes = Counter(r[0] for r in rows)
    for c, dx in enumerate(DXS):
        n_c = sum(r[2] == dx for r in rows)
        g_max = max(sizes[r[0]] for r in rows if r[2] == dx)
        for name, p in zip(data.SPLIT_NAMES, (0.7, 0.15, 0.15), strict=True):
            count = sum(ex["label"] == c for ex in splits[name])
            assert -2 * g_max < count - p * n_c < g_max


def test_ham_summary_counts(ham_build):
    _, root, splits = ham_build
    # Reusing a finished build needs no manual_dir; counts come from the stored metadata.
    builder = data.build("ham10000", data_dir=root / "tfds", verbose=False)
    summary = data.summarize(builder)
    for name, exs in splits.items():
        assert summary["splits"][name]["total"] == len(exs)
        assert summary["splits"][name]["per_class"] == {
            dx: sum(ex["label"] == c for ex in exs) for c, dx in enumerate(DXS)
        }
    text = data.format_summary(summary)
    assert "ham10000/default" in text and "skipped files: 0" in text
    assert text.splitlines()[-2].split() == [
        "total",
        *(str(len(splits[s])) for s in data.SPLIT_NAMES),
    ]


@pytest.mark.parametrize("layout", ["zips", "flat"])
def test_ham_other_layouts_and_rebuild_determinism(ham_build, tmp_path, layout):
    _, _, reference = ham_build
    write_ham(tmp_path / "manual", layout=layout)
    data.build(
        "ham10000",
        manual_dir=tmp_path / "manual",
        data_dir=tmp_path / "tfds",
        progress=False,
        verbose=False,
    )
    splits = _read_all("ham10000", tmp_path / "tfds")
    for name in data.SPLIT_NAMES:  # same order, same ids, same pixels as the folder layout
        assert [e["image_id"] for e in splits[name]] == [e["image_id"] for e in reference[name]]
        for a, b in zip(splits[name], reference[name], strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])


def test_ham_custom_split_config(ham_build, tmp_path):
    _, root, reference = ham_build
    kw = {"split_proportions": (0.5, 0.25, 0.25), "split_seed": 1}
    builder = data.build(
        "ham10000",
        manual_dir=root / "manual",
        data_dir=tmp_path,
        verbose=False,
        progress=False,
        **kw,
    )
    assert builder.builder_config.name.startswith("default_")
    assert len(data.load("ham10000", "train", data_dir=tmp_path, **kw)) < len(reference["train"])
    with pytest.raises(
        FileNotFoundError, match=r"not built .* jaxcam data build ham10000 --manual-dir DIR"
    ):
        data.load("ham10000", "train", data_dir=tmp_path, split_seed=2)
    # overwrite=True rebuilds aside and swaps in: same content, one build, no scratch left.
    before = _read_all("ham10000", tmp_path, **kw)
    data.build("ham10000", manual_dir=root / "manual", data_dir=tmp_path, overwrite=True,
               verbose=False, progress=False, **kw)  # fmt: skip
    after = _read_all("ham10000", tmp_path, **kw)
    for s in data.SPLIT_NAMES:
        assert [e["image_id"] for e in after[s]] == [e["image_id"] for e in before[s]]
    assert len(_built(tmp_path)) == 1
    assert not [p for p in tmp_path.rglob(".*") if p.name.startswith((".rebuild", ".old"))]


def _ham_error(tmp_path, match, exc=ValueError, **kw):
    with pytest.raises(exc, match=match):
        data.build("ham10000", data_dir=tmp_path / "tfds", progress=False, verbose=False, **kw)
    assert _built(tmp_path / "tfds") == []  # validated before anything was written


def test_ham_missing_folder_shows_layout_and_url(tmp_path):
    _ham_error(
        tmp_path,
        r"(?s)does not exist.*HAM10000_images_part_1/.*kaggle.com/datasets/kmader"
        r".*doi.org/10.7910/DVN/DBW86T",
        FileNotFoundError,
        manual_dir=tmp_path / "nope",
    )
    (tmp_path / "HAM10000_images_part_1.zip").write_bytes(b"")
    _ham_error(
        tmp_path,
        r"(?s)HAM10000_images_part_1.zip is a file, not a folder.*HAM10000_metadata.csv",
        FileNotFoundError,
        manual_dir=tmp_path / "HAM10000_images_part_1.zip",
    )
    _ham_error(
        tmp_path, r"(?s)must be downloaded by hand.*HAM10000_metadata.csv", FileNotFoundError
    )
    (tmp_path / "empty").mkdir()
    _ham_error(
        tmp_path,
        r"(?s)No HAM10000_metadata.csv in .*empty.*Expected the Kaggle",
        FileNotFoundError,
        manual_dir=tmp_path / "empty",
    )


def test_ham_wrong_columns_names_the_file(tmp_path):
    write_ham(tmp_path / "m", columns="lesion_id,image_id,diagnosis,dx_type,age,sex,localization")
    _ham_error(
        tmp_path,
        r"HAM10000_metadata.csv has columns .* missing required column\(s\) \['dx'\]",
        manual_dir=tmp_path / "m",
    )


def test_ham_unknown_dx(tmp_path):
    rows = ham_rows()
    rows[4] = rows[4][:2] + ("melanoma",) + rows[4][3:]
    write_ham(tmp_path / "m", rows=rows)
    _ham_error(tmp_path, r"unknown dx value\(s\).*line 6: dx='melanoma'", manual_dir=tmp_path / "m")


def test_ham_bad_images_error_or_skip(tmp_path):
    rows = write_ham(tmp_path / "m")
    part1 = tmp_path / "m" / "HAM10000_images_part_1"
    (part1 / f"{rows[0][1]}.jpg").unlink()  # missing
    truncated = part1 / f"{rows[1][1]}.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])  # truncated
    garbage = part1 / f"{rows[2][1]}.jpg"
    garbage.write_bytes(b"not a jpeg at all")  # unreadable
    _ham_error(
        tmp_path,
        rf"(?s)3 of {len(rows)} ham10000 images are missing or unreadable:.*{rows[0][1]}: missing"
        rf".*{rows[1][1]}.jpg: unreadable.*{rows[2][1]}.jpg: unreadable.*skip_bad=True",
        manual_dir=tmp_path / "m",
    )
    builder = data.build(
        "ham10000",
        manual_dir=tmp_path / "m",
        data_dir=tmp_path / "ok",
        skip_bad=True,
        progress=False,
        verbose=False,
    )
    summary = data.summarize(builder)
    assert len(summary["skipped"]) == 3
    assert sum(s["total"] for s in summary["splits"].values()) == len(rows) - 3
    assert "skipped files: 3" in data.format_summary(summary)


# ----------------------------------------------------------------------------- APTOS 2019


def test_aptos_build_counts_stratified(tmp_path):
    rows = write_aptos(tmp_path / "m")
    builder = data.build(
        "aptos2019",
        manual_dir=tmp_path / "m",
        data_dir=tmp_path / "tfds",
        progress=False,
        verbose=False,
        max_size=20,
    )
    splits = _read_all("aptos2019", tmp_path / "tfds", max_size=20)
    grades = dict(rows)
    assert sorted(e["id_code"].decode() for s in splits.values() for e in s) == sorted(grades)
    for name, p in zip(data.SPLIT_NAMES, (0.7, 0.15, 0.15), strict=True):
        for e in splits[name]:
            assert e["label"] == grades[e["id_code"].decode()]
            assert e["malignant"] == (e["label"] >= 2)
            assert max(e["image"].shape[:2]) == 20  # 24x16 resized to max_size
        for c in range(5):  # 6 per grade: singleton groups, within 2 of the target
            assert abs(sum(e["label"] == c for e in splits[name]) - 6 * p) < 2
    assert data.summarize(builder)["class_names"] == list(data.info("aptos2019").class_names)


def test_aptos_missing_folder_shows_layout_and_url(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)APTOS 2019 folder .*nope does not exist"
                       r".*train_images/.*kaggle.com/competitions/aptos2019-blindness"):
        data.build("aptos2019", manual_dir=tmp_path / "nope", data_dir=tmp_path / "t",
                   verbose=False)
    assert not (tmp_path / "t").exists()  # raised before any work
    with pytest.raises(ValueError, match="synthetic_lesions is generated.*drop manual_dir"):
        data.build("synthetic_lesions", manual_dir=tmp_path, data_dir=tmp_path / "t")


def test_aptos_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)No train.csv.*aptos2019-blindness-detection"):
        (tmp_path / "e").mkdir()
        data.build("aptos2019", manual_dir=tmp_path / "e", data_dir=tmp_path / "t", verbose=False)
    rows = write_aptos(tmp_path / "m", n=10)
    (tmp_path / "m" / "train.csv").write_text("id,grade\n" + "\n".join(f"{a},{b}" for a, b in rows))
    with pytest.raises(
        ValueError,
        match=r"train.csv has columns \['id', 'grade'\]; missing .*'id_code', 'diagnosis'",
    ):
        data.build("aptos2019", manual_dir=tmp_path / "m", data_dir=tmp_path / "t", verbose=False)
    (tmp_path / "m" / "train.csv").write_text(
        "id_code,diagnosis\n" + "\n".join(f"{a},{b + 3}" for a, b in rows)
    )
    with pytest.raises(
        ValueError, match=r"diagnosis must be an integer grade 0-4: line \d+: diagnosis='5'"
    ):
        data.build("aptos2019", manual_dir=tmp_path / "m", data_dir=tmp_path / "t", verbose=False)
    (tmp_path / "m" / "train.csv").write_text(
        "id_code,diagnosis\n" + "\n".join(f"{a},{b}" for a, b in rows)
    )
    (tmp_path / "m" / "train_images" / f"{rows[3][0]}.png").unlink()
    with pytest.raises(ValueError, match=rf"(?s)1 of 10 aptos2019 images .*{rows[3][0]}: missing"):
        data.build(
            "aptos2019",
            manual_dir=tmp_path / "m",
            data_dir=tmp_path / "t",
            verbose=False,
            progress=False,
        )
    assert _built(tmp_path / "t") == []


# ----------------------------------------------------------------------------- synthetic


def test_build_splits_builds_once_and_opens_each_split(tmp_path):
    splits = data.build_splits("synthetic_lesions", tmp_path, progress=False, **TINY_SYNTH)
    assert {s: len(src) for s, src in splits.items()} == {"train": 12, "validation": 4,
                                                          "test": 4}
    again = data.load("synthetic_lesions", "validation", data_dir=tmp_path, **TINY_SYNTH)
    assert [again[i]["image"].tobytes() for i in range(4)] == [
        splits["validation"][i]["image"].tobytes() for i in range(4)]
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    two = data.build_splits("synthetic_lesions", tmp_path, ("test",), progress=False,
                            **TINY_SYNTH)
    assert list(two) == ["test"] and len(two["test"]) == 4
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rebuilt


def test_synthetic_build_matches_generator_and_is_balanced(tmp_path):
    builder = data.build(
        "synthetic_lesions", data_dir=tmp_path, progress=False, verbose=False, **TINY_SYNTH
    )
    summary = data.summarize(builder)
    assert [summary["splits"][s]["total"] for s in data.SPLIT_NAMES] == [12, 4, 4]
    assert set(summary["splits"]["train"]["per_class"].values()) == {3}
    src = data.load("synthetic_lesions", "train", data_dir=tmp_path, **TINY_SYNTH)
    config = builder.builder_config.image_config()
    labels = data.builders.split_labels(0, 0, 12)  # seed 0, split 0 (train)
    expected = [
        synthetic.make_image(np.random.default_rng([0, 0, 1, j]), config, label=int(labels[j]))
        for j in range(12)
    ]
    by_bytes = {e[0].tobytes(): e for e in expected}
    assert len(src) == 12 and len(by_bytes) == 12
    for i in range(len(src)):  # TFDS shuffles records; match them to the generator by pixels
        ex = src[i]
        image, mask, boxes, label = by_bytes.pop(ex["image"].tobytes())
        np.testing.assert_array_equal(ex["mask"][..., 0], mask)
        assert ex["label"] == label and ex["malignant"] == synthetic.MALIGNANT[label]
        np.testing.assert_allclose(np.stack(ex["objects"]["bbox"]), boxes / 32.0, atol=1e-7)
    assert by_bytes == {}


def test_synthetic_rebuild_identical_and_interrupted_rebuild_keeps_old(tmp_path, monkeypatch):
    data.build(
        "synthetic_lesions", data_dir=tmp_path / "a", progress=False, verbose=False, **TINY_SYNTH
    )
    data.build(
        "synthetic_lesions", data_dir=tmp_path / "b", progress=False, verbose=False, **TINY_SYNTH
    )
    a, b = (_read_all("synthetic_lesions", tmp_path / d, **TINY_SYNTH) for d in "ab")
    for s in data.SPLIT_NAMES:
        for x, y in zip(a[s], b[s], strict=True):
            assert (
                x["image"].tobytes() == y["image"].tobytes()
                and x["mask"].tobytes() == y["mask"].tobytes()
            )

    calls = {"n": 0}
    real = synthetic.make_image

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "make_image", failing)
    with pytest.raises(KeyboardInterrupt):
        data.build(
            "synthetic_lesions",
            data_dir=tmp_path / "a",
            overwrite=True,
            progress=False,
            verbose=False,
            **TINY_SYNTH,
        )
    after = _read_all("synthetic_lesions", tmp_path / "a", **TINY_SYNTH)
    for s in data.SPLIT_NAMES:
        assert [x["image"].tobytes() for x in after[s]] == [x["image"].tobytes() for x in a[s]]
    leftovers = [
        p.name
        for p in (tmp_path / "a").rglob("*")
        if p.name.startswith((".rebuild", ".old", "incomplete"))
    ]
    assert leftovers == []

    # An interrupted first build leaves nothing that load() would accept.
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        data.build(
            "synthetic_lesions",
            data_dir=tmp_path / "c",
            progress=False,
            verbose=False,
            **TINY_SYNTH,
        )
    with pytest.raises(FileNotFoundError, match="is not built"):
        data.load("synthetic_lesions", "train", data_dir=tmp_path / "c", **TINY_SYNTH)
    monkeypatch.setattr(synthetic, "make_image", real)
    data.build(
        "synthetic_lesions",
        data_dir=tmp_path / "a",
        overwrite=True,
        progress=False,
        verbose=False,
        **TINY_SYNTH,
    )
    assert len(_built(tmp_path / "a")) == 1


def test_config_and_name_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'; choose one of"):
        data.build("mnist")
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) \['num_imgs'\] for synthetic_lesions"
    ):
        data.build("synthetic_lesions", data_dir=tmp_path, num_imgs=3)
    with pytest.raises(ValueError, match=r"synthetic_lesions has no config 'huge'"):
        data.load("synthetic_lesions", "train", data_dir=tmp_path, config="huge")
    with pytest.raises(ValueError, match=r"unknown split 'val'"):
        data.load("synthetic_lesions", "val", data_dir=tmp_path)
    with pytest.raises(ValueError, match="summing to 1"):
        data.make_config("ham10000", split_proportions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"every split needs at least one image.* = \(5, 2, 0\)"):
        data.build(
            "synthetic_lesions", data_dir=tmp_path, num_train=5, num_validation=2, num_test=0
        )
    with pytest.raises(ValueError, match="image_size must be >= 16"):
        data.build("synthetic_lesions", data_dir=tmp_path, image_size=8)
    assert _built(tmp_path) == []
    assert data.make_config("synthetic_lesions", config="multi").max_lesions == 4
    assert (
        data.make_config("synthetic_lesions", num_train=5).name
        == data.make_config("synthetic_lesions", num_train=5).name
    )
    assert (
        data.make_config("synthetic_lesions", num_train=5).name
        != data.make_config("synthetic_lesions", num_train=6).name
    )


def test_info():
    names, malignant = data.info("ham10000")
    assert dict(zip(names, malignant, strict=True)) == {
        "akiec": True,
        "bcc": True,
        "bkl": False,
        "df": False,
        "mel": True,
        "nv": False,
        "vasc": False,
    }
    meta = data.info("synthetic_lesions")
    assert meta.has_mask and meta.num_classes == 4 and meta.manual_download is None
    assert data.info("aptos2019").malignant == (False, False, True, True, True)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.info("cifar10")


def test_builds_and_reads_without_tensorflow(tmp_path):
    code = f"""
import sys

import importlib.util

# The test environment has no TensorFlow (pyproject never depends on it).
assert importlib.util.find_spec("tensorflow") is None
import jaxcam.data as data
kw = {json.dumps(TINY_SYNTH)}
data.build("synthetic_lesions", data_dir={str(tmp_path)!r}, progress=False, verbose=False, **kw)
src = data.load("synthetic_lesions", "validation", data_dir={str(tmp_path)!r}, **kw)
batch = next(iter(data.batches(src, 4, 16, train=True, seed=0)))
assert batch["image"].shape == (4, 16, 16, 3) and batch["mask"].shape == (4, 16, 16)
assert not any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)
print("OK")
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")


def test_too_few_images_for_three_splits(tmp_path):
    write_aptos(tmp_path / "m", n=2)
    match = r"split\(s\) \['validation', 'test'\] would be empty: 2 images"
    with pytest.raises(ValueError, match=match):
        data.build("aptos2019", manual_dir=tmp_path / "m", data_dir=tmp_path / "t", verbose=False,
                   progress=False)  # fmt: skip
    assert _built(tmp_path / "t") == []
