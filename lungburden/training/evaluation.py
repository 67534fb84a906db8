"""Evaluation against ground truth (paper section 2.8) and the model comparison (section 3.5, Table 4).

Every case goes through the product path: a :class:`~lungburden.dicom_io.volume.CTVolume` is
given to a segmenter's ``segment`` (the :class:`~lungburden.segmentation.base.Segmenter`
protocol), and the resulting label map is compared with the truth **on the source grid**:

- Dice (DSC = 2TP / (2TP + FP + FN), section 2.8) per case for GGO, high opacity, the lesion mask
  (GGO or high opacity) and the lung field (labels 1-3), and pooled (TP/FP/FN summed over cases).
  A case where truth and prediction are both empty for a class has no Dice for it (excluded from
  the mean, counted as ``n_empty``);
- volumes (mL) and burden (%) from :func:`~lungburden.quantify.quantify`;
- Spearman r with a 95 % bootstrap confidence interval over cases, Bland-Altman bias (model -
  truth) with 95 % limits of agreement (bias ± 1.96 SD), and the paired Wilcoxon signed-rank
  test (scipy.stats), with Bland-Altman and scatter PNGs;
- per fold (a cross-validation run evaluates each fold's model on its own test cases, Fig. 3) and
  overall.

:func:`compare_models` puts several models side by side (Dice as above, plus CPU time and peak
memory of ``segment`` on 16 slices and on a 120-slice series, measured in a fresh subprocess per
model), like Table 4.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lungburden import labels as L
from lungburden.quantify import Quantities, quantify

log = logging.getLogger(__name__)

#: The overlap classes of the report: name -> label values forming the mask.
DICE_CLASSES: dict[str, tuple[int, ...]] = {
    "ggo": (L.GGO,),
    "high_opacity": (L.HIGH_OPACITY,),
    "lesion": (L.GGO, L.HIGH_OPACITY),
    "lung": (L.LUNG, L.GGO, L.HIGH_OPACITY),
}
#: The quantities compared by Spearman / Bland-Altman / Wilcoxon (keys of Quantities).
AGREEMENT_QUANTITIES: tuple[str, ...] = (
    "ggo_volume_ml",
    "high_opacity_volume_ml",
    "opacity_volume_ml",
    "lung_volume_ml",
    "burden_percent",
)


# --------------------------------------------------------------------------------------------------
# Overlap


@dataclass
class Overlap:
    """Voxel counts of one class in one case (or pooled over cases)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def dice(self) -> float | None:
        """DSC = 2TP / (2TP + FP + FN); ``None`` when truth and prediction are both empty."""
        denominator = 2 * self.tp + self.fp + self.fn
        return 2.0 * self.tp / denominator if denominator else None

    def __add__(self, other: Overlap) -> Overlap:
        return Overlap(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)


def overlap(truth: np.ndarray, pred: np.ndarray, values: Sequence[int]) -> Overlap:
    """TP/FP/FN of the mask ``label in values`` between two label maps of the same shape."""
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ in shape")
    t = np.isin(truth, values)
    p = np.isin(pred, values)
    tp = int(np.count_nonzero(t & p))
    return Overlap(tp=tp, fp=int(np.count_nonzero(p)) - tp, fn=int(np.count_nonzero(t)) - tp)


def dice(truth: np.ndarray, pred: np.ndarray, values: Sequence[int]) -> float | None:
    """Dice of the mask ``label in values`` (see :class:`Overlap`)."""
    return overlap(truth, pred, values).dice


# --------------------------------------------------------------------------------------------------
# Agreement statistics


@dataclass(frozen=True)
class BlandAltman:
    """Bias (mean of model - truth), SD of the differences and the 95 % limits of agreement."""

    bias: float
    sd: float
    loa_low: float
    loa_high: float


def bland_altman(truth: Sequence[float], pred: Sequence[float]) -> BlandAltman:
    """Bland-Altman agreement of paired measurements (difference = model - truth, SD with ddof 1)."""
    t = np.asarray(truth, float)
    p = np.asarray(pred, float)
    diff = p - t
    bias = float(diff.mean()) if diff.size else math.nan
    sd = float(diff.std(ddof=1)) if diff.size > 1 else 0.0
    return BlandAltman(bias=bias, sd=sd, loa_low=bias - 1.96 * sd, loa_high=bias + 1.96 * sd)


