"""jaxcam.report: markdown tables, number / percent cells, JSON of numpy values."""

import json
import math

import numpy as np

from jaxcam import report


def test_table_has_a_header_a_rule_and_one_line_per_row():
    lines = report.table(["a", "b"], [(1, "x"), (2.5, None)])
    assert lines == ["| a | b |", "|---|---|", "| 1 | x |", "| 2.5 | None |"]
    assert report.table(["m", "v"], [], align="---:") == ["| m | v |", "|---:|---:|"]
    assert report.table(["a"], (r for r in [["only"]])) == ["| a |", "|---|", "| only |"]


def test_number_cells():
    assert [report.number(v) for v in (None, math.nan, math.inf, 0.0, 123.4, 0.012345, 7,
                                       "s")] == ["-", "-", "-", "0", "123", "0.0123", "7", "s"]
    assert report.number(3.14159, digits=2) == "3.1"


def test_percent():
    assert report.percent(0.12345) == "12.35%" and report.percent(None) == "n/a"
    assert report.percent(1) == "100.00%"


def test_json_default_turns_numpy_into_python():
    data = {"i": np.int64(3), "f": np.float32(0.5), "a": np.arange(3), "p": object}
    back = json.loads(json.dumps(data, default=report.json_default))
    assert back["i"] == 3 and back["f"] == 0.5 and back["a"] == [0, 1, 2]
    assert back["p"] == str(object)
