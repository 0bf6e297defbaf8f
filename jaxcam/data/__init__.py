"""Datasets: TFDS builders (HAM10000, APTOS 2019, synthetic lesions) and the input pipeline.

```python
jaxcam.data.build(name, manual_dir=None, data_dir=None, **config) -> builder
source = jaxcam.data.load(name, split, data_dir=None, **config)
it = jaxcam.data.batches(source, batch_size, image_size, train, seed, epoch=0, start_step=0)
jaxcam.data.info(name) -> DatasetMeta(class_names, malignant, ...)
```

Builds are array_record files read with ``as_data_source()``; no TensorFlow.
See ``docs/data.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from jaxcam.data import aptos2019, ham10000, synthetic
from jaxcam.data.builders import (
    BUILDERS,
    build,
    build_splits,
    check_manual_dir,
    format_summary,
    load,
    make_config,
    summarize,
)
from jaxcam.data.pipeline import batches
from jaxcam.data.splits import SPLIT_NAMES, lesion_grouped_split

DATASETS: tuple[str, ...] = tuple(BUILDERS)


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
    """Static facts about a dataset, available without building it.

    ``class_names`` are the label names (index = label), ``malignant`` the
    per-class flag (APTOS: referable retinopathy, grade >= 2),
    ``display_names`` human-readable class names. Unpacks as
    ``class_names, malignant = info(name)``.
    """

    name: str
    class_names: tuple[str, ...]
    malignant: tuple[bool, ...]
    display_names: tuple[str, ...]
    has_mask: bool
    manual_download: str | None  # where to get it, None if generated

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __iter__(self) -> Iterator:
        return iter((self.class_names, self.malignant))


def info(name: str) -> DatasetMeta:
    """Class names and malignant flags (and more, see :class:`DatasetMeta`) of ``name``."""
    if name == "ham10000":
        m, has_mask, url = ham10000, False, ham10000.URL
    elif name == "aptos2019":
        m, has_mask, url = aptos2019, False, aptos2019.URL
    elif name == "synthetic_lesions":
        m, has_mask, url = synthetic, True, None
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}.")
    return DatasetMeta(name, m.CLASS_NAMES, m.MALIGNANT, m.DISPLAY_NAMES, has_mask, url)


__all__ = [
    "DATASETS",
    "DatasetMeta",
    "SPLIT_NAMES",
    "batches",
    "build",
    "build_splits",
    "check_manual_dir",
    "format_summary",
    "info",
    "lesion_grouped_split",
    "load",
    "make_config",
    "summarize",
]
