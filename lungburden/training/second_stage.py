"""Fitting the learned high-opacity component filter (the segmenter's second stage).

The filter itself, its features and its numpy evaluation are runtime code
(:mod:`lungburden.segmentation.component_filter`); fitting it needs scikit-learn and labelled
cases, so it lives here (``lungburden model fit-filter``, docs/training.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lungburden import labels as L
from lungburden.segmentation.component_filter import (
    DEFAULT_THRESHOLD,
    FEATURE_NAMES,
    HighOpacityComponents,
    HighOpacityFilter,
    TreeEnsemble,
    describe_high_opacity,
)


def component_targets(found: HighOpacityComponents, truth: np.ndarray) -> np.ndarray:
    """1 where less than half of a component is true high opacity (what the filter should reject)."""
    if not found.count or found.crop is None:
        return np.zeros(0, np.int64)
    true_high = np.bincount(found.components[truth[found.crop] == L.HIGH_OPACITY], minlength=found.count + 1)[1:]
    size = np.bincount(found.components.ravel(), minlength=found.count + 1)[1:]
    return (true_high < 0.5 * size).astype(np.int64)


#: The classifier's settings (chosen in case-grouped cross-validation on phantoms 600-999,
#: docs/model-development.md, "Second stage").
FIT_SETTINGS: dict[str, Any] = {"max_depth": 3, "max_iter": 400, "learning_rate": 0.05,
                                "early_stopping": False, "random_state": 0}


def fit_filter(features: np.ndarray, targets: np.ndarray, volumes_ml: np.ndarray,
               provenance: dict[str, Any] | None = None,
               threshold: float = DEFAULT_THRESHOLD) -> HighOpacityFilter:
    """Fit the tree ensemble on component rows, each weighted by its volume (the ranking of patients
    by high-opacity volume pays for a component in mL, not per component)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    targets = np.asarray(targets)
    if len(np.unique(targets)) < 2:
        raise ValueError("the fitting cases need both true and false high-opacity components")
    model = HistGradientBoostingClassifier(**FIT_SETTINGS)
    model.fit(np.asarray(features, float), targets, sample_weight=np.asarray(volumes_ml, float))
    return HighOpacityFilter(TreeEnsemble.from_sklearn(model, FEATURE_NAMES), threshold,
                             {**(provenance or {}), "settings": dict(FIT_SETTINGS),
                              "components": int(len(targets)), "rejectable": int(targets.sum())})


@dataclass
class FilterFit:
    """What :func:`fit_from_cases` measured: the fitted filter and its case-grouped cross-validation."""

    filter: HighOpacityFilter
    cases: list[str]
    spearman_before: float  #: high-opacity volume Spearman r of the cases without the filter
    spearman_cv: float  #: the same with each case filtered by a model fitted on the other folds
    removed_false_ml: float  #: cross-validated: rejected volume that is mostly not high opacity
    removed_true_ml: float  #: cross-validated: rejected volume that is mostly high opacity
    folds_skipped: int = 0  #: folds that could not be fitted (one kind of component only)


def _spearman_after(truth_ml: np.ndarray, model_ml: np.ndarray, case_of_row: np.ndarray,
                    volumes: np.ndarray, rejected: np.ndarray) -> float:
    from scipy import stats

    after = model_ml - np.bincount(case_of_row[rejected], weights=volumes[rejected], minlength=len(model_ml))
    r = stats.spearmanr(truth_ml, np.clip(after, 0, None)).statistic
    return float(r) if np.isfinite(r) else 0.0


def fit_from_cases(segmenter: Any, cases: Iterable[Any], folds: int = 5,
                   progress: Any = None) -> FilterFit:
    """Label each :class:`~lungburden.training.data.RawCase` with ``segmenter`` (its
    finishing, without a component filter), describe its high-opacity components, and fit
    :func:`fit_filter` on all of them; ``folds``-fold cross-validation grouped by case (cases
    dealt round-robin) measures what the filter does to cases it was not fitted on (a fold whose
    other cases lack one of the two kinds of component cannot be fitted: counted in
    ``FilterFit.folds_skipped``, its cases stay unfiltered)."""
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    rows, targets, volumes, case_of_row, ids, truth_ml, model_ml = [], [], [], [], [], [], []
    for case in cases:
        volume = case.to_volume()
        labels = segmenter.segment(volume)
        truth = np.asarray(case.labels, np.uint8)
        found = describe_high_opacity(labels, volume.hu, volume.affine, volume.voxel_volume_ml)
        rows.append(found.features)
        targets.append(component_targets(found, truth))
        volumes.append(found.volumes_ml)
        case_of_row.append(np.full(found.count, len(ids)))
        ids.append(case.case_id)
        truth_ml.append(np.count_nonzero(truth == L.HIGH_OPACITY) * volume.voxel_volume_ml)
        model_ml.append(found.volumes_ml.sum())
        if progress is not None:
            progress(f"{case.case_id}: {found.count} high-opacity components, "
                     f"{int(targets[-1].sum())} mostly not high opacity")
    x, y, w = np.concatenate(rows), np.concatenate(targets), np.concatenate(volumes)
    groups = np.concatenate(case_of_row).astype(np.intp)
    t_ml, m_ml = np.asarray(truth_ml), np.asarray(model_ml)
    rejected = np.zeros(len(y), bool)
    skipped = 0
    for k in range(folds):
        test = groups % folds == k
        if not test.any():
            continue
        if len(np.unique(y[~test])) < 2:
            skipped += 1
            continue
        part = fit_filter(x[~test], y[~test], w[~test])
        rejected[test] = part.ensemble.probability(x[test]) > part.threshold
    before = _spearman_after(t_ml, m_ml, groups, w, np.zeros(len(y), bool))
    after = _spearman_after(t_ml, m_ml, groups, w, rejected)
    fitted = fit_filter(x, y, w, provenance={
        "cases": len(ids), "first_case": ids[0] if ids else None, "last_case": ids[-1] if ids else None,
        "cv_folds": folds, "cv_folds_skipped": skipped,
        "cv_spearman_high_before": round(before, 4), "cv_spearman_high_after": round(after, 4)})
    return FilterFit(fitted, ids, before, after, float(w[rejected & (y == 1)].sum()),
                     float(w[rejected & (y == 0)].sum()), skipped)
