"""Evaluation of a segmenter on NIfTI pairs with expert lesion masks (real CT).

A folder holds ``NAME_ct.nii.gz`` (HU) and ``NAME_mask.nii.gz`` (0 background, 1 GGO,
2 consolidation / high opacity). A single slice is analysed as a series of ``copies`` identical
slices ``slice_mm`` apart (a 3-D network needs context) and scored on its middle copy; a volume
is analysed as it is. Scores: Dice of lesion (GGO + high opacity), GGO and high opacity, pooled
over cases (sums of overlaps) and per case; predicted / true area (slices) or volume; Spearman
r of the lesion and high-opacity amounts over cases with 95 % bootstrap intervals
(:func:`~lungburden.training.evaluation.spearman_interval`, fixed seed); a per-case table; and
overlays (CT in a lung window, truth contours over the prediction) of the worst cases.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lungburden import labels as L
from lungburden.dicom_io.volume import CTVolume
from lungburden.training.evaluation import spearman_interval

#: Scored classes: name → (truth mask values, predicted labels).
CLASSES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "lesion": ((1, 2), (L.GGO, L.HIGH_OPACITY)),
    "ggo": ((1,), (L.GGO,)),
    "high_opacity": ((2,), (L.HIGH_OPACITY,)),
}


@dataclass
class NiftiCase:
    """One pair: the CT as a :class:`CTVolume` (copies for a slice), its truth on the scored
    grid and which slices of the volume are scored."""

    name: str
    volume: CTVolume
    truth: np.ndarray
    scored: slice


@dataclass
class CaseScore:
    name: str
    #: Per class: ``[overlap, truth voxels, predicted voxels]`` on the scored slices.
    counts: dict[str, list[int]]
    #: Truth and predicted amount per class (cm² for a slice, mL for a volume).
    truth_amount: dict[str, float]
    pred_amount: dict[str, float]
    lung_field_amount: float

    def dice(self, cls: str) -> float | None:
        overlap, truth, pred = self.counts[cls]
        return None if truth + pred == 0 else 2.0 * overlap / (truth + pred)


@dataclass
class NiftiEvaluation:
    cases: list[CaseScore]
    pooled_dice: dict[str, float | None]
    amount_ratio: dict[str, float | None]
    spearman: dict[str, dict[str, float | list[float] | None]]
    unit: str
    overlays: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        for case, score in zip(out["cases"], self.cases, strict=True):
            case["dice"] = {c: score.dice(c) for c in CLASSES}
        return out

    def table(self) -> str:
        """Per-case table (Markdown), worst lesion Dice first."""
        rows = ["| case | lesion Dice | GGO Dice | high-opacity Dice | lesion truth / pred | high truth / pred |",
                "|---|---|---|---|---|---|"]
        for c in sorted(self.cases, key=lambda c: (c.dice("lesion") is not None, c.dice("lesion") or 0.0)):
            d = [c.dice(k) for k in CLASSES]
            rows.append(f"| {c.name} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in d)
                        + f" | {c.truth_amount['lesion']:.1f} / {c.pred_amount['lesion']:.1f}"
                        + f" | {c.truth_amount['high_opacity']:.1f} / {c.pred_amount['high_opacity']:.1f} |")
        return "\n".join(rows)

    def summary(self) -> str:
        lines = ["pooled Dice: " + ", ".join(f"{k} {_f(v)}" for k, v in self.pooled_dice.items()),
                 f"pred / truth {self.unit}: " + ", ".join(f"{k} {_f(v)}" for k, v in self.amount_ratio.items())]
        for k, s in self.spearman.items():
            ci = s["ci95"]
            lines.append(f"Spearman r {k}: {_f(s['r'])}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
        return "\n".join(lines)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def nifti_pairs(folder: Path) -> list[tuple[str, Path, Path]]:
    """``(name, ct, mask)`` of every ``NAME_ct.nii[.gz]`` with its ``NAME_mask`` in ``folder``."""
    out = []
    for ct in sorted(Path(folder).glob("*_ct.nii*")):
        name = ct.name.split("_ct.nii")[0]
        masks = sorted(ct.parent.glob(f"{name}_mask.nii*"))
        if masks:
            out.append((name, ct, masks[0]))
    return out


def load_case(name: str, ct: Path, mask: Path, copies: int = 12, slice_mm: float = 5.0) -> NiftiCase:
    """A pair as a :class:`NiftiCase`; a single slice becomes ``copies`` identical slices
    ``slice_mm`` apart (head to feet), scored on the middle copy."""
    from lungburden.training.data import read_nifti

    hu, affine = read_nifti(ct)
    truth, _ = read_nifti(mask)
    if truth.shape != hu.shape:
        raise ValueError(f"{name}: mask shape {truth.shape} differs from the CT's {hu.shape}")
    hu = hu.astype(np.float32)
    if hu.shape[0] == 1:
        affine = affine.copy()
        affine[:3, 0] = [0.0, 0.0, -float(slice_mm)]
        hu = np.ascontiguousarray(np.repeat(hu, copies, axis=0))
        scored = slice(copies // 2, copies // 2 + 1)
    else:
        scored = slice(0, hu.shape[0])
    volume = CTVolume(hu=hu, affine=affine, datasets=(), series_instance_uid=name, study_instance_uid=name,
                      frame_of_reference_uid=name)
    return NiftiCase(name, volume, np.asarray(truth, np.uint8), scored)


def score_case(case: NiftiCase, labels: np.ndarray) -> CaseScore:
    """Overlaps and amounts of one case's predicted ``labels`` (the whole volume's label map)."""
    pred = labels[case.scored]
    truth = case.truth if case.truth.shape[0] == pred.shape[0] else case.truth[:1]
    spacing = case.volume.spacing
    single = pred.shape[0] == 1 and case.volume.hu.shape[0] > 1
    unit = spacing[1] * spacing[2] / 100.0 if single else case.volume.voxel_volume_ml
    counts, truth_amount, pred_amount = {}, {}, {}
    for cls, (t_values, p_values) in CLASSES.items():
        t, p = np.isin(truth, t_values), np.isin(pred, p_values)
        counts[cls] = [int(np.count_nonzero(t & p)), int(np.count_nonzero(t)), int(np.count_nonzero(p))]
        truth_amount[cls] = counts[cls][1] * unit
        pred_amount[cls] = counts[cls][2] * unit
    return CaseScore(case.name, counts, truth_amount, pred_amount, float(np.count_nonzero(pred >= L.LUNG) * unit))


def summarize_scores(scores: Sequence[CaseScore], unit: str = "area") -> NiftiEvaluation:
    """Pooled Dice, pooled amount ratios and Spearman r (with bootstrap intervals) of cases."""
    pooled, ratio, spearman = {}, {}, {}
    from scipy import stats

    for cls in CLASSES:
        overlap = sum(s.counts[cls][0] for s in scores)
        truth = sum(s.counts[cls][1] for s in scores)
        pred = sum(s.counts[cls][2] for s in scores)
        pooled[cls] = None if truth + pred == 0 else 2.0 * overlap / (truth + pred)
        ratio[cls] = None if truth == 0 else pred / truth
    for cls in ("lesion", "high_opacity"):
        t = np.array([s.truth_amount[cls] for s in scores])
        p = np.array([s.pred_amount[cls] for s in scores])
        r = float(stats.spearmanr(t, p).statistic) if len(scores) >= 3 and np.ptp(t) > 0 and np.ptp(p) > 0 else None
        ci = spearman_interval(t, p) if r is not None else None
        spearman[cls] = {"r": r, "ci95": None if ci is None else [ci[0], ci[1]]}
    return NiftiEvaluation(list(scores), pooled, ratio, spearman, unit)


def evaluate_nifti(folder: Path, segment: Callable[[CTVolume], np.ndarray], out_dir: Path | None = None,
                   copies: int = 12, slice_mm: float = 5.0, worst: int = 6) -> NiftiEvaluation:
    """Run ``segment`` (e.g. a segmenter's ``segment``) on every pair of ``folder`` and score it;
    with ``out_dir``, write ``nifti_eval.json``, ``cases.md`` and overlays of the ``worst``
    cases by lesion Dice."""
    scores, kept = [], {}
    single = True
    pairs = nifti_pairs(folder)
    if not pairs:
        raise FileNotFoundError(f"{folder}: no NAME_ct.nii[.gz] with a NAME_mask.nii[.gz]")
    for name, ct, mask in pairs:
        case = load_case(name, ct, mask, copies, slice_mm)
        labels = segment(case.volume)
        scores.append(score_case(case, labels))
        single &= case.scored.stop - case.scored.start == 1
        kept[name] = (case, labels)
    result = summarize_scores(scores, "area cm²" if single else "volume mL")
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        ranked = sorted(scores, key=lambda s: s.dice("lesion") if s.dice("lesion") is not None else 1.0)
        for s in ranked[:worst]:
            case, labels = kept[s.name]
            result.overlays.append(str(write_overlay(case, labels, out_dir / f"{s.name}.png",
                                                     f"{s.name}: lesion Dice {_f(s.dice('lesion'))}")))
        (out_dir / "nifti_eval.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        (out_dir / "cases.md").write_text(result.summary() + "\n\n" + result.table() + "\n")
    return result


def write_overlay(case: NiftiCase, labels: np.ndarray, path: Path, title: str = "") -> Path:
    """The scored slice with the most truth lesion: CT in a lung window (-1350..150 HU), the
    prediction filled (GGO yellow, high opacity red, lung field blue) and the truth contoured
    (GGO yellow, consolidation red), side by side with the truth alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    start = case.scored.start
    truth = case.truth if case.truth.shape[0] == labels[case.scored].shape[0] else case.truth[:1]
    k = int(np.argmax(np.count_nonzero(truth >= 1, axis=(1, 2))))
    hu, pred, t = case.volume.hu[start + k], labels[start + k], truth[k]
    cmap = ListedColormap([(0, 0, 0, 0), (0.1, 0.5, 1, 0.25), (1, 1, 0, 0.45), (1, 0, 0, 0.55)])
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax in axes:
        ax.imshow(hu, cmap="gray", vmin=-1350, vmax=150)
        ax.axis("off")
    axes[0].imshow(pred, cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
    for value, colour in ((1, "yellow"), (2, "red")):
        if (t == value).any():
            for ax in axes:
                ax.contour(t == value, levels=[0.5], colors=colour, linewidths=0.8)
    axes[0].set_title("prediction (fill) + truth (contour)")
    axes[1].set_title("truth: GGO yellow, consolidation red")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