def _quartiles(values: np.ndarray) -> tuple[float, float, float]:
    if not values.size:
        return (math.nan, math.nan, math.nan)
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return float(med), float(q1), float(q3)


@dataclass(frozen=True)
class Agreement:
    """Model-versus-truth agreement of one quantity over cases (section 2.8)."""

    quantity: str
    n: int
    truth_median: float
    truth_q1: float
    truth_q3: float
    model_median: float
    model_q1: float
    model_q3: float
    spearman_r: float | None
    spearman_p: float | None
    bland_altman: BlandAltman
    wilcoxon_p: float | None
    #: 95 % percentile-bootstrap interval of ``spearman_r`` (cases resampled in pairs), or None.
    spearman_ci: tuple[float, float] | None = None


#: Bootstrap resamples for the Spearman r interval (fixed seed: the same cases give the same interval).
SPEARMAN_BOOTSTRAP_RESAMPLES = 2000


def spearman_interval(truth: np.ndarray, pred: np.ndarray, confidence: float = 0.95,
                      resamples: int = SPEARMAN_BOOTSTRAP_RESAMPLES) -> tuple[float, float] | None:
    """Percentile-bootstrap confidence interval of Spearman r over cases (scipy.stats.bootstrap,
    paired resampling), or None with fewer than 10 cases or where resamples leave it undefined
    (a series constant in too many resamples). How far a figure measured on ~100 cases may be
    from a bar such as r >= 0.98."""
    from scipy import stats

    if truth.size < 10:
        return None

    def statistic(t: np.ndarray, p: np.ndarray) -> float:
        return float(stats.spearmanr(t, p).statistic)

    with warnings.catch_warnings():  # a resample may hold one value only: r undefined (nan)
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap((truth, pred), statistic, paired=True, vectorized=False, n_resamples=resamples,
                              confidence_level=confidence, method="percentile", rng=np.random.default_rng(0))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return (low, high) if math.isfinite(low) and math.isfinite(high) else None


def agreement(quantity: str, truth: Sequence[float], pred: Sequence[float]) -> Agreement:
    """Spearman r (with :func:`spearman_interval`), Bland-Altman and paired Wilcoxon signed-rank
    of paired values.

    Spearman is undefined (``None``) with fewer than 3 cases or a constant series; Wilcoxon is 1.0
    when all differences are zero and ``None`` with fewer than 2 cases.
    """
    from scipy import stats

    t = np.asarray(truth, float)
    p = np.asarray(pred, float)
    r = rp = ci = None
    if t.size >= 3 and np.ptp(t) > 0 and np.ptp(p) > 0:
        res = stats.spearmanr(t, p)
        r, rp = float(res.statistic), float(res.pvalue)
        ci = spearman_interval(t, p)
    w = None
    if t.size >= 2:
        if np.allclose(t, p):
            w = 1.0
        else:
            w = float(stats.wilcoxon(p, t).pvalue)
    tm, tq1, tq3 = _quartiles(t)
    pm, pq1, pq3 = _quartiles(p)
    return Agreement(quantity, int(t.size), tm, tq1, tq3, pm, pq1, pq3, r, rp, bland_altman(t, p), w, ci)


# --------------------------------------------------------------------------------------------------
# Cases


@dataclass
class CaseResult:
    """The comparison of one case: overlaps per class, quantities of truth and model, timing."""

    case_id: str
    source: str
    fold: int | None
    overlaps: dict[str, Overlap]
    truth: Quantities
    model: Quantities
    seconds: float
    slices: int
    group: str = ""

    @property
    def dice(self) -> dict[str, float | None]:
        return {name: o.dice for name, o in self.overlaps.items()}

    def to_dict(self) -> dict:
        return {
            "case_id": self.case_id,
            "source": self.source,
            "fold": self.fold,
            "group": self.group,
            "slices": self.slices,
            "seconds": round(self.seconds, 3),
            "dice": {k: (None if v is None else round(v, 5)) for k, v in self.dice.items()},
            "overlap": {k: asdict(v) for k, v in self.overlaps.items()},
            "truth": self.truth.to_dict(),
            "model": self.model.to_dict(),
        }


