"""False-positive reduction for high-opacity components: a learned second stage.

The network labels vessels inside GGO patches and soft tissue beside the mediastinum as high
opacity in lungs that have none, and those few mL rank lesion-free patients among those with
small consolidations (docs/model-development.md). Rules on one attenuation or size figure
cannot tell them from small true consolidations; the second stage of a CAD system, a classifier
over candidate descriptions, can (the false-positive reduction of lung-nodule CAD, e.g. Setio et
al., IEEE TMI 2016). Here the candidates are the high-opacity components (26-connected) left by
the finishing steps of :mod:`.postprocess`; :func:`describe_high_opacity` describes each by
image features only (size, attenuation, the labels and attenuation around it, its position in
the lung field and its shape: :data:`FEATURE_NAMES`), and a gradient-boosted tree ensemble
(:class:`TreeEnsemble`, fitted with scikit-learn's ``HistGradientBoostingClassifier`` by
``lungburden model fit-filter`` on phantoms the network never trained on) gives the probability that a
component is mostly not high opacity. Components above :data:`DEFAULT_THRESHOLD` take the label
of most of their surface, as the specks of
:func:`~lungburden.segmentation.postprocess.relabel_unlikely_high_opacity` do.

Series-level figures (the series' GGO or high-opacity totals) are deliberately not features:
they separate the phantoms' false components well, but only because the phantom generator never
draws a little consolidation beside much GGO, which patients often have.

The ensemble is stored in the network's checkpoint (``high_opacity_filter``: the trees as plain
lists, the feature names, the threshold and how it was fitted), since it learnt that network's
errors; :class:`TreeEnsemble` evaluates it with numpy so that inference needs neither
scikit-learn nor unpickling of its objects.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from lungburden import labels as L
from lungburden.segmentation.masks import CUBE, bounding_crop, component_shell
from lungburden.segmentation.postprocess import relabel_to_surroundings

#: Checkpoint key of the stored ensemble.
CHECKPOINT_KEY = "high_opacity_filter"
#: Components whose probability of being mostly not high opacity exceeds this are relabelled.
DEFAULT_THRESHOLD = 0.5
#: Components from this size (mL) up are always kept and not described at inference (as in the
#: detached-opacity rule): on the fitting phantoms no component over 33 mL was rejected and
#: every one over 50 mL scored p < 0.001, and describing a white lung's consolidation (a box the
#: size of the lung) would cost seconds and gigabytes for nothing.
MAX_CANDIDATE_ML = 100.0
#: Attenuation (HU) above which a voxel around a component counts as dense (vessel, soft tissue,
#: consolidation; GGO reaches -330 HU at most in the phantoms and rarely -250 in patients).
DENSE_HU = -250.0
#: The two shells around a component (mm from its surface): near (0, 2] and far (2, 4.5].
SHELLS_MM = ((0.0, 2.0), (2.0, 4.5))

FEATURE_NAMES: tuple[str, ...] = (
    "log_volume_ml", "slices",
    "hu_median", "hu_mean", "hu_p10", "hu_p90", "hu_sd", "hu_p95", "hu_max",
    "surface_background", "surface_lung", "surface_ggo",
    "lung_field_z", "lung_field_x", "lung_field_y",
    "extent_1_mm", "extent_2_mm", "extent_3_mm", "elongation", "flatness",
    "near_dense", "near_dense_lung", "near_dense_ggo", "near_hu_median",
    "far_dense", "far_dense_lung", "far_dense_ggo", "far_hu_median",
)


@dataclass
class HighOpacityComponents:
    """The high-opacity components of a label map and their :data:`FEATURE_NAMES` rows.

    ``components`` and ``boxes`` are relative to ``crop``, the box of all high opacity grown by the
    rings' reach (a whole-series index map would cost 4 bytes per voxel; None: no high opacity)."""

    components: np.ndarray  #: int32 component index per voxel of ``crop`` (0 = not high opacity)
    features: np.ndarray  #: float64 ``(count, len(FEATURE_NAMES))``
    volumes_ml: np.ndarray  #: float64 ``(count,)``
    boxes: list[tuple[slice, ...]] = field(default_factory=list)  #: ``ndimage.find_objects`` boxes
    crop: tuple[slice, ...] | None = None

    @property
    def count(self) -> int:
        return len(self.volumes_ml)


