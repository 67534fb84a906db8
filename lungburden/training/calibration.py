"""Decision calibration of a network segmenter: per-class logit offsets fitted on validation cases.

A network trained with cross-entropy on imbalanced classes under-calls the minority classes where
it is unsure: such a model takes the faint margins of GGO for aerated lung and reads the
pneumonia burden 3 points low on held-out phantoms. Adding a constant ``b_k`` to the logit of
class ``k`` before the argmax moves every decision boundary between two classes by a fixed amount
without touching the network (post-hoc logit adjustment: Menon et al., "Long-tail learning via
logit adjustment", ICLR 2021). Since the argmax is taken after bilinear upsampling, whose weights
sum to one, an offset on the model grid is the same offset on the source grid.

:func:`fit_offsets` searches the offsets of the lesion classes (GGO, high opacity; background
and lung stay 0: only differences matter) on a grid, by coordinate ascent, maximising the pooled
lesion Dice of the validation cases, with the constraint that the volume Spearman r of GGO and of
high opacity stays within ``tolerance`` of the uncalibrated model's (a calibration must not buy
Dice with a worse ranking of patients). The network runs once per case
(:meth:`~lungburden.segmentation.convlstm.ConvLSTMSegmenter.model_grid_logits`); every candidate
finishes the stored logits with the segmenter's own label steps
(:meth:`~lungburden.segmentation.convlstm.ConvLSTMSegmenter.labels_from_logits`). The result is
stored in the checkpoint (``calibration``), which the segmenter applies by default.
``lungburden model calibrate`` is the command (docs/training.md).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from lungburden import labels as L
from lungburden.segmentation.preprocess import PreprocessedSeries
from lungburden.training.evaluation import DICE_CLASSES, Overlap, overlap


@dataclass
class CalibrationCase:
    """One validation case with the network's stored model-grid logits."""

    case_id: str
    pre: PreprocessedSeries
    logits: torch.Tensor  #: float16 ``(slices, classes, S, S)``, no offsets
    hu: np.ndarray
    truth: np.ndarray  #: uint8 labels on the source grid
    voxel_ml: float
    affine: np.ndarray | None = None  #: index → LPS mm (the segmenter's apex step needs it)


@dataclass
class CalibrationScore:
    """Pooled lesion Dice, volume Spearman r and mean burden error of one set of offsets."""

    offsets: list[float]
    lesion_dice: float
    ggo_dice: float
    high_opacity_dice: float
    spearman_ggo: float
    spearman_high_opacity: float
    burden_bias: float  #: mean (model - truth), percentage points of the lung

    def summary(self) -> str:
        return (f"offsets {self.offsets}: lesion DSC {self.lesion_dice:.4f} (GGO {self.ggo_dice:.4f}, high "
                f"{self.high_opacity_dice:.4f}); Spearman GGO {self.spearman_ggo:.4f}, high "
                f"{self.spearman_high_opacity:.4f}; burden bias {self.burden_bias:+.2f} %")


@dataclass
class Calibration:
    """What :func:`fit_offsets` found and how it was found (stored in the checkpoint)."""

    logit_offsets: list[float]
    before: CalibrationScore
    after: CalibrationScore
    cases: list[str]
    grid: list[float]
    tolerance: float
    objective: str = ("max pooled lesion Dice, Spearman r of GGO and high-opacity volume each at least "
                      "the uncalibrated value minus the tolerance")
    tried: list[CalibrationScore] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("tried")
        return d


def collect_cases(segmenter, cases: Iterable) -> list[CalibrationCase]:
    """Run the network once on each :class:`~lungburden.training.data.RawCase`."""
    out = []
    for case in cases:
        volume = case.to_volume()
        pre, logits = segmenter.model_grid_logits(volume.hu)
        out.append(CalibrationCase(case.case_id, pre, logits, volume.hu, np.asarray(case.labels, np.uint8),
                                   float(volume.voxel_volume_ml), np.asarray(volume.affine)))
    return out


def score_offsets(segmenter, cases: Sequence[CalibrationCase], offsets: Sequence[float]) -> CalibrationScore:
    """Label every case with ``offsets`` (the segmenter's own steps) and score against the truth."""
    tensor = torch.tensor([float(v) for v in offsets], dtype=torch.float32).view(1, -1, 1, 1)
    pooled = {name: Overlap() for name in _SCORED}
    truth_vol, model_vol = [], []
    for case in cases:
        pred = segmenter.labels_from_logits(case.pre, case.hu, case.logits, case.voxel_ml, offsets=tensor,
                                            affine=case.affine)
        for name in _SCORED:
            pooled[name] += overlap(case.truth, pred, DICE_CLASSES[name])
        truth_vol.append(_volumes(case.truth, case.voxel_ml))
        model_vol.append(_volumes(pred, case.voxel_ml))
    t_vol, m_vol = np.asarray(truth_vol, float), np.asarray(model_vol, float)

    def dice(name: str) -> float:
        value = pooled[name].dice
        return 1.0 if value is None else float(value)  # both empty: nothing to miss

    def spearman(i: int) -> float:
        r = stats.spearmanr(t_vol[:, i], m_vol[:, i]).statistic
        return float(r) if np.isfinite(r) else 0.0

    return CalibrationScore(
        offsets=[round(float(v), 4) for v in offsets],
        lesion_dice=dice("lesion"), ggo_dice=dice("ggo"), high_opacity_dice=dice("high_opacity"),
        spearman_ggo=spearman(0), spearman_high_opacity=spearman(1),
        burden_bias=float(np.mean(m_vol[:, 2] - t_vol[:, 2])),
    )


