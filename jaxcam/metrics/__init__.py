"""Faithfulness, localization, agreement and sanity metrics for saliency maps.

Every metric takes maps ``(B, H, W)`` and, where the model is queried, a
``score_fn(x) -> (B, num_classes)`` (probabilities unless a docstring says
otherwise), normalised images ``x (B, H, W, 3)`` and class indices ``(B,)``.
Nothing is method-specific: any ``jaxcam.explain`` method plugs in. The
submodules:

- :mod:`~jaxcam.metrics.confidence`: Average Drop, Increase in Confidence, Win %
  (Chattopadhyay et al. 2018).
- :mod:`~jaxcam.metrics.perturbation`: insertion / deletion AUC (Petsiuk et al.
  2018) and ROAD with noisy linear imputation (Rong et al. 2022).
- :mod:`~jaxcam.metrics.localization`: pointing game (Zhang et al. 2016), energy
  pointing game (Wang et al. 2020), multi-instance coverage.
- :mod:`~jaxcam.metrics.agreement`: Spearman, SSIM (Wang et al. 2004), top-k% IoU.
- :mod:`~jaxcam.metrics.sanity`: cascading randomisation (Adebayo et al. 2018).
- :mod:`~jaxcam.metrics.classification`: confusion matrix, precision / recall / F1,
  quadratic weighted kappa (numpy; for the trained models, not the maps).

See ``docs/metrics.md`` for the conventions and design choices.
"""

from jaxcam.metrics._common import gaussian_blur, saliency_order
from jaxcam.metrics.agreement import pearson, spearman, ssim, top_k_iou, top_k_mask
from jaxcam.metrics.classification import (
    classification_report,
    confusion_matrix,
    quadratic_weighted_kappa,
)
from jaxcam.metrics.confidence import (
    ConfidenceScores,
    average_drop,
    confidence_metrics,
    confidence_scores,
    drop,
    explanation_images,
    increase_in_confidence,
    win_percentage,
)
from jaxcam.metrics.localization import (
    InstanceCoverage,
    boxes_to_masks,
    energy_pointing_game,
    instance_coverage,
    instance_energy,
    instance_masks_from_labels,
    instance_peaks,
    local_maxima,
    pointing_game,
)
from jaxcam.metrics.perturbation import (
    ROAD_NEIGHBOURS,
    PerturbationCurve,
    RoadCurves,
    auc,
    baseline_images,
    deletion,
    insertion,
    noisy_linear_impute,
    road,
)
from jaxcam.metrics.sanity import SanityResult, cascading_randomization

__all__ = [
    "classification_report",
    "confusion_matrix",
    "quadratic_weighted_kappa",
    "ROAD_NEIGHBOURS",
    "ConfidenceScores",
    "InstanceCoverage",
    "PerturbationCurve",
    "RoadCurves",
    "SanityResult",
    "auc",
    "average_drop",
    "baseline_images",
    "boxes_to_masks",
    "cascading_randomization",
    "confidence_metrics",
    "confidence_scores",
    "deletion",
    "drop",
    "energy_pointing_game",
    "explanation_images",
    "gaussian_blur",
    "increase_in_confidence",
    "insertion",
    "instance_coverage",
    "instance_energy",
    "instance_masks_from_labels",
    "instance_peaks",
    "local_maxima",
    "noisy_linear_impute",
    "pearson",
    "pointing_game",
    "road",
    "saliency_order",
    "spearman",
    "ssim",
    "top_k_iou",
    "top_k_mask",
    "win_percentage",
]