def _lung_field(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index ranges (first, last) of the lung field (lung and lesions) along each axis."""
    field_mask = labels >= L.LUNG
    return tuple(np.flatnonzero(field_mask.any(axis=other))[[0, -1]]  # type: ignore[return-value]
                 for other in ((1, 2), (0, 2), (0, 1)))


def describe_high_opacity(labels: np.ndarray, hu: np.ndarray, affine: np.ndarray,
                          voxel_ml: float, max_ml: float | None = None) -> HighOpacityComponents:
    """Describe each high-opacity component (26-connected) of ``labels`` by :data:`FEATURE_NAMES`.

    ``affine``: index ``(slice, row, col, 1)`` → LPS mm (its column norms are the voxel spacing;
    its slice column says which end is cranial). Size and attenuation (HU percentiles of the
    component); the share of its 26-neighbour shell that is background / lung / GGO; the position
    of its centroid in the lung field's bounding box (z: 0 at the apex, 1 at the base; x: 0 at the
    midline, 1 at the lateral edge; y: 0 anterior, 1 posterior, whatever the row order); the square roots of the
    principal variances of its voxel positions (mm) and their ratios; and in the near and far shells
    (:data:`SHELLS_MM`) the share of dense voxels (above :data:`DENSE_HU`), of dense voxels the
    labels call lung (vessels in aerated lung) or GGO, and the median HU. Components of ``max_ml``
    or more (None: no limit) are not described: their rows are NaN.
    """
    affine = np.asarray(affine, float)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    margin = tuple(int(np.ceil(SHELLS_MM[-1][1] / s)) + 1 for s in spacing)
    high = labels == L.HIGH_OPACITY
    crop = bounding_crop(high, margin)  # type: ignore[arg-type]
    if crop is None:
        return HighOpacityComponents(np.zeros((0, 0, 0), np.int32), np.zeros((0, len(FEATURE_NAMES))), np.zeros(0))
    sub, sub_hu = labels[crop], np.asarray(hu[crop])
    components, count = ndimage.label(high[crop], structure=CUBE)
    features = np.full((count, len(FEATURE_NAMES)), np.nan)
    volumes = np.bincount(components.ravel(), minlength=count + 1)[1:] * float(voxel_ml)
    cranial_first = affine[2, 0] < 0
    rows_go_posterior = affine[1, 1] >= 0  # LPS +y is posterior; a prone scan's rows run anterior
    (z0, z1), (y0, y1), (x0, x1) = _lung_field(labels)
    offset = np.array([s.start for s in crop])
    boxes = ndimage.find_objects(components)
    for i, box in enumerate(boxes, start=1):
        if max_ml is not None and volumes[i - 1] >= max_ml:
            continue
        grown, member, shell = component_shell(components, i, box)
        around = np.bincount(sub[grown][shell], minlength=L.HIGH_OPACITY + 1)[:L.HIGH_OPACITY + 1]
        around = around / max(int(around.sum()), 1)
        values = np.asarray(sub_hu[grown][member], float)
        voxels = np.argwhere(member) + np.array([s.start for s in grown]) + offset  # series indices
        mm = voxels * spacing
        cov = np.cov(mm.T) if len(mm) > 3 else np.eye(3)
        extents = np.sqrt(np.sort(np.clip(np.linalg.eigvalsh(cov), 1e-6, None))[::-1])
        zc, yc, xc = voxels.mean(axis=0)
        z_rel = (zc - z0) / max(z1 - z0, 1)
        if not cranial_first:
            z_rel = 1.0 - z_rel
        x_rel = abs(xc - (x0 + x1) / 2) / max((x1 - x0) / 2, 1)
        y_rel = (yc - y0) / max(y1 - y0, 1)
        if not rows_go_posterior:
            y_rel = 1.0 - y_rel
        wide = tuple(slice(max(s.start - m, 0), min(s.stop + m, n))
                     for s, m, n in zip(box, margin, sub.shape, strict=True))
        inside = components[wide] == i
        distance = ndimage.distance_transform_edt(~inside, sampling=spacing)
        wide_hu, wide_labels = sub_hu[wide], sub[wide]
        dense = wide_hu > DENSE_HU
        rings = []
        for lo, hi in SHELLS_MM:
            ring = (distance > lo) & (distance <= hi)
            n = max(int(ring.sum()), 1)
            rings += [np.count_nonzero(dense & ring) / n,
                      np.count_nonzero(dense & ring & (wide_labels == L.LUNG)) / n,
                      np.count_nonzero(dense & ring & (wide_labels == L.GGO)) / n,
                      float(np.median(wide_hu[ring])) if ring.any() else 0.0]
        p10, p90, p95 = np.percentile(values, (10, 90, 95))
        features[i - 1] = [
            np.log(volumes[i - 1]), len(np.unique(voxels[:, 0])),
            np.median(values), values.mean(), p10, p90, values.std(), p95, values.max(),
            around[L.BACKGROUND], around[L.LUNG], around[L.GGO],
            z_rel, x_rel, y_rel,
            extents[0], extents[1], extents[2], extents[0] / extents[1], extents[1] / extents[2],
            *rings,
        ]
    return HighOpacityComponents(components, features, volumes, boxes, crop)


@dataclass(frozen=True)
class TreeEnsemble:
    """A binary gradient-boosted tree ensemble: ``sigmoid(baseline + Σ leaf values)``.

    The trees are flat node arrays (all trees concatenated; ``roots`` index each tree's first node;
    ``left`` / ``right`` are absolute node indices). A sample goes left where
    ``x[feature] <= threshold`` and, for a missing value (NaN), where ``missing_left``: the rule of
    scikit-learn's ``HistGradientBoostingClassifier`` for numeric features, from which
    :meth:`from_sklearn` converts.
    """

    feature_names: tuple[str, ...]
    baseline: float
    roots: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    missing_left: np.ndarray
    left: np.ndarray
    right: np.ndarray
    is_leaf: np.ndarray
    value: np.ndarray

    @classmethod
    def from_sklearn(cls, model: Any, feature_names: Iterable[str]) -> TreeEnsemble:
        """Convert a fitted binary ``HistGradientBoostingClassifier`` (numeric features only)."""
        names = tuple(feature_names)
        if getattr(model, "n_trees_per_iteration_", 1) != 1 or model.n_features_in_ != len(names):
            raise ValueError("expected a binary classifier over the given features")
        parts: dict[str, list[np.ndarray]] = {k: [] for k in
                                              ("feature", "threshold", "missing", "left", "right", "leaf", "value")}
        roots, offset = [], 0
        for (tree,) in model._predictors:  # noqa: SLF001 - sklearn keeps its trees here
            nodes = tree.nodes
            if np.any(nodes["is_categorical"]):
                raise ValueError("categorical splits are not supported")
            roots.append(offset)
            parts["feature"].append(nodes["feature_idx"].astype(np.int32))
            parts["threshold"].append(nodes["num_threshold"].astype(np.float64))
            parts["missing"].append(nodes["missing_go_to_left"].astype(bool))
            parts["left"].append(nodes["left"].astype(np.int32) + offset)
            parts["right"].append(nodes["right"].astype(np.int32) + offset)
            parts["leaf"].append(nodes["is_leaf"].astype(bool))
            parts["value"].append(nodes["value"].astype(np.float64))
            offset += len(nodes)
        joined = {k: np.concatenate(v) for k, v in parts.items()}
        return cls(names, float(np.ravel(model._baseline_prediction)[0]),  # noqa: SLF001
                   np.asarray(roots, np.int32), joined["feature"], joined["threshold"], joined["missing"],
                   joined["left"], joined["right"], joined["leaf"], joined["value"])

    def decision(self, features: np.ndarray) -> np.ndarray:
        """Raw scores (log-odds) of ``(samples, features)``."""
        x = np.asarray(features, float)
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise ValueError(f"expected (samples, {len(self.feature_names)}) features, got {x.shape}")
        node = np.broadcast_to(self.roots, (len(x), len(self.roots))).copy()
        rows = np.arange(len(x))[:, None]
        while True:
            active = ~self.is_leaf[node]
            if not active.any():
                break
            value = x[rows, np.where(active, self.feature[node], 0)]
            go_left = np.where(np.isnan(value), self.missing_left[node], value <= self.threshold[node])
            node = np.where(active, np.where(go_left, self.left[node], self.right[node]), node)
        return self.baseline + self.value[node].sum(axis=1)

    def probability(self, features: np.ndarray) -> np.ndarray:
        """Probability of the positive class (here: the component is mostly not high opacity)."""
        return 1.0 / (1.0 + np.exp(-self.decision(features)))

    def to_dict(self) -> dict[str, Any]:
        """Plain lists (``torch.load(weights_only=True)``-safe) for the checkpoint."""
        return {"feature_names": list(self.feature_names), "baseline": self.baseline,
                "roots": self.roots.tolist(), "feature": self.feature.tolist(),
                "threshold": self.threshold.tolist(), "missing_left": self.missing_left.tolist(),
                "left": self.left.tolist(), "right": self.right.tolist(),
                "is_leaf": self.is_leaf.tolist(), "value": self.value.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TreeEnsemble:
        """Inverse of :meth:`to_dict`; checks that the node arrays agree (ValueError if not)."""
        try:
            ensemble = cls(tuple(data["feature_names"]), float(data["baseline"]),
                           np.asarray(data["roots"], np.int32), np.asarray(data["feature"], np.int32),
                           np.asarray(data["threshold"], np.float64), np.asarray(data["missing_left"], bool),
                           np.asarray(data["left"], np.int32), np.asarray(data["right"], np.int32),
                           np.asarray(data["is_leaf"], bool), np.asarray(data["value"], np.float64))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"malformed tree ensemble: {exc}") from exc
        n = len(ensemble.feature)
        arrays = (ensemble.threshold, ensemble.missing_left, ensemble.left, ensemble.right,
                  ensemble.is_leaf, ensemble.value)
        inner = ~ensemble.is_leaf
        if (any(len(a) != n for a in arrays) or not len(ensemble.roots)
                or np.any(ensemble.roots < 0) or np.any(ensemble.roots >= n)
                or np.any(ensemble.left[inner] < 0) or np.any(ensemble.left[inner] >= n)
                or np.any(ensemble.right[inner] < 0) or np.any(ensemble.right[inner] >= n)
                or np.any(ensemble.feature[inner] < 0) or np.any(ensemble.feature[inner] >= len(ensemble.feature_names))
                or np.any(ensemble.left[inner] <= np.arange(n)[inner])
                or np.any(ensemble.right[inner] <= np.arange(n)[inner])):
            raise ValueError("malformed tree ensemble: node arrays disagree")
        return ensemble


@dataclass(frozen=True)
class HighOpacityFilter:
    """A fitted component filter as stored in a checkpoint (:data:`CHECKPOINT_KEY`)."""

    ensemble: TreeEnsemble
    threshold: float = DEFAULT_THRESHOLD
    provenance: dict[str, Any] = field(default_factory=dict)  #: how it was fitted (cases, command, figures)

    def to_dict(self) -> dict[str, Any]:
        return {"ensemble": self.ensemble.to_dict(), "threshold": float(self.threshold),
                "provenance": dict(self.provenance)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HighOpacityFilter:
        """Read a stored filter; refuses a malformed one and one fitted on other features than
        :data:`FEATURE_NAMES` (ValueError)."""
        if not isinstance(data, dict) or not isinstance(data.get("ensemble"), dict):
            raise ValueError("malformed high-opacity filter in the checkpoint")
        ensemble = TreeEnsemble.from_dict(data["ensemble"])
        if ensemble.feature_names != FEATURE_NAMES:
            raise ValueError("the stored high-opacity filter was fitted on other component features than "
                             "this lungburden computes; refit it with `lungburden model fit-filter`")
        try:
            threshold = float(data.get("threshold", DEFAULT_THRESHOLD))
            provenance = dict(data.get("provenance") or {})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed high-opacity filter in the checkpoint: {exc}") from exc
        return cls(ensemble, threshold, provenance)

    def apply(self, labels: np.ndarray, hu: np.ndarray, affine: np.ndarray, voxel_ml: float) -> int:
        """Relabel the high-opacity components this filter rejects, in place, each to the label that
        holds most of its 26-neighbour shell (background, lung or GGO; background on ties).
        Components of :data:`MAX_CANDIDATE_ML` or more are kept. Returns how many were relabelled."""
        found = describe_high_opacity(labels, hu, affine, voxel_ml, max_ml=MAX_CANDIDATE_ML)
        candidates = np.flatnonzero(found.volumes_ml < MAX_CANDIDATE_ML)
        if not candidates.size or found.crop is None:
            return 0
        probability = self.ensemble.probability(found.features[candidates])
        rejected = candidates[probability > self.threshold]
        relabel_to_surroundings(labels[found.crop], found.components, found.boxes, rejected + 1)
        return len(rejected)
