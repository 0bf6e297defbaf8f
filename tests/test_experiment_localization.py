"""The multi-lesion localization study end to end in its tiny configuration."""

import json

import numpy as np
import pytest

from experiments import localization


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("localization")
    result = localization.main(["--tiny", "--no-progress", "--out", str(out)])
    return out, result


def test_tiny_run_writes_table_json_and_figures(tiny_run):
    out, result = tiny_run
    for name in ("localization.md", "localization.json", "localization_examples.png",
                 "localization_metrics.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "localization.json").read_text())
    assert saved["methods"] == json.loads(json.dumps(result["methods"]))
    table = (out / "localization.md").read_text()
    for label in [*localization.METHOD_LABELS, localization.RANDOM_LABEL]:
        assert f"| {label} |" in table
    # 4 images with 2-4 lesions each
    assert 8 <= result["methods"]["Grad-CAM"]["num_lesions"] <= 16


def test_percentages_are_in_range_and_wins_sum_to_100(tiny_run):
    _, result = tiny_run
    rows = result["methods"]
    for row in rows.values():
        for key in ("pointing_game", "energy_pointing_game", "lesions_with_peak",
                    "lesions_with_energy", "average_drop", "increase_in_confidence"):
            assert 0.0 <= row[key] <= 100.0, (key, row[key])
    wins = [r["win"] for k, r in rows.items() if k != localization.RANDOM_LABEL]
    assert sum(wins) == pytest.approx(100.0)
    assert rows[localization.RANDOM_LABEL]["win"] is None


def test_known_identities_give_identical_rows(tiny_run):
    # ResNet-50's head at layer4 is GAP + dense (piecewise linear): exact Grad-CAM++ on
    # exp(S_c) equals the closed form, and Grad-CAM equals CAM / (h w) (same normalised map).
    _, result = tiny_run
    rows = result["methods"]
    keys = ["pointing_game", "energy_pointing_game", "lesions_with_peak", "average_drop"]
    for a, b in (("Grad-CAM++ (exact)", "Grad-CAM++ (closed form)"), ("Grad-CAM", "CAM")):
        np.testing.assert_allclose([rows[a][k] for k in keys], [rows[b][k] for k in keys],
                                   atol=1e-3)


def test_summarize_pools_lesions_over_images():
    arrays = {
        "A": dict(pointing=np.array([True, False]), energy=np.array([0.5, 0.1]),
                  peaks=np.array([[True, False, False], [True, True, False]]),
                  shares=np.array([[0.3, 0.05, 0.0], [0.2, 0.2, 0.0]]),
                  valid=np.array([[True, True, False], [True, True, True]]),
                  y=np.array([0.5, 0.8]), o=np.array([0.25, 0.9])),
    }
    arrays["B"] = {**arrays["A"], "o": np.array([0.5, 0.4])}
    rows = localization.summarize(arrays, energy_share=0.1)
    a = rows["A"]
    assert a["pointing_game"] == 50.0 and a["energy_pointing_game"] == pytest.approx(30.0)
    assert a["lesions_with_peak"] == pytest.approx(300 / 5)  # 3 of 5 valid lesions
    assert a["lesions_with_energy"] == pytest.approx(300 / 5)
    assert a["images_all_lesions_peaked"] == 0.0
    assert a["average_drop"] == pytest.approx(25.0)  # (0.5 + 0) / 2
    assert a["increase_in_confidence"] == 50.0
    assert (a["win"], rows["B"]["win"]) == (pytest.approx(50.0), pytest.approx(50.0))


def test_bad_options_exit_with_status_2(capsys):
    with pytest.raises(SystemExit) as err:
        localization.main(["--explain-class", "random", "--out", "/tmp/unused"])
    assert err.value.code == 2
    assert "--explain-class must be 'label' or 'predicted'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        localization.main(["--checkpoint", "/nonexistent/ckpt"])
    assert "--checkpoint /nonexistent/ckpt does not exist" in capsys.readouterr().err
