"""APTOS 2019: diabetic-retinopathy grading with VGG19 / EfficientNet-B0 / ResNet-50 and CAMs.

    python -m experiments.aptos2019                              # synthetic set, CPU
    python -m experiments.aptos2019 --data-dir ~/data/aptos2019 --arch vgg19 --pretrained vgg19.pth

Quadratic weighted kappa (the competition metric) is the headline beside
accuracy; Grad-CAM, Grad-CAM++ and XGrad-CAM panels as in the reference study.
Without ``--data-dir`` it runs on the synthetic lesion set (announced), so the
pipeline is always exercised; its kappa then treats the synthetic class index
as an ordinal grade and means little.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from experiments.common import ExperimentConfig, ExperimentSpec
from experiments.common import main as run_main

SPEC = ExperimentSpec(
    name="aptos2019",
    title="APTOS 2019",
    dataset="aptos2019",
    methods=("Grad-CAM", "Grad-CAM++ (exact)", "XGrad-CAM"),
    headline="kappa",
    reference={},
    reference_source="no single reference number; Kaggle leaderboard kappas are ~0.93",
    signed=False,
)

REAL_DEFAULTS = dict(arch="efficientnet_b0", image_size=224, epochs=10, batch_size=32,
                     learning_rate=1e-4, num_figures=8, num_gif=24,
                     checkpoint_every=200)


@dataclasses.dataclass(frozen=True)
class Aptos2019Config(ExperimentConfig):
    """Defaults for the bare command: the synthetic set, sized for a few CPU minutes."""

    arch: str = "efficientnet_b0"
    out: str = "runs/aptos2019"


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(Aptos2019Config, SPEC, REAL_DEFAULTS, argv)


if __name__ == "__main__":
    sys.exit(main())
