"""Every public name README and docs/ document is reachable from ``import jaxcam``
(attribute access only, as a user types it), and the lazy export table resolves."""

import re
from pathlib import Path

import pytest

import jaxcam

ROOT = Path(__file__).resolve().parents[1]
# private names, file names that look like attribute paths, and submodules that are
# reached by their own import (the CLI), not as attributes of the package
NOT_ATTRIBUTES = {"jaxcam.json", "jaxcam.cli", "jaxcam.cli.main", "jaxcam.explanation._COMPILED"}


def _documented() -> list[str]:
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted(
        (ROOT / "docs").glob("*.md"))])
    names = set(re.findall(r"jaxcam(?:\.[A-Za-z_][A-Za-z0-9_]*)+", text))
    return sorted(n for n in names if n not in NOT_ATTRIBUTES
                  and not any(part.startswith("_") for part in n.split(".")))


@pytest.mark.parametrize("dotted", _documented())
def test_documented_name_is_reachable_from_import_jaxcam(dotted):
    obj = jaxcam
    for part in dotted.split(".")[1:]:
        assert hasattr(obj, part), f"{dotted}: {obj!r} has no attribute {part!r}"
        obj = getattr(obj, part)


def test_every_export_resolves():
    for name in jaxcam.__all__:
        assert getattr(jaxcam, name) is not None
    assert set(jaxcam.__all__) <= set(dir(jaxcam))
