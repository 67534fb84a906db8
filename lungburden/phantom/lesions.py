"""Synthetic COVID-19 lesions, drawn the same way into a phantom and into a real CT
(see ``docs/phantom.md``, "Lesions" and "Real anatomy + synthetic lesions").

:func:`draw_lesions` paints ground-glass opacity (GGO, label 2, -750..-300 HU, vessels kept),
consolidation and dependent pleural effusion (label 3, -100..+100 HU and 0..+30 HU) inside a
lung field. Lesion voxels are chosen by rank, so the requested burden is met to the voxel: the
phantom's ground truth is exact, and so are the labels of :func:`insert_lesions`, which paints
the lesions into a real CT (HU + LPS affine) inside a lung mask from :func:`lung_mask_from_hu`
to make training data with real anatomy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lungburden import labels as L
from lungburden.phantom.spec import HU_MAX, HU_MIN, KIND_CONSOLIDATION, KIND_EFFUSION, KIND_GGO, LESION_KINDS

_PARENCHYMA = -850.0  # nominal aerated lung, reference of the GGO filling model


@dataclass(frozen=True, eq=False)
class InsertedLesions:
    """Result of :func:`insert_lesions`: a real CT with synthetic lesions and their labels."""

    hu: np.ndarray  # same shape and dtype as the input
    labels: np.ndarray  # uint8: 0 outside the lung mask, 1 lung, 2 GGO, 3 high opacity
    lesion_kinds: np.ndarray  # uint8 KIND_* codes
    lung_mask: np.ndarray  # bool
    burden_target_percent: float


@dataclass(frozen=True)
class LesionPlan:
    """Fractions of the lung field (0..1) given to each lesion kind, and their HU levels."""

    ggo: float
    consolidation: float
    effusion: float
    effusion_sides: str  # "both", "left", "right"
    left_share: float  # share of GGO/consolidation voxels placed in the left lung (before capping)
    ggo_low: float
    ggo_high: float
    consolidation_level: float
    effusion_level: float
    peripheral_mm: float
    posterior_weight: float
    basal_weight: float

    @property
    def total(self) -> float:
        return self.ggo + self.consolidation + self.effusion


def random_burden_percent(rng: np.random.Generator) -> float:
    """Burden drawn for ``burden_percent=None``: 0 for ~10 %, else 0.5..60 % skewed low."""
    if rng.random() < 0.1:
        return 0.0
    return float(0.5 + 59.5 * rng.random() ** 1.6)


def plan_lesions(
    rng: np.random.Generator, burden_percent: float, kinds: frozenset[str] | set[str] = frozenset(LESION_KINDS)
) -> LesionPlan:
    """Split a burden among the enabled kinds: mostly GGO, some consolidation, sometimes effusion
    (about one case in three, 5-30 % of the burden). With no kind enabled nothing is drawn."""
    b = float(burden_percent) / 100.0
    kinds = set(kinds)
    eff = 0.0
    if "effusion" in kinds and b > 0 and (rng.random() < 0.35 or kinds == {"effusion"}):
        eff = b if kinds == {"effusion"} else b * rng.uniform(0.05, 0.3)
    rest = b - eff
    cons = 0.0
    if "consolidation" in kinds and rest > 0:
        cons = rest if "ggo" not in kinds else rest * rng.uniform(0.08, 0.4)
    ggo = rest - cons if "ggo" in kinds else 0.0
    sides = str(rng.choice(["both", "both", "left", "right"]))
    return LesionPlan(
        ggo=ggo,
        consolidation=cons,
        effusion=eff,
        effusion_sides=sides,
        left_share=float(rng.uniform(0.3, 0.7)),
        ggo_low=float(rng.uniform(-720, -650)),
        ggo_high=float(rng.uniform(-480, -330)),
        consolidation_level=float(rng.uniform(-40, 50)),
        effusion_level=float(rng.uniform(5, 25)),
        peripheral_mm=float(rng.uniform(8, 25)),
        posterior_weight=float(rng.uniform(0.2, 1.0)),
        basal_weight=float(rng.uniform(0.0, 0.8)),
    )


def bbox(mask: np.ndarray, pad: int = 0) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask as slices (padded, clipped)."""
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        out.append(slice(max(int(nz[0]) - pad, 0), min(int(nz[-1]) + 1 + pad, mask.shape[axis])))
    return tuple(out)