def compare_labels(
    case_id: str,
    truth: np.ndarray,
    pred: np.ndarray,
    hu: np.ndarray,
    affine: np.ndarray,
    *,
    source: str = "",
    fold: int | None = None,
    seconds: float = 0.0,
    group: str = "",
) -> CaseResult:
    """Compare a predicted label map with the truth on the same (source) grid."""
    overlaps = {name: overlap(truth, pred, values) for name, values in DICE_CLASSES.items()}
    return CaseResult(
        case_id=case_id,
        source=source,
        fold=fold,
        overlaps=overlaps,
        truth=quantify(truth, hu, affine),
        model=quantify(pred, hu, affine),
        seconds=seconds,
        slices=int(truth.shape[0]),
        group=group,
    )


def case_group(case) -> str:
    """The subgroup a case is reported in: for a phantom its lesion pattern (``phantom: no
    lesions``, ``phantom: consolidation``, ``phantom: effusion + ggo`` …, from the spec in
    ``RawCase.meta``), else its source. A pooled figure hides a pattern the model misses, e.g.
    consolidation without GGO, which is 10 % of the phantoms."""
    meta = getattr(case, "meta", None) or {}
    kinds = meta.get("lesion_kinds")
    if not kinds:
        return str(case.source)
    if meta.get("burden_percent") == 0:  # None: drawn from the seed, so the kinds say more
        return f"{case.source}: no lesions"
    return f"{case.source}: " + " + ".join(sorted(str(kinds).split(",")))


def evaluate_cases(segmenter, cases: Iterable, fold: int | None = None, progress: bool = True) -> list[CaseResult]:
    """Run ``segmenter.segment`` on every case's :class:`CTVolume` and compare with its labels.

    ``cases`` yields :class:`lungburden.training.data.RawCase` (HU, labels, affine on
    the source grid).
    """
    from tqdm import tqdm

    results = []
    for case in tqdm(cases, desc="evaluate", unit="case", disable=not progress, leave=False):
        volume = case.to_volume()
        start = time.perf_counter()
        pred = segmenter.segment(volume)
        seconds = time.perf_counter() - start
        if pred.shape != case.labels.shape:
            raise RuntimeError(f"segmenter returned {pred.shape} for case {case.case_id} of shape {case.labels.shape}")
        results.append(
            compare_labels(case.case_id, case.labels, pred, volume.hu, volume.affine, source=case.source,
                           fold=fold, seconds=seconds, group=case_group(case))
        )
    return results


# --------------------------------------------------------------------------------------------------
# Summary


@dataclass
class DiceSummary:
    """Mean ± SD of the per-case Dice (over cases where it is defined) and the pooled Dice."""

    mean: float | None
    sd: float | None
    n: int
    n_empty: int
    pooled: float | None


@dataclass
class Summary:
    """Everything in ``report.json`` except the per-case rows."""

    n_cases: int
    dice: dict[str, DiceSummary]
    agreement: dict[str, Agreement]
    mean_seconds: float
    per_fold: dict[str, dict[str, DiceSummary]] = field(default_factory=dict)
    per_group: dict[str, GroupSummary] = field(default_factory=dict)


@dataclass
class GroupSummary:
    """One subgroup of cases (:func:`case_group`): pooled Dice, summed volumes, burden bias."""

    n_cases: int
    pooled_dice: dict[str, float | None]
    truth_opacity_ml: float
    model_opacity_ml: float
    truth_high_opacity_ml: float
    model_high_opacity_ml: float
    burden_bias: float