#: The pooled Dice classes a calibration is scored on (keys of evaluation.DICE_CLASSES).
_SCORED = ("lesion", "ggo", "high_opacity")


def _volumes(labels: np.ndarray, voxel_ml: float) -> tuple[float, float, float]:
    """GGO mL, high-opacity mL, burden % (opacity / (lung + opacity)), as quantify counts them.
    Millilitres, not voxel counts: the cases' voxel sizes differ (0.625-5 mm slices), and the
    Spearman r of ``lungburden model evaluate`` ranks volumes."""
    counts = np.bincount(labels.ravel(), minlength=L.NUM_CLASSES)
    ggo, high, lung = int(counts[L.GGO]), int(counts[L.HIGH_OPACITY]), int(counts[L.LUNG])
    total = ggo + high + lung
    return ggo * voxel_ml, high * voxel_ml, 100.0 * (ggo + high) / total if total else 0.0


def fit_offsets(segmenter, cases: Sequence[CalibrationCase], grid: Sequence[float] = (-0.5, 0.0, 0.5, 1.0, 1.5),
                tolerance: float = 0.002, rounds: int = 3, progress=None) -> Calibration:
    """Coordinate ascent over the GGO and high-opacity offsets on ``grid`` (module docstring).

    ``progress``: called with each new :class:`CalibrationScore`. Returns the best feasible
    offsets (zeros when nothing beats the uncalibrated model).
    """
    if not cases:
        raise ValueError("calibration needs validation cases")
    num_classes = int(cases[0].logits.shape[1])
    tunable = [k for k in (L.GGO, L.HIGH_OPACITY) if k < num_classes]
    scores: dict[tuple[float, ...], CalibrationScore] = {}

    def score(offsets: tuple[float, ...]) -> CalibrationScore:
        if offsets not in scores:
            scores[offsets] = score_offsets(segmenter, cases, offsets)
            if progress is not None:
                progress(scores[offsets])
        return scores[offsets]

    zero = tuple(0.0 for _ in range(num_classes))
    before = score(zero)

    def feasible(s: CalibrationScore) -> bool:
        return (s.spearman_ggo >= before.spearman_ggo - tolerance
                and s.spearman_high_opacity >= before.spearman_high_opacity - tolerance)

    best = zero
    for _ in range(rounds):
        changed = False
        for k in tunable:
            for value in grid:
                candidate = tuple(float(value) if i == k else best[i] for i in range(num_classes))
                s = score(candidate)
                if feasible(s) and s.lesion_dice > score(best).lesion_dice + 1e-6:
                    best, changed = candidate, True
        if not changed:
            break
    return Calibration(logit_offsets=list(best), before=before, after=score(best),
                       cases=[c.case_id for c in cases], grid=[float(v) for v in grid], tolerance=tolerance,
                       tried=list(scores.values()))


def write_calibrated_checkpoint(src: str | Path, dst: str | Path, calibration: Calibration,
                                info: dict[str, Any] | None = None) -> None:
    """Copy checkpoint ``src`` to ``dst`` with ``calibration`` (weights unchanged; atomic write).
    A stored high-opacity component filter is dropped (it was fitted on other labels)."""
    from lungburden.segmentation.component_filter import CHECKPOINT_KEY as FILTER_KEY
    from lungburden.segmentation.networks import load_checkpoint, write_checkpoint

    _, checkpoint = load_checkpoint(src)  # validates the file; the dict is the file's content
    checkpoint["calibration"] = {**calibration.to_dict(), **(info or {})}
    # A high-opacity component filter learnt the uncalibrated labels' errors: refit it after this.
    checkpoint.pop(FILTER_KEY, None)
    write_checkpoint(dst, checkpoint)


def overlapping_ids(case_ids: Iterable[str], checkpoint: dict[str, Any]) -> list[str]:
    """Calibration case ids the checkpoint's training run used (its split's train/val/test)."""
    split = (checkpoint.get("metadata") or {}).get("split") or {}
    used = set(itertools.chain(split.get("train", []), split.get("val", [])))
    return sorted(set(case_ids) & used)