def upsample_linear(a: np.ndarray, factors: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Linear upsampling of a block-averaged grid back to ``shape`` (cell-centre aligned)."""
    out = a
    for axis, (f, n) in enumerate(zip(factors, shape, strict=True)):
        if f == 1:
            continue
        m = out.shape[axis]
        pos = (np.arange(n, dtype=np.float32) + 0.5) / f - 0.5
        pos = np.clip(pos, 0, m - 1)
        i0 = np.floor(pos).astype(np.intp)
        i1 = np.minimum(i0 + 1, m - 1)
        w = (pos - i0).astype(np.float32)
        wshape = [1] * out.ndim
        wshape[axis] = n
        w = w.reshape(wshape)
        lo, hi = np.take(out, i0, axis=axis), np.take(out, i1, axis=axis)
        hi -= lo
        hi *= w
        lo += hi
        out = lo
    return out


def _block_mean(a: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Mean over blocks of ``factors`` voxels (edge blocks padded with zeros)."""
    pads = [(0, (-n) % f) for n, f in zip(a.shape, factors, strict=True)]
    p = np.pad(a.astype(np.float32), pads)
    shape = []
    for n, f in zip(p.shape, factors, strict=True):
        shape += [n // f, f]
    return p.reshape(shape).mean(axis=(1, 3, 5))


def _axis_coords(affine: np.ndarray, shape: tuple[int, ...], row: int) -> list[np.ndarray]:
    """Per-axis contributions to LPS coordinate ``row`` (sum them by broadcasting)."""
    out = []
    for axis, n in enumerate(shape):
        s = [1, 1, 1]
        s[axis] = n
        out.append((affine[row, axis] * np.arange(n, dtype=np.float64)).reshape(s).astype(np.float32))
    out[0] = out[0] + np.float32(affine[row, 3])
    return out


def _lesion_score(lung: np.ndarray, spacing: np.ndarray, rng: np.random.Generator, plan: LesionPlan) -> np.ndarray:
    """Smooth random lesion propensity on the lung bounding box (float32, same shape as ``lung``).

    Computed on a ~3 mm grid: two scales of low-pass noise (patches, lobules) plus a subpleural
    term from the distance to the lung border; upsampled linearly.
    """
    factors = tuple(max(1, int(round(3.0 / s))) for s in spacing)
    coarse_lung = _block_mean(lung, factors) >= 0.5
    cspacing = np.asarray(spacing) * np.asarray(factors)
    noise = rng.standard_normal(coarse_lung.shape, dtype=np.float32)
    big = ndimage.gaussian_filter(noise, sigma=tuple(float(v) for v in 11.0 / cspacing), mode="nearest")
    small = ndimage.gaussian_filter(noise[::-1].copy(), sigma=tuple(float(v) for v in 4.0 / cspacing))
    inside = coarse_lung if coarse_lung.any() else np.ones_like(coarse_lung)
    big /= max(float(big[inside].std()), 1e-6)
    small /= max(float(small[inside].std()), 1e-6)
    dist = ndimage.distance_transform_edt(coarse_lung, sampling=cspacing).astype(np.float32)
    score = big + 0.45 * small + 1.6 * np.exp(-dist / plan.peripheral_mm)
    return upsample_linear(score.astype(np.float32), factors, lung.shape)


def _pick_top(values: np.ndarray, count: int) -> np.ndarray:
    """Indices (into ``values``) of the ``count`` largest values."""
    count = int(min(max(count, 0), values.size))
    if count == 0:
        return np.empty(0, dtype=np.intp)
    if count == values.size:
        return np.arange(values.size)
    return np.argpartition(values, values.size - count)[values.size - count :]


def estimate_noise_sd(hu: np.ndarray) -> float:
    """Robust CT noise estimate (HU) from neighbour differences in soft tissue, clamped to 5..40."""
    a = hu[:, :, :-1].astype(np.float32)
    b = hu[:, :, 1:].astype(np.float32)
    sel = (a > -150) & (a < 150) & (b > -150) & (b < 150)
    if sel.sum() < 100:
        return 15.0
    d = (a - b)[sel]
    sd = 1.4826 * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(2.0)
    return float(np.clip(sd, 5.0, 40.0))


def draw_lesions(
    hu: np.ndarray,
    lung: np.ndarray,
    affine: np.ndarray,
    rng: np.random.Generator,
    plan: LesionPlan,
    left: np.ndarray | None = None,
    noise_sd: float = 0.0,
) -> np.ndarray:
    """Paint lesions into ``hu`` (float32, modified in place) within ``lung``; return KIND_* map.

    ``affine`` maps array indices to LPS mm (any axis order; the axes nearest to posterior and
    superior give the dependent and basal directions). ``left`` is the patient's left lung
    (default: by x of the lung centroid as in quantify.py). Voxel counts are exact: the lesion
    fraction of the lung field equals ``plan.total`` up to rounding. ``noise_sd`` adds white
    noise to the replaced (consolidation/effusion) voxels; use 0 when noise is added later.
    Only voxels inside ``lung`` change.
    """
    kinds = np.zeros(lung.shape, dtype=np.uint8)
    n_lung = int(lung.sum())
    if n_lung == 0 or plan.total <= 0:
        return kinds
    if left is None:
        from lungburden.quantify import left_lung_mask

        left = left_lung_mask(lung.astype(np.uint8), affine)
    box = bbox(lung)
    lung_b = lung[box]
    work = np.ascontiguousarray(hu[box], dtype=np.float32)
    kinds_b = np.zeros(lung_b.shape, dtype=np.uint8)
    aff_b = affine.copy()
    aff_b[:, 3] = affine @ np.array([s.start for s in box] + [1.0])
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    flat = np.flatnonzero(lung_b)
    is_left = left[box][lung_b]
    side_counts = {"left": int(is_left.sum()), "right": int((~is_left).sum())}
    side_sel = {"left": is_left, "right": ~is_left}

    # Coordinates (mm) along posterior (LPS +y) and superior (+z), per lung voxel.
    yc = _axis_coords(aff_b, lung_b.shape, 1)
    zc = _axis_coords(aff_b, lung_b.shape, 2)
    y_lung = ((yc[0] + yc[1]) + yc[2])[lung_b]
    z_lung = ((zc[0] + zc[1]) + zc[2])[lung_b]
    post = (y_lung - y_lung.min()) / max(float(np.ptp(y_lung)), 1.0)
    basal = (z_lung.max() - z_lung) / max(float(np.ptp(z_lung)), 1.0)
    del y_lung
    taken = np.zeros(flat.size, dtype=bool)

    # 1. Pleural effusion: the most dependent layer of each chosen lung, thicker at the base.
    n_eff = int(round(plan.effusion * n_lung))
    if n_eff:
        eff_score = -(_dependent_height(lung_b, aff_b) + 0.25 * (z_lung - z_lung.min()))
        sides = ["left", "right"] if plan.effusion_sides == "both" else [plan.effusion_sides]
        if sum(side_counts[s] for s in sides) == 0:
            sides = ["left", "right"]
        total = sum(side_counts[s] for s in sides) or 1
        for s in sides:
            idx = np.flatnonzero(side_sel[s])
            want = int(round(n_eff * side_counts[s] / total))
            taken[idx[_pick_top(eff_score[idx], want)]] = True
        eff = np.flatnonzero(taken)
        kinds_b.ravel()[flat[eff]] = KIND_EFFUSION
        work.ravel()[flat[eff]] = plan.effusion_level + noise_sd * rng.standard_normal(eff.size)

    # 2. GGO and consolidation: top of a smooth random score, per lung, consolidation at the cores.
    n_les = int(round((plan.ggo + plan.consolidation) * n_lung))
    if n_les:
        score = _lesion_score(lung_b, spacing, rng, plan)[lung_b]
        score += plan.posterior_weight * post + plan.basal_weight * basal
        share = {"left": plan.left_share, "right": 1.0 - plan.left_share}
        free = {s: int((side_sel[s] & ~taken).sum()) for s in share}
        want = {s: min(int(round(n_les * share[s])), free[s]) for s in share}
        for s, other in (("left", "right"), ("right", "left")):  # move what does not fit
            extra = int(round(n_les * share[s])) - want[s]
            if extra > 0:
                want[other] = min(want[other] + extra, free[other])
        cons_frac = plan.consolidation / (plan.ggo + plan.consolidation)
        for s in ("left", "right"):
            idx = np.flatnonzero(side_sel[s] & ~taken)
            if want[s] == 0 or idx.size == 0:
                continue
            pick = idx[_pick_top(score[idx], want[s])]
            n_cons = pick.size if plan.ggo == 0 else int(round(want[s] * cons_frac))
            rank = score[pick] + 0.6 * post[pick] + 0.4 * basal[pick]
            rank += 0.15 * rng.standard_normal(pick.size).astype(np.float32)
            order = _pick_top(rank, n_cons)
            is_cons = np.zeros(pick.size, dtype=bool)
            is_cons[order] = True
            cons, ggo = pick[is_cons], pick[~is_cons]
            if ggo.size:
                s_ggo = score[ggo]
                lo, hi = float(s_ggo.min()), float(np.percentile(s_ggo, 90))
                depth = np.clip((s_ggo - lo) / max(hi - lo, 1e-6), 0, 1) ** 0.8
                level = plan.ggo_low + (plan.ggo_high - plan.ggo_low) * depth
                cur = work.ravel()[flat[ggo]]
                fill = np.clip((40.0 - cur) / (40.0 - _PARENCHYMA), 0.0, 1.15)
                work.ravel()[flat[ggo]] = cur + (level - _PARENCHYMA) * fill
                kinds_b.ravel()[flat[ggo]] = KIND_GGO
            if cons.size:
                s_c = score[cons]
                wobble = (s_c - s_c.mean()) / max(float(s_c.std()), 1e-6)
                level = np.clip(plan.consolidation_level + 20.0 * wobble, -90.0, 90.0)
                work.ravel()[flat[cons]] = level + noise_sd * rng.standard_normal(cons.size)
                kinds_b.ravel()[flat[cons]] = KIND_CONSOLIDATION
    np.copyto(hu[box], work, where=lung_b, casting="unsafe")
    kinds[box] = kinds_b
    return kinds


def _dependent_height(lung: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Height (mm) of each lung voxel above the most posterior lung voxel of its line."""
    axis = int(np.argmax(np.abs(affine[1, :3])))
    step = float(np.linalg.norm(affine[:3, axis]))
    n = lung.shape[axis]
    ramp = np.arange(n, dtype=np.int32) if affine[1, axis] > 0 else np.arange(n - 1, -1, -1, dtype=np.int32)
    shape = [1, 1, 1]
    shape[axis] = n
    ramp = ramp.reshape(shape)
    deepest = np.where(lung, ramp, -1).max(axis=axis, keepdims=True)
    return ((deepest - ramp)[lung] * step).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Real CT: lung mask and lesion insertion
# --------------------------------------------------------------------------------------------


def lps_from_ras(affine: np.ndarray) -> np.ndarray:
    """Convert a NIfTI (RAS) affine to LPS, or back (the flip is its own inverse)."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)


def lung_mask_from_hu(hu: np.ndarray, affine: np.ndarray, threshold: float = -400.0) -> np.ndarray:
    """Lung field of a CT by thresholding and morphology (vessels included, airways partly).

    Air below ``threshold`` HU is labelled in 3D; components that are mostly pure air
    (< -950 HU: outside air, trachea, bowel gas) or smaller than 20 mL are dropped; the rest is
    closed (~3 mm) and its in-plane holes (vessels) are filled slice by slice along the axis
    nearest to head-feet. Works on crops whose lungs touch the border.
    """
    hu = np.asarray(hu)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    air = hu < threshold
    comps, count = ndimage.label(air)
    if count == 0:
        return air
    index = np.arange(1, count + 1)
    sizes = ndimage.sum_labels(air, comps, index)
    pure = ndimage.sum_labels(hu < -950, comps, index) / np.maximum(sizes, 1)
    keep = index[(sizes * voxel_ml >= 20.0) & (pure < 0.5)]
    lung = np.isin(comps, keep)
    if not lung.any():
        return lung
    box = bbox(lung, pad=3)
    sub = lung[box]
    radius = np.maximum(np.round(3.0 / spacing), 1).astype(int)
    struct = np.zeros(tuple(2 * r + 1 for r in radius), dtype=bool)
    grids = np.meshgrid(*[np.arange(-r, r + 1) / max(r, 1) for r in radius], indexing="ij")
    struct[sum(g**2 for g in grids) <= 1.0] = True
    sub = ndimage.binary_closing(sub, structure=struct)
    axial = int(np.argmax(np.abs(affine[2, :3])))
    moved = np.moveaxis(sub, axial, 0)
    filled = np.stack([ndimage.binary_fill_holes(s) for s in moved])
    sub = np.moveaxis(filled, 0, axial)
    out = np.zeros_like(lung)
    out[box] = sub
    return out


def insert_lesions(
    hu: np.ndarray,
    affine: np.ndarray,
    seed: int | np.random.Generator = 0,
    burden_percent: float | None = None,
    kinds: frozenset[str] | set[str] = frozenset(LESION_KINDS),
    lung_mask: np.ndarray | None = None,
    noise_sd: float | None = None,
) -> InsertedLesions:
    """Insert synthetic GGO / consolidation / effusion into a real CT.

    ``hu`` is any 3D HU array and ``affine`` its index→LPS mm affine (for NIfTI use
    :func:`lps_from_ras`). The lung mask defaults to :func:`lung_mask_from_hu`; lesions are drawn
    only inside it (and only HU inside it change). ``noise_sd=None`` estimates the image noise
    for the replaced voxels. Returns the new HU in the input dtype (rounded if integer).
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    affine = np.asarray(affine, dtype=np.float64)
    lung = lung_mask_from_hu(hu, affine) if lung_mask is None else np.asarray(lung_mask, dtype=bool)
    burden = random_burden_percent(rng) if burden_percent is None else float(burden_percent)
    plan = plan_lesions(rng, burden, kinds)
    work = np.asarray(hu, dtype=np.float32).copy()
    sd = estimate_noise_sd(hu) if noise_sd is None else float(noise_sd)
    kind_map = draw_lesions(work, lung, affine, rng, plan, noise_sd=sd)
    labels = labels_from(lung, kind_map)
    dtype = np.asarray(hu).dtype
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        np.rint(work, out=work)
        out = np.clip(work, max(info.min, HU_MIN), min(info.max, HU_MAX)).astype(dtype)
        out[~lung] = np.asarray(hu)[~lung]
    else:
        out = work.astype(dtype)
    return InsertedLesions(out, labels, kind_map, lung, 100.0 * plan.total)


def labels_from(lung: np.ndarray, kind_map: np.ndarray) -> np.ndarray:
    """Label map (:mod:`lungburden.labels`) of a lung mask and a ``KIND_*`` map of lesions."""
    labels = lung.astype(np.uint8)  # L.LUNG == 1
    labels[kind_map == KIND_GGO] = L.GGO
    labels[kind_map >= KIND_CONSOLIDATION] = L.HIGH_OPACITY
    return labels