def summarize_group(results: Sequence[CaseResult]) -> GroupSummary:
    def total(side: str, quantity: str) -> float:
        return float(sum(getattr(getattr(r, side), quantity) for r in results))

    return GroupSummary(
        n_cases=len(results),
        pooled_dice={name: d.pooled for name, d in summarize_dice(results).items()},
        truth_opacity_ml=total("truth", "opacity_volume_ml"),
        model_opacity_ml=total("model", "opacity_volume_ml"),
        truth_high_opacity_ml=total("truth", "high_opacity_volume_ml"),
        model_high_opacity_ml=total("model", "high_opacity_volume_ml"),
        burden_bias=float(np.mean([r.model.burden_percent - r.truth.burden_percent for r in results])),
    )


def summarize_dice(results: Sequence[CaseResult]) -> dict[str, DiceSummary]:
    out = {}
    for name in DICE_CLASSES:
        values = [r.overlaps[name].dice for r in results]
        defined = np.array([v for v in values if v is not None], float)
        pooled = sum((r.overlaps[name] for r in results), Overlap()).dice
        out[name] = DiceSummary(
            mean=float(defined.mean()) if defined.size else None,
            sd=float(defined.std(ddof=1)) if defined.size > 1 else (0.0 if defined.size else None),
            n=int(defined.size),
            n_empty=len(values) - int(defined.size),
            pooled=pooled,
        )
    return out


def summarize(results: Sequence[CaseResult]) -> Summary:
    """Dice (overall and per fold) and agreement of every quantity in :data:`AGREEMENT_QUANTITIES`."""
    agreements = {
        q: agreement(q, [getattr(r.truth, q) for r in results], [getattr(r.model, q) for r in results])
        for q in AGREEMENT_QUANTITIES
    }
    folds = sorted({r.fold for r in results if r.fold is not None})
    per_fold = {str(k): summarize_dice([r for r in results if r.fold == k]) for k in folds}
    groups = sorted({r.group for r in results if r.group})
    per_group = {g: summarize_group([r for r in results if r.group == g]) for g in groups}
    return Summary(
        n_cases=len(results),
        dice=summarize_dice(results),
        agreement=agreements,
        mean_seconds=float(np.mean([r.seconds for r in results])) if results else 0.0,
        per_fold=per_fold,
        per_group=per_group,
    )


