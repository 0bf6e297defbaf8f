"""Writing results down: markdown tables, number and percent formatting, JSON of numpy
values (what the experiments' ``report.md`` / ``metrics.json`` files are made of)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def table(head: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "---") -> list[str]:
    """Markdown table lines: ``| h1 | h2 |``, the rule (``align`` per column, e.g.
    ``"---:"`` for right-aligned), then one ``| c1 | c2 |`` line per row (cells
    ``str()``-ed). A row may have fewer cells than ``head``; it is not padded."""
    lines = ["| " + " | ".join(head) + " |", "|" + f"{align}|" * len(head)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def number(x: Any, digits: int = 3) -> str:
    """A table cell: ``-`` for None / NaN / inf, ``0``, whole numbers from 100 up,
    else ``digits`` significant digits; non-floats ``str()``-ed."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def percent(fraction: float | None) -> str:
    """``0.1234`` -> ``"12.34%"``; None -> ``"n/a"``."""
    return "n/a" if fraction is None else f"{100 * fraction:.2f}%"


def json_default(o: Any) -> Any:
    """``json.dumps(..., default=json_default)``: numpy scalars and arrays as Python
    numbers and lists, anything else as its ``str()``."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