# --------------------------------------------------------------------------------------------------
# Report


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _clean(obj):
    """JSON-safe copy (NaN -> None)."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    return obj


def plot_agreement(results: Sequence[CaseResult], ag: Agreement, out_dir: Path, title: str = "") -> Path:
    """Bland-Altman plot (left) and scatter with identity line (right) of the quantity of ``ag``
    (its :func:`agreement` over ``results``, so the bootstrap is not run again); PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantity = ag.quantity
    t = np.array([getattr(r.truth, quantity) for r in results], float)
    p = np.array([getattr(r.model, quantity) for r in results], float)
    ba = ag.bland_altman
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    mean = (t + p) / 2
    ax1.scatter(mean, p - t, s=14, alpha=0.8)
    for y, style in ((ba.bias, "-"), (ba.loa_low, "--"), (ba.loa_high, "--")):
        ax1.axhline(y, color="tab:red", linestyle=style, linewidth=1)
    ax1.set_xlabel(f"mean of model and truth ({quantity})")
    ax1.set_ylabel("model - truth")
    ax1.set_title(f"Bland-Altman: bias {_fmt(ba.bias, 2)}, LoA [{_fmt(ba.loa_low, 2)}, {_fmt(ba.loa_high, 2)}]",
                  fontsize=9)
    ax2.scatter(t, p, s=14, alpha=0.8)
    hi = float(max(t.max(initial=0), p.max(initial=0))) or 1.0
    ax2.plot([0, hi], [0, hi], color="grey", linewidth=1)
    ax2.set_xlabel(f"truth ({quantity})")
    ax2.set_ylabel(f"model ({quantity})")
    ci_note = " (95 % CI)" if ag.spearman_ci else ""
    ax2.set_title(f"Spearman r = {_fmt(ag.spearman_r)}{_interval(ag.spearman_ci)}{ci_note}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"agreement-{quantity}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _dice_table(dice: dict[str, DiceSummary]) -> list[str]:
    lines = ["| class | mean DSC ± SD | n (defined) | n (both empty) | pooled DSC |", "|---|---|---|---|---|"]
    for name, d in dice.items():
        lines.append(f"| {name} | {_fmt(d.mean)} ± {_fmt(d.sd)} | {d.n} | {d.n_empty} | {_fmt(d.pooled)} |")
    return lines


def _agreement_table(agreements: dict[str, Agreement]) -> list[str]:
    lines = [
        "| quantity | truth median [IQR] | model median [IQR] | Spearman r [95 % CI] (p) | bias [95 % LoA] "
        "| Wilcoxon p |",
        "|---|---|---|---|---|---|",
    ]
    for q, a in agreements.items():
        ba = a.bland_altman
        lines.append(
            f"| {q} | {_fmt(a.truth_median, 1)} [{_fmt(a.truth_q1, 1)} – {_fmt(a.truth_q3, 1)}] "
            f"| {_fmt(a.model_median, 1)} [{_fmt(a.model_q1, 1)} – {_fmt(a.model_q3, 1)}] "
            f"| {_fmt(a.spearman_r)}{_interval(a.spearman_ci)} ({_fmt(a.spearman_p, 4)}) "
            f"| {_fmt(ba.bias, 2)} [{_fmt(ba.loa_low, 2)}, {_fmt(ba.loa_high, 2)}] | {_fmt(a.wilcoxon_p, 4)} |"
        )
    return lines


def _interval(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f" [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _group_table(groups: dict[str, GroupSummary]) -> list[str]:
    lines = ["| group | cases | DSC lesion | DSC GGO | DSC high | opacity model / truth mL "
             "| high opacity model / truth mL | burden bias % |", "|---|---|---|---|---|---|---|---|"]
    for name, g in groups.items():
        d = g.pooled_dice
        lines.append(
            f"| {name} | {g.n_cases} | {_fmt(d['lesion'])} | {_fmt(d['ggo'])} | {_fmt(d['high_opacity'])} "
            f"| {g.model_opacity_ml:.0f} / {g.truth_opacity_ml:.0f} | {g.model_high_opacity_ml:.0f} / "
            f"{g.truth_high_opacity_ml:.0f} | {g.burden_bias:+.1f} |"
        )
    return lines


def write_report(
    results: Sequence[CaseResult],
    out_dir: Path,
    *,
    title: str = "lungburden evaluation",
    info: dict | None = None,
    plots: bool = True,
) -> Summary:
    """Write ``report.md``, ``report.json`` and the agreement PNGs into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    pngs = ([plot_agreement(results, summary.agreement[q], out_dir, title) for q in AGREEMENT_QUANTITIES]
            if plots and results else [])
    document = {
        "title": title,
        "info": info or {},
        "summary": asdict(summary),
        "cases": [r.to_dict() for r in results],
        "plots": [p.name for p in pngs],
    }
    (out_dir / "report.json").write_text(json.dumps(_clean(document), indent=2) + "\n")
    md = [f"# {title}", ""]
    for key, value in (info or {}).items():
        md.append(f"- **{key}**: {value}")
    md += ["", f"{summary.n_cases} cases; mean segmentation time {summary.mean_seconds:.2f} s per case.", "",
           "## Dice (section 2.8)", ""]
    md += _dice_table(summary.dice)
    if len(summary.per_fold) > 1:
        for k, d in summary.per_fold.items():
            md += ["", f"### Fold {k}", ""] + _dice_table(d)
    if len(summary.per_group) > 1:
        md += ["", "## By case group", "", "Pooled DSC and summed volumes per group (a phantom's lesion pattern).", ""]
        md += _group_table(summary.per_group)
    md += ["", "## Volumes and burden: model versus truth", "",
           "Bias = mean(model - truth); LoA = bias ± 1.96 SD; Wilcoxon = paired signed-rank test.", ""]
    md += _agreement_table(summary.agreement)
    if pngs:
        md += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs]
    md += ["", "## Cases", "", "| case | source | fold | slices | DSC GGO | DSC high | DSC lesion | DSC lung "
           "| burden truth % | burden model % | s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        d = r.dice
        md.append(
            f"| {r.case_id} | {r.source} | {'' if r.fold is None else r.fold} | {r.slices} | {_fmt(d['ggo'])} "
            f"| {_fmt(d['high_opacity'])} | {_fmt(d['lesion'])} | {_fmt(d['lung'])} | {r.truth.burden_percent:.2f} "
            f"| {r.model.burden_percent:.2f} | {r.seconds:.2f} |"
        )
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    return summary


# --------------------------------------------------------------------------------------------------
# Compute cost (Table 4)


@dataclass(frozen=True)
class ComputeCost:
    """Cost of ``segment`` on a synthetic series of ``slices`` slices (rows × rows), measured in a
    fresh process: the first (cold: lazy initialisation, kernel selection) and a second (warm,
    steady state) call; CPU = process CPU seconds of the warm call (all threads)."""

    slices: int
    rows: int
    wall_s: float
    cpu_s: float
    cold_wall_s: float
    #: Peak resident memory of the process (MiB) and its resident memory just before ``segment``
    #: (Python, torch, the model and the input volume).
    peak_rss_mib: float
    rss_before_mib: float
    threads: int

    @property
    def peak_rss_growth_mib(self) -> float:
        return self.peak_rss_mib - self.rss_before_mib


def _status_mib(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident memory of this process (MiB): ``VmHWM``, the high-water mark of its own
    address space. Not ``getrusage``'s ``ru_maxrss``: on Linux a spawned child inherits the
    parent's peak through fork and exec, so every model would report the parent's memory."""
    peak = _status_mib("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def _rss_mib() -> float:
    rss = _status_mib("VmRSS")
    return rss if rss is not None else peak_rss_mib()


def write_timing_volume(path: Path, slices: int, rows: int = 512, seed: int = 7) -> Path:
    """Save a synthetic series (HU + affine) for :func:`measure_compute`, generated once per size."""
    from lungburden.training.data import synthetic_volume

    volume = synthetic_volume(slices=slices, rows=rows, seed=seed)
    np.savez(path, hu=volume.hu, affine=volume.affine)
    return path


def _measure_in_child(queue, segmenter_spec: tuple[str, str | None], volume_path: str,
                      threads: int | None) -> None:
    try:
        import torch

        from lungburden.dicom_io.volume import CTVolume

        if threads:
            torch.set_num_threads(threads)
        with np.load(volume_path) as z:
            hu, affine = z["hu"], z["affine"]
        volume = CTVolume(hu=hu, affine=affine, datasets=(), series_instance_uid="timing",
                          study_instance_uid="timing", frame_of_reference_uid="")
        segmenter = build_segmenter(*segmenter_spec, threads=threads)
        before = _rss_mib()
        wall0 = time.perf_counter()
        segmenter.segment(volume)
        cold = time.perf_counter() - wall0
        cpu0, wall0 = time.process_time(), time.perf_counter()
        segmenter.segment(volume)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        cost = ComputeCost(int(hu.shape[0]), int(hu.shape[1]), wall, cpu, cold, peak_rss_mib(), before,
                           torch.get_num_threads())
        queue.put({**asdict(cost), "peak_rss_growth_mib": cost.peak_rss_growth_mib})
    except Exception as exc:  # reported to the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def measure_compute(name: str, weights: str | None, volume_path: Path, threads: int | None = None,
                    timeout_s: float = 1800) -> dict:
    """Time and peak memory of ``segment`` on a saved series (:func:`write_timing_volume`) in a
    fresh (spawned) process, so that models do not share resident memory."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure_in_child, args=(queue, (name, weights), str(volume_path), threads))
    proc.start()
    try:
        result = queue.get(timeout=timeout_s)
    except Exception as exc:
        result = {"error": f"no result: {exc}"}
    proc.join(timeout=10)
    if proc.is_alive():
        proc.terminate()
    return result


def build_segmenter(name: str | None, weights: str | None = None, threads: int | None = None):
    """A segmenter by registry name, or a network segmenter (any model of ``build_model``) loaded
    from a checkpoint path (:class:`~lungburden.segmentation.convlstm.ConvLSTMSegmenter`)."""
    if weights:
        from lungburden.segmentation.convlstm import ConvLSTMSegmenter

        return ConvLSTMSegmenter.from_checkpoint(Path(weights), threads=threads)
    from lungburden.segmentation.registry import get_segmenter

    return get_segmenter(name)


@dataclass
class ModelComparison:
    """One row of the Table-4-style comparison."""

    name: str
    weights: str | None
    summary: Summary | None
    compute: dict[str, dict] = field(default_factory=dict)


def write_comparison(rows: Sequence[ModelComparison], out_dir: Path, info: dict | None = None) -> Path:
    """``comparison.md`` / ``comparison.json``: Dice per class and compute cost per model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = sorted({k for r in rows for k in r.compute}, key=lambda s: int(s.split("x")[0]))
    md = ["# Model comparison (paper Table 4 style)", ""]
    for key, value in (info or {}).items():
        md.append(f"- **{key}**: {value}")
    md += ["", "Dice = pooled DSC over all cases (mean per-case DSC in brackets). Time of `segment` on a "
           "synthetic series in a fresh process: wall / process CPU seconds (all threads) of a warm call, cold "
           "first call in brackets; memory = peak RSS of that process (growth during `segment` in brackets).",
           ""]
    header = "| model | DSC GGO | DSC high opacity | DSC lesion | DSC lung |"
    sep = "|---|---|---|---|---|"
    for s in sizes:
        header += f" {s}: wall / CPU s (cold) | {s}: peak MiB |"
        sep += "---|---|"
    md += [header, sep]
    for r in rows:
        line = f"| {r.name} |"
        for c in DICE_CLASSES:
            d = r.summary.dice[c] if r.summary else None
            line += f" {_fmt(d.pooled) if d else '–'} ({_fmt(d.mean) if d else '–'}) |"
        for s in sizes:
            c = r.compute.get(s, {})
            if "error" in c or not c:
                line += f" {c.get('error', '–')} | – |"
            else:
                line += (f" {c['wall_s']:.2f} / {c['cpu_s']:.2f} ({c['cold_wall_s']:.2f}) | "
                         f"{c['peak_rss_mib']:.0f} (+{c['peak_rss_growth_mib']:.0f}) |")
        md.append(line)
    (out_dir / "comparison.md").write_text("\n".join(md) + "\n")
    doc = {"info": info or {}, "models": [
        {"name": r.name, "weights": r.weights, "summary": asdict(r.summary) if r.summary else None,
         "compute": r.compute} for r in rows]}
    (out_dir / "comparison.json").write_text(json.dumps(_clean(doc), indent=2) + "\n")
    return out_dir / "comparison.md"


def cpu_description() -> str:
    """CPU model, usable cores and load average (for the reports: timings on a shared machine vary)."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = " (load average {:.1f} / {:.1f} / {:.1f})".format(*os.getloadavg())
    except OSError:
        load = ""
    return f"{model or 'unknown CPU'}, {len(os.sched_getaffinity(0))} usable cores{load}"


def cv_checkpoints(cv_dir: Path) -> list[Path]:
    paths = sorted(cv_dir.glob("fold-*/best.pt"))
    if not paths:
        raise FileNotFoundError(f"{cv_dir}: no fold-*/best.pt (a `lungburden model train --folds K` output folder)")
    return paths


def evaluate_cv(cv_dir: Path, progress: bool = True, threads: int | None = None):
    """Each fold's model on its own test cases (Fig. 3), concatenated; returns (results, info)."""
    from lungburden.segmentation.networks import load_checkpoint
    from lungburden.training.data import CaseIndex, DataSpec

    results, folds = [], []
    for path in cv_checkpoints(cv_dir):
        _, ckpt = load_checkpoint(path)
        meta = ckpt.get("metadata", {})
        split = meta.get("split", {})
        test = list(split.get("test", []))
        index = CaseIndex(DataSpec.from_dict(meta.get("data", {})).build_sources())
        segmenter = build_segmenter(ckpt["model"], str(path), threads)
        results += evaluate_cases(segmenter, index.iter_raw(test), fold=split.get("fold"), progress=progress)
        folds.append(f"{path.parent.name}: {len(test)} test cases, epochs {meta.get('epochs')}")
    return results, {"cross-validation": str(cv_dir), "folds": "; ".join(folds)}
