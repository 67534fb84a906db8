"""The synthetic adult chest: anatomy sampled from the seed, drawn on the voxel grid
(see ``docs/phantom.md``, "What is modelled").

:func:`generate_phantom` draws body wall, ribs, spine, sternum, scapulae, clavicles and
humeral heads, the mediastinum with heart, great vessels, trachea, main bronchi and esophagus,
the upper abdomen under the diaphragm domes, two lungs with branching vessels and bronchi, a
couch and CT noise, then the lesions (:mod:`lungburden.phantom.lesions`). The anatomy is
realistic enough that a segmenter trained on it does not learn shortcuts (uniform muscle,
missing vessels), and every voxel's label is known. Lung vessels and airways inside the lungs
belong to the lung field (label 1), as in the usual lung masks; the trachea, main bronchi and
hilar vessels do not. Slices thicker than 1.25 mm are averaged from sub-slices (the partial
volume of a real reconstruction), the ground truth taken by majority vote.
Everything is deterministic per seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from lungburden import labels as L
from lungburden.phantom.lesions import (
    bbox,
    draw_lesions,
    labels_from,
    plan_lesions,
    random_burden_percent,
    upsample_linear,
)
from lungburden.phantom.spec import (
    HU_MAX,
    HU_MIN,
    KIND_CONSOLIDATION,
    KIND_EFFUSION,
    KIND_GGO,
    KIND_NONE,
    Phantom,
    PhantomSpec,
)

#: Nominal HU of air, fat, skeletal muscle and unenhanced blood.
AIR, FAT, MUSCLE, BLOOD = -1000.0, -95.0, 45.0, 40.0


@dataclass(frozen=True)
class _Grid:
    """Voxel grid in LPS mm: x along columns, y along rows, z decreasing with the slice index."""

    nz: int
    ny: int
    nx: int
    dz: float
    ps: float
    x0: float
    y0: float
    z_top: float

    @property
    def x(self) -> np.ndarray:
        return (self.x0 + self.ps * np.arange(self.nx)).astype(np.float32)

    @property
    def y(self) -> np.ndarray:
        return (self.y0 + self.ps * np.arange(self.ny)).astype(np.float32)

    @property
    def z(self) -> np.ndarray:
        return (self.z_top - self.dz * np.arange(self.nz)).astype(np.float32)

    @property
    def affine(self) -> np.ndarray:
        aff = np.zeros((4, 4))
        aff[2, 0] = -self.dz
        aff[1, 1] = self.ps
        aff[0, 2] = self.ps
        aff[:3, 3] = (self.x0, self.y0, self.z_top)
        aff[3, 3] = 1.0
        return aff

    def index(self, p: np.ndarray) -> tuple[int, int, int]:
        return (
            int(round((self.z_top - p[2]) / self.dz)),
            int(round((p[1] - self.y0) / self.ps)),
            int(round((p[0] - self.x0) / self.ps)),
        )

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index box covering the LPS box ``lo..hi`` (mm), or None if outside the grid."""
        k0 = max(int(math.floor((self.z_top - hi[2]) / self.dz)), 0)
        k1 = min(int(math.ceil((self.z_top - lo[2]) / self.dz)) + 1, self.nz)
        i0 = max(int(math.floor((lo[1] - self.y0) / self.ps)), 0)
        i1 = min(int(math.ceil((hi[1] - self.y0) / self.ps)) + 1, self.ny)
        j0 = max(int(math.floor((lo[0] - self.x0) / self.ps)), 0)
        j1 = min(int(math.ceil((hi[0] - self.x0) / self.ps)) + 1, self.nx)
        if k0 >= k1 or i0 >= i1 or j0 >= j1:
            return None
        return slice(k0, k1), slice(i0, i1), slice(j0, j1)

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (z, y, x) mm coordinates of a box."""
        return (
            self.z[box[0]][:, None, None],
            self.y[box[1]][None, :, None],
            self.x[box[2]][None, None, :],
        )


@dataclass(frozen=True)
class _Anatomy:
    """Seed-dependent anatomical parameters (mm, HU)."""

    xm: float
    cy: float
    a0: float
    b_ant: float
    b_post: float
    t_fat: float
    t_mus: float
    t_rib: float
    shoulder: float
    z_apex: float
    z_low: float
    z_arch: float
    z_car: float
    dome_r: float
    dome_l: float
    dome_depth: float
    apex_depth: float
    rv: float
    heart_c: tuple[float, float, float]
    heart_ax: tuple[float, float, float]
    heart_angle: float
    y_hil: float
    lung_hu: float
    lung_grad: float
    noise_sd: float
    rib_pitch: float
    rib_drop: float
    rib_phase: float
    rib_frac: float
    bone_hu: float
    aorta_r: float
    contrast_hu: float
    shoulder_w: float
    humerus_r: float
    #: Extra thickness (mm, at the midline) of the back: paraspinal and back muscles between the
    #: posterior ribs and the skin, over the whole scan range.
    back: float


def sample_anatomy(rng: np.random.Generator) -> _Anatomy:
    """Seed-dependent anatomy, drawn from ``rng`` (the anatomy stream of :func:`generate_phantom`)."""
    u = rng.uniform
    height = u(225, 295)
    z_apex = height / 2
    z_low = -height / 2
    dome_depth = u(45, 65)
    dome_r = z_low + 1.25 * dome_depth
    z_arch = z_apex - u(50, 70)
    heart_ax = (u(52, 68), u(42, 55), u(45, 58))
    b_ant = u(95, 122)
    an = _Anatomy(
        xm=u(-6, 6),
        cy=u(-22, -2),
        a0=u(150, 185),
        b_ant=b_ant,
        b_post=b_ant * u(0.95, 1.1),
        t_fat=u(4, 24),
        t_mus=u(8, 22),
        t_rib=u(8, 10),
        shoulder=u(14, 38),
        z_apex=z_apex,
        z_low=z_low,
        z_arch=z_arch,
        z_car=z_arch - u(18, 28),
        dome_r=dome_r,
        dome_l=dome_r - u(8, 22),
        dome_depth=dome_depth,
        apex_depth=u(70, 100),
        rv=u(16, 21),
        heart_c=(u(14, 32), u(-0.42, -0.28), dome_r + heart_ax[2] * u(0.35, 0.55)),
        heart_ax=heart_ax,
        heart_angle=math.radians(u(25, 45)),
        y_hil=u(-5, 15),
        lung_hu=u(-895, -850),
        lung_grad=u(15, 60),
        noise_sd=u(10, 25),
        rib_pitch=u(24, 30),
        rib_drop=u(70, 100),
        rib_phase=u(0, 1),
        rib_frac=u(0.24, 0.34),
        bone_hu=u(450, 800),
        aorta_r=u(13, 16),
        contrast_hu=u(230, 330),
        shoulder_w=u(0.12, 0.32),
        humerus_r=u(19, 25),
        back=0.0,
    )
    # Drawn last so that the earlier fields keep their values per seed; the body centre moves
    # forward by half the extra back so the patient stays centred in the field of view.
    back = u(10, 55)
    return replace(an, back=back, cy=an.cy - back / 2)


def _shoulder_level(an: _Anatomy, z: float) -> float:
    """0 below the shoulder girdle, rising to 1 at 20 mm above the lung apices."""
    return float(np.clip((z - (an.z_apex - 45.0)) / 65.0, 0, 1)) ** 1.5


def _layers(an: _Anatomy, z: float) -> tuple[float, float, float, float, float, float, float, float]:
    """Body outline and layer radii of one slice: a, b_ant, b_post, R and the normalised radii
    of skin inner, fat inner, muscle inner (= rib zone outer) and cavity boundaries.

    At the shoulder girdle the body widens (``shoulder_w``) while the thoracic cavity keeps its
    width: the extra width is muscle (deltoid, trapezius, pectorals) around a narrow apex. The
    layers are radii of one ellipse, so the cavity's front-to-back depth shrinks by the same
    factor (up to 1/1.32 above the apices, ~1/1.1 at the top of the lungs): thicker pectoral and
    back muscle there, and slightly flatter apices.
    """
    top = float(np.clip((z - an.z_car) / max(an.z_apex + 20 - an.z_car, 1.0), 0, 1))
    widen = 1.0 + an.shoulder_w * _shoulder_level(an, z)
    a = an.a0 * (1 + 0.05 * top)
    b_ant = an.b_ant * (1 - 0.04 * top)
    radius = (a + (b_ant + an.b_post) / 2) / 2
    t_mus = an.t_mus + an.shoulder * top
    r_skin = 1 - 2.0 / radius
    r_fat = r_skin - an.t_fat / radius
    r_mus = r_fat - t_mus / radius
    r_cav = r_mus - an.t_rib / radius
    if widen > 1.0:
        # Same skin and fat in normalised units; cavity and rib zone keep their physical width.
        r_mus, r_cav = r_cav / widen + (r_mus - r_cav) / widen, r_cav / widen
        a = a * widen
        radius = (a + (b_ant + an.b_post) / 2) / 2
    return a, b_ant, an.b_post, radius, r_skin, r_fat, r_mus, r_cav


def _rho(an: _Anatomy, a: float, b_ant: float, b_post: float, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Normalised body radius (1 on the skin) at broadcastable y, x."""
    by = np.where(y < an.cy, b_ant, b_post).astype(np.float32)
    return np.sqrt(((y - an.cy) / by) ** 2 + ((x - an.xm) / np.float32(a)) ** 2)


def _mid_cavity(an: _Anatomy) -> tuple[float, float, float]:
    """Cavity half-width, anterior and posterior cavity y at mid-chest (for z-constant parts)."""
    a, b_ant, b_post, _, _, _, _, r_cav = _layers(an, 0.0)
    return a * r_cav, an.cy - b_ant * r_cav, an.cy + b_post * r_cav


def _spine_y(an: _Anatomy) -> float:
    return _mid_cavity(an)[2] - 0.45 * an.rv


def _spine_template(an: _Anatomy, grid: _Grid, disc: bool) -> tuple[tuple[slice, slice], np.ndarray]:
    """HU template (NaN = not spine) of one vertebra level in its in-plane box."""
    ys, xm, rv = _spine_y(an), an.xm, an.rv
    lo = np.array([xm - rv - 30, ys - rv - 2, 0.0])
    hi = np.array([xm + rv + 30, ys + rv + 45, 0.0])
    i0 = max(int((lo[1] - grid.y0) / grid.ps), 0)
    i1 = min(int((hi[1] - grid.y0) / grid.ps) + 1, grid.ny)
    j0 = max(int((lo[0] - grid.x0) / grid.ps), 0)
    j1 = min(int((hi[0] - grid.x0) / grid.ps) + 1, grid.nx)
    y = grid.y[i0:i1][:, None]
    x = grid.x[j0:j1][None, :]
    out = np.full((i1 - i0, j1 - j0), np.nan, dtype=np.float32)
    r_body = np.hypot(x - xm, y - ys)
    canal_y = ys + rv + 8.0
    r_canal = np.hypot(x - xm, y - canal_y)
    bone = an.bone_hu
    arch = (r_canal < 14.0) & (y > ys + rv * 0.6)
    spinous = (((x - xm) / 5.0) ** 2 + ((y - (canal_y + 20.0)) / 13.0) ** 2) < 1
    transverse = (((np.abs(x - xm) - 24.0) / 13.0) ** 2 + ((y - (ys + rv + 6.0)) / 5.5) ** 2) < 1
    out[arch | spinous | transverse] = bone * 0.8
    out[r_canal < 8.0] = 15.0  # spinal canal (CSF / cord)
    if disc:
        out[r_body < rv] = 85.0
    else:
        out[r_body < rv] = bone
        out[r_body < rv - 2.0] = bone * 0.35 + 30  # cancellous bone
    return (slice(i0, i1), slice(j0, j1)), out


def _dome_apex_2d(an: _Anatomy, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """z of the diaphragm (lung exists above) and of the lung apex surface (below) per (y, x)."""
    half_w, y_ant, y_post = _mid_cavity(an)
    y = grid.y[:, None]
    x = grid.x[None, :]
    side = x > an.xm
    dy = y_ant + 0.42 * (y_post - y_ant)
    ry = 0.5 * (y_post - y_ant)
    dx = np.where(side, an.xm + 0.42 * half_w, an.xm - 0.42 * half_w)
    q = ((x - dx) / (0.62 * half_w)) ** 2 + ((y - dy) / ry) ** 2
    peak = np.where(side, an.dome_l, an.dome_r)
    dome = (peak - an.dome_depth * q).astype(np.float32)
    ax = np.where(side, an.xm + 0.5 * half_w, an.xm - 0.5 * half_w)
    ay = y_ant + 0.6 * (y_post - y_ant)
    qa = ((x - ax) / (0.55 * half_w)) ** 2 + ((y - ay) / (0.55 * (y_post - y_ant))) ** 2
    apex = (an.z_apex - an.apex_depth * qa**0.6).astype(np.float32)
    return dome, apex


def _organ_map(an: _Anatomy, grid: _Grid, contrast: bool) -> np.ndarray:
    """Upper-abdomen HU under the diaphragm (liver, stomach with gas, spleen, fat), per (y, x)."""
    half_w, y_ant, y_post = _mid_cavity(an)
    y = grid.y[:, None]
    x = grid.x[None, :]
    depth = y_post - y_ant
    out = np.full((grid.ny, grid.nx), -90.0, dtype=np.float32)
    liver = (x - an.xm) < 20.0 - 0.45 * (y - an.cy)
    out = np.where(liver, 105.0 if contrast else 58.0, out)
    sx, sy = an.xm + 0.62 * half_w, y_post - 0.22 * depth
    spleen = ((x - sx) / (0.22 * half_w)) ** 2 + ((y - sy) / (0.2 * depth)) ** 2 < 1
    out = np.where(spleen, 125.0 if contrast else 48.0, out)
    gx, gy = an.xm + 0.45 * half_w, y_ant + 0.35 * depth
    stomach = ((x - gx) / (0.3 * half_w)) ** 2 + ((y - gy) / (0.22 * depth)) ** 2 < 1
    out = np.where(stomach, 22.0, out)
    out = np.where(stomach & (y < gy - 0.1 * depth), AIR, out)
    return out.astype(np.float32)


def _couch(an: _Anatomy, grid: _Grid) -> np.ndarray:
    """CT couch (carbon shells around foam) under the patient, -1000 elsewhere, per (y, x)."""
    y = grid.y[:, None]
    x = grid.x[None, :]
    top = an.cy + an.b_post + an.back + 2.0 - x**2 / 1400.0
    rel = y - top
    out = np.full((grid.ny, grid.nx), AIR, dtype=np.float32)
    out = np.where((rel >= 0) & (rel < 30), -750.0, out)
    out = np.where(((rel >= 0) & (rel < 2)) | ((rel >= 28) & (rel < 30)), 250.0, out)
    return out.astype(np.float32)


def _med_halfwidth(an: _Anatomy, z: float) -> float:
    """Half-width of the upper/middle mediastinum between the lungs (0 where the heart takes over)."""
    heart_top = an.heart_c[2] + an.heart_ax[2] * 0.6
    knots_z = [heart_top - 25, heart_top - 10, an.z_car, an.z_arch + 5, an.z_apex + 30]
    knots_w = [0.0, 26.0, 33.0, 30.0, 22.0]
    return float(np.interp(z, knots_z, knots_w))


def _build_slices(an: _Anatomy, grid: _Grid, contrast: bool) -> tuple[np.ndarray, np.ndarray]:
    """HU of body wall, bones, abdomen and mediastinal fat, and the lung candidate mask."""
    hu = np.empty((grid.nz, grid.ny, grid.nx), dtype=np.float32)
    lung = np.empty(hu.shape, dtype=bool)
    x = grid.x[None, :]
    y = grid.y[:, None]
    dome, apex = _dome_apex_2d(an, grid)
    organs = _organ_map(an, grid, contrast)
    couch = _couch(an, grid)
    spine_box, vertebra = _spine_template(an, grid, disc=False)
    _, disc = _spine_template(an, grid, disc=True)
    ys = _spine_y(an)
    band = max(3.0, 1.6 * grid.ps)
    excl = (np.abs(x - an.xm) < band) | (np.hypot(x - an.xm, y - ys) < an.rv + 4.0)
    excl = excl | ((np.abs(x - an.xm) < an.rv + 4.0) & (y > ys))
    xr = np.abs(grid.x - an.xm)
    sternum_lo, sternum_hi = an.dome_r - 10.0, an.z_arch + 25.0
    for k, z in enumerate(grid.z.tolist()):
        a, b_ant, b_post, radius, r_skin, r_fat, r_mus, r_cav = _layers(an, z)
        rho = _rho(an, a, b_ant, b_post, y, x)
        eps = 0.6 * grid.ps / radius
        xp = [0.0, r_cav - eps, r_cav + eps, r_fat - eps, r_fat + eps, r_skin - eps, r_skin + eps, 1 - eps, 1 + eps]
        fp = [FAT, FAT, MUSCLE, MUSCLE, -100.0, -100.0, 30.0, 30.0, AIR]
        # Skin and fat follow the body outline, which reaches ``back`` mm further behind; the
        # cavity and the rib zone keep their place (rho): what lies between is back muscle.
        rho_body = _rho(an, a, b_ant, b_post + an.back, y, x)
        sl = np.interp(rho_body.ravel(), xp, fp).astype(np.float32).reshape(rho.shape)
        sl[(rho >= r_cav + eps) & (rho_body < r_fat - eps)] = MUSCLE
        _back_fat_planes(sl, an, rho, rho_body, r_mus, r_fat, eps, y)
        np.maximum(sl, couch, out=sl)
        # Ribs and costal cartilage in the rib zone, sloping down from back to front.
        ring = np.flatnonzero(((rho >= r_cav) & (rho < r_mus)).ravel())
        ri, rj = np.divmod(ring, grid.nx)
        alpha = np.abs(np.arctan2(grid.x[rj] - an.xm, grid.y[ri] - an.cy)) / np.pi
        phase = (z + an.rib_drop * alpha) / an.rib_pitch + an.rib_phase
        rib = ((phase - np.floor(phase)) < an.rib_frac) & (alpha > 0.1) & (z < an.z_apex + 5.0)
        sl.ravel()[ring[rib]] = np.where(alpha[rib] > 0.85, 160.0, an.bone_hu)
        level = _shoulder_level(an, z)
        if z > an.z_apex:
            # Root of the neck above the apices: muscle around the airway, not mediastinal fat.
            neck = (rho < r_cav) & (sl < MUSCLE)
            sl[neck] = np.float32(FAT + (MUSCLE - FAT) * min((z - an.z_apex) / 25.0, 1.0))
        if level > 0.25:
            _paint_humeral_heads(sl, an, x, y, z, a)
        if z > an.z_apex + 5.0:
            # Supraclavicular fossae: air between the neck and the shoulders, deepening upwards.
            s = min((z - an.z_apex - 5.0) / 40.0, 1.0)
            for sign in (-1.0, 1.0):
                fx, fy = an.xm + sign * 0.55 * a, an.cy - b_ant
                rx, ry = 0.22 * a * (0.5 + s), b_ant * (0.15 + 0.45 * s)
                sl[((x - fx) / rx) ** 2 + ((y - fy) / ry) ** 2 < 1] = AIR
        # Scapulae in the upper chest, in the posterior muscle layer.
        if an.z_car - 30 < z < an.z_apex + 35:
            mid = r_mus + (r_fat - r_mus) * np.array([0.3, 0.6])
            plate = (rho > mid[0]) & (rho < mid[1]) & (y - an.cy > 0.3 * b_post)
            plate &= (xr[None, :] > 0.3 * a) & (xr[None, :] < 0.78 * a)
            sl[plate] = an.bone_hu * 0.8
        cav = rho < r_cav
        below = cav & (z <= dome)
        np.copyto(sl, organs, where=below)
        sub = sl[spine_box]
        tmpl = disc if (z % 30.0) < 6.0 else vertebra
        np.copyto(sub, tmpl, where=~np.isnan(tmpl))
        if sternum_lo < z < sternum_hi:
            y_ant = an.cy - b_ant * r_cav
            st = ((x - an.xm) / 15.0) ** 2 + ((y - (y_ant - 3.0)) / 6.0) ** 2
            sl[st < 1] = an.bone_hu * 0.55
            sl[st < 0.45] = 180.0
        hu[k] = sl
        lk = (rho < r_cav - 1.0 / radius) & (z > dome) & (z < apex) & ~excl
        w = _med_halfwidth(an, z)
        if w > 0:
            y_ant = an.cy - b_ant * r_cav
            yc, ry = (y_ant + ys) / 2, (ys - y_ant) / 2 + 2.0
            lk &= ((x - an.xm) / w) ** 2 + ((y - yc) / ry) ** 2 >= 1
        lung[k] = lk
    return hu, lung


def _back_fat_planes(
    sl: np.ndarray, an: _Anatomy, rho: np.ndarray, rho_body: np.ndarray, r_mus: float, r_fat: float,
    eps: float, y: np.ndarray,
) -> None:
    """Thin fat planes of the back: between the superficial (trapezius, latissimus) and the deep
    (erector spinae) muscle layers, where the back is thick enough to have both."""
    if an.back < 12.0:
        return
    posterior = (y - an.cy) > 0
    deep = rho >= r_mus
    # The plane sits at 55 % of the way from the ribs' outer edge to the subcutaneous fat.
    plane = np.abs(rho_body - (r_mus + 0.55 * (r_fat - r_mus))) < eps
    sl[plane & deep & posterior & (rho_body < r_fat - eps)] = -80.0


def _muscle_texture(hu: np.ndarray, grid: _Grid, rng: np.random.Generator) -> None:
    """Texture of the skeletal muscle (voxels at exactly ``MUSCLE``): slow HU variation (SD
    6-15 HU) and a network of thin intermuscular fat planes (where a smooth random field crosses
    zero), as real shoulder, back and chest-wall muscle shows; a uniform muscle would teach a
    network that any textured soft tissue is consolidation."""
    muscle = hu == np.float32(MUSCLE)
    if not muscle.any():
        return
    spacing = np.array([grid.dz, grid.ps, grid.ps])
    factors = tuple(int(max(1, round(3.0 / d))) for d in spacing)
    coarse = tuple(-(-n // f) for n, f in zip(hu.shape, factors, strict=True))
    cspacing = spacing * np.array(factors)

    def random_field(sigma_mm: float) -> np.ndarray:
        noise = rng.standard_normal(coarse, dtype=np.float32)
        smooth = ndimage.gaussian_filter(noise, sigma=tuple(float(v) for v in sigma_mm / cspacing), mode="wrap")
        smooth /= max(float(smooth.std()), 1e-6)
        return upsample_linear(smooth, factors, hu.shape)

    where = np.nonzero(muscle)
    del muscle
    level = random_field(10.0)[where]
    planes = np.abs(random_field(float(rng.uniform(7.0, 14.0)))[where]) < np.float32(rng.uniform(0.06, 0.14))
    values = np.float32(MUSCLE) + np.float32(rng.uniform(6.0, 15.0)) * level
    values[planes] = np.float32(FAT + 10.0)
    hu[where] = values


def _paint_humeral_heads(sl: np.ndarray, an: _Anatomy, x: np.ndarray, y: np.ndarray, z: float, a: float) -> None:
    """Humeral heads (cortex and cancellous bone) in the lateral shoulder muscle of one slice."""
    zc = an.z_apex - 5.0
    r2 = an.humerus_r**2 - (0.8 * (z - zc)) ** 2
    if r2 <= 16.0:
        return
    r = math.sqrt(r2)
    for sign in (-1.0, 1.0):
        cx = an.xm + sign * (a - an.humerus_r - an.t_fat - 10.0)
        d = np.hypot(x - cx, y - (an.cy + 0.15 * an.b_post))
        sl[d < r] = an.bone_hu
        sl[d < r - 3.0] = np.float32(0.3 * an.bone_hu + 60.0)


def _clavicles(an: _Anatomy) -> list[_Tube]:
    """Clavicles from the sternal notch to the acromion (bone tubes at the shoulder girdle)."""
    a_top = _layers(an, an.z_apex + 20.0)[0]
    y_ant = an.cy - an.b_ant * 0.86
    return [
        _Tube(((an.xm + s * 18.0, y_ant + 10.0, an.z_apex - 12.0),
               (an.xm + s * 0.45 * a_top, y_ant + 4.0, an.z_apex - 2.0),
               (an.xm + s * 0.72 * a_top, an.cy - 0.1 * an.b_post, an.z_apex + 10.0)),
              (7.0, 6.5, 6.0), 0.75 * an.bone_hu, 2.0)
        for s in (-1.0, 1.0)
    ]


def _cavity_box(an: _Anatomy, grid: _Grid, box: tuple[slice, slice, slice]) -> np.ndarray:
    """Thoracic/abdominal cavity (inside the rib zone) within an index box."""
    _, y, x = grid.coords(box)
    out = np.empty((box[0].stop - box[0].start, y.shape[1], x.shape[2]), dtype=bool)
    for n, z in enumerate(grid.z[box[0]].tolist()):
        a, b_ant, b_post, *_, r_cav = _layers(an, z)
        out[n] = _rho(an, a, b_ant, b_post, y[0], x[0]) < r_cav
    return out


def _segment_distance(
    grid: _Grid, box: tuple[slice, slice, slice], a: np.ndarray, b: np.ndarray, slab: bool = False
) -> np.ndarray:
    """Distance (mm) of the voxels of ``box`` to the segment ``a``-``b``.

    With ``slab`` the axial distance is reduced by a quarter of the slice spacing, a cheap
    partial-volume model that keeps thin vessels visible in thick slices.
    """
    z, y, x = grid.coords(box)
    ab = (b - a).astype(np.float32)
    den = max(float(ab @ ab), 1e-6)
    t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / np.float32(den)
    np.clip(t, 0, 1, out=t)
    d2 = (x - a[0] - t * ab[0]) ** 2
    d2 += (y - a[1] - t * ab[1]) ** 2
    dz = np.abs(z - a[2] - t * ab[2])
    if slab:
        dz = np.maximum(dz - np.float32(grid.dz / 4), 0)
    d2 += dz**2
    return np.sqrt(d2, out=d2)


@dataclass(frozen=True)
class _Tube:
    points: tuple[tuple[float, float, float], ...]
    radii: tuple[float, ...]
    value: float
    margin: float  # lung-free margin around the tube (mm)


def _draw_tube(hu: np.ndarray, lung: np.ndarray, grid: _Grid, tube: _Tube) -> None:
    """Paint a polyline tube (soft edge) and clear the lung around it."""
    pts = np.asarray(tube.points, dtype=np.float32)
    reach = max(tube.radii) + tube.margin + 2 * grid.ps
    box = grid.box(pts.min(0) - reach, pts.max(0) + reach)
    if box is None:
        return
    sd = np.full(tuple(s.stop - s.start for s in box), np.inf, dtype=np.float32)
    for n in range(len(pts) - 1):
        r = 0.5 * (tube.radii[n] + tube.radii[n + 1])
        seg = grid.box(np.minimum(pts[n], pts[n + 1]) - reach, np.maximum(pts[n], pts[n + 1]) + reach)
        if seg is None:
            continue
        rel = tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(seg, box, strict=True))
        np.minimum(sd[rel], _segment_distance(grid, seg, pts[n], pts[n + 1]) - np.float32(r), out=sd[rel])
    occ = np.clip(0.5 - sd / np.float32(grid.ps), 0, 1)
    sub = hu[box]
    sub += occ * (np.float32(tube.value) - sub)
    lung[box] &= sd >= tube.margin


def _heart_center(an: _Anatomy) -> np.ndarray:
    return np.array([an.xm + an.heart_c[0], an.cy + an.heart_c[1] * an.b_ant, an.heart_c[2]])


def _draw_heart(hu: np.ndarray, lung: np.ndarray, an: _Anatomy, grid: _Grid, contrast: bool) -> None:
    """Rotated ellipsoid heart: myocardium, chambers (enhanced with contrast), epicardial fat."""
    c = _heart_center(an)
    ax, ay, az = an.heart_ax
    reach = max(ax, ay) + 10.0
    box = grid.box(c - np.array([reach, reach, az + 10]), c + np.array([reach, reach, az + 10]))
    if box is None:
        return
    z, y, x = grid.coords(box)
    cs, sn = math.cos(an.heart_angle), math.sin(an.heart_angle)
    u = (x - c[0]) * cs - (y - c[1]) * sn
    v = (x - c[0]) * sn + (y - c[1]) * cs
    q = (u / ax) ** 2 + (v / ay) ** 2 + ((z - c[2]) / az) ** 2
    r = np.sqrt(q)
    mean_ax = (ax + ay + az) / 3
    myo = 110.0 if contrast else 46.0
    if contrast:
        chamber = np.where(v > 0, an.contrast_hu, 0.85 * an.contrast_hu).astype(np.float32)
        chamber = np.where(np.abs(v) < 4.0, myo, chamber)
    else:
        chamber = np.float32(BLOOD)
    val = np.where(r < 1 - 10.0 / mean_ax, chamber, np.float32(myo))
    occ = np.clip((1 - r) * np.float32(mean_ax / grid.ps) + 0.5, 0, 1) * _cavity_box(an, grid, box)
    sub = hu[box]
    sub += occ * (val - sub)
    lung[box] &= r >= 1 + 6.0 / mean_ax


def _mediastinal_tubes(an: _Anatomy, grid: _Grid, contrast: bool) -> list[_Tube]:
    """Great vessels, trachea and main bronchi, esophagus (painted in this order)."""
    xm, ys, rv, ra = an.xm, _spine_y(an), an.rv, an.aorta_r
    h = _heart_center(an)
    ax, ay, az = an.heart_ax
    top = float(grid.z[0]) + 20.0
    bottom = min(float(grid.z[-1]), an.z_low) - 40.0
    y_ant = _mid_cavity(an)[1]
    y_hil = an.cy + an.y_hil
    cval = an.contrast_hu if contrast else BLOOD

    def blood(f: float) -> float:
        return min(cval * f, 600.0) if contrast else BLOOD

    y_tr = ys - rv - 24.0
    root_r = (xm - 36.0, y_hil, an.z_car - 22.0)
    root_l = (xm + 36.0, y_hil, an.z_car - 12.0)
    br_r = (xm - 33.0, y_hil + 10.0, an.z_car - 20.0)
    br_l = (xm + 33.0, y_hil + 10.0, an.z_car - 32.0)
    carina = (xm, y_tr + 2.0, an.z_car)
    tubes = [
        _Tube(
            (
                (h[0] - 0.25 * ax, h[1] + 0.1 * ay, h[2] + 0.3 * az),
                (xm - 6.0, y_ant + 0.3 * (ys - y_ant), an.z_arch - 30.0),
                (xm + 2.0, y_ant + 0.35 * (ys - y_ant), an.z_arch + 2.0),
                (xm + 24.0, y_tr + 6.0, an.z_arch),
                (xm + rv + 10.0, ys - 0.5 * rv, an.z_arch - 25.0),
                (xm + rv + 8.0, ys - 0.6 * rv, bottom),
            ),
            (ra, ra, 0.92 * ra, 0.85 * ra, 0.8 * ra, 0.75 * ra),
            cval,
            3.0,
        ),
        _Tube(  # brachiocephalic trunk and left subclavian artery
            ((xm - 2.0, y_ant + 0.35 * (ys - y_ant), an.z_arch + 5), (xm - 16.0, y_tr - 8.0, top)),
            (7.0, 6.0),
            cval,
            2.0,
        ),
        _Tube(((xm + 22.0, y_tr + 4.0, an.z_arch + 3), (xm + 24.0, y_tr + 6.0, top)), (5.0, 5.0), cval, 2.0),
        _Tube(  # pulmonary trunk and arteries
            (
                (h[0] + 0.1 * ax, h[1] - 0.3 * ay, h[2] + 0.4 * az),
                (xm + 14.0, y_ant + 0.25 * (ys - y_ant), an.z_car - 18.0),
                (xm + 4.0, y_hil - 4.0, an.z_car - 20.0),
                root_r,
            ),
            (13.0, 12.0, 10.0, 8.0),
            blood(1.1),
            3.0,
        ),
        _Tube(((xm + 14.0, y_ant + 0.25 * (ys - y_ant), an.z_car - 18.0), root_l), (11.0, 8.0), blood(1.1), 3.0),
        _Tube(  # superior and inferior vena cava
            ((xm - 24.0, y_ant + 0.3 * (ys - y_ant), top), (xm - 22.0, h[1], h[2] + 0.45 * az)),
            (9.0, 10.0),
            blood(1.5),
            3.0,
        ),
        _Tube(
            ((xm - 14.0, ys - rv - 14.0, bottom), (xm - 14.0, h[1] + 0.3 * ay, h[2] - 0.3 * az)),
            (11.0, 12.0),
            blood(0.6),
            3.0,
        ),
        _Tube(  # esophagus with a little luminal air
            ((xm + 9.0, ys - rv - 7.0, top), (xm + 14.0, ys - rv - 5.0, an.dome_l - 25.0)), (7.0, 7.0), 40.0, 3.0
        ),
        _Tube(((xm + 9.0, ys - rv - 7.0, top), (xm + 14.0, ys - rv - 5.0, an.dome_l - 25.0)), (1.8, 1.8), -900.0, 3.0),
    ]
    for r_out, r_in, path in (
        (10.5, 8.5, ((xm, y_tr, top), carina)),
        (8.0, 6.0, (carina, br_r)),
        (7.0, 5.0, (carina, br_l)),
    ):
        tubes.append(_Tube(path, (r_out, r_out), 30.0, 2.0))
        tubes.append(_Tube(path, (r_in, r_in), AIR, 2.0))
    return tubes


def _tree_roots(an: _Anatomy) -> dict[str, list[tuple[tuple[float, float, float], tuple[float, float, float]]]]:
    """Hilar roots and lobar directions (x sign is per side) of arteries, veins."""
    y_hil = an.cy + an.y_hil
    return {
        "artery": [
            ((36.0, y_hil, an.z_car - 22.0), (0.45, -0.1, 0.88)),
            ((36.0, y_hil, an.z_car - 22.0), (0.8, -0.55, -0.2)),
            ((36.0, y_hil, an.z_car - 22.0), (0.45, 0.45, -0.75)),
            ((36.0, y_hil, an.z_car - 22.0), (0.6, 0.75, -0.1)),
        ],
        "vein": [
            ((30.0, y_hil + 14.0, an.z_car - 48.0), (0.7, -0.4, 0.5)),
            ((30.0, y_hil + 14.0, an.z_car - 48.0), (0.6, 0.3, -0.75)),
            ((30.0, y_hil + 14.0, an.z_car - 48.0), (0.8, -0.5, -0.3)),
        ],
    }


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _grow_tree(
    rng: np.random.Generator,
    inside: np.ndarray,
    grid: _Grid,
    root: np.ndarray,
    directions: list[np.ndarray],
    r0: float,
    r_min: float,
    max_segments: int,
) -> list[tuple[np.ndarray, np.ndarray, float, int]]:
    """Random branching tree inside ``inside`` (bool grid): list of (start, end, radius, generation)."""
    from collections import deque

    def ok(p: np.ndarray) -> bool:
        k, i, j = grid.index(p)
        return 0 <= k < grid.nz and 0 <= i < grid.ny and 0 <= j < grid.nx and bool(inside[k, i, j])

    segs: list[tuple[np.ndarray, np.ndarray, float, int]] = []
    queue = deque((root, _unit(d), r0, 0) for d in directions)
    while queue and len(segs) < max_segments:
        p, d, r, g = queue.popleft()
        length = float(np.clip(r * rng.uniform(5, 8), 5, 30))
        end = None
        for _ in range(4 if g == 0 else 2):
            e = p + d * length
            if ok(e):
                end = e
                break
            if g == 0:
                d = _unit(d + rng.normal(0, 0.35, 3))
            else:
                length *= 0.5
        if end is None:
            continue
        segs.append((p, end, r, g))
        out = _unit(end - root)
        perp = _unit(np.cross(d, rng.normal(0, 1, 3)))
        for sign in (1.0, -1.0):
            r_child = r * rng.uniform(0.7, 0.85)
            if r_child < r_min:
                continue
            th = math.radians(rng.uniform(20, 45))
            nd = _unit(math.cos(th) * d + sign * math.sin(th) * perp + 0.3 * out)
            queue.append((end, nd, r_child, g + 1))
    return segs


def _paint_segment(
    hu: np.ndarray, lung: np.ndarray, grid: _Grid, a: np.ndarray, b: np.ndarray, r: float, value: float
) -> None:
    """Blend a soft-edged vessel/airway segment into ``hu``, inside the lung only."""
    reach = r + grid.ps + grid.dz / 4
    box = grid.box(np.minimum(a, b) - reach, np.maximum(a, b) + reach)
    if box is None:
        return
    d = _segment_distance(grid, box, a, b, slab=True)
    occ = np.clip((np.float32(r) - d) / np.float32(grid.ps) + 0.5, 0, 1)
    occ *= lung[box]
    sub = hu[box]
    sub += occ * (np.float32(value) - sub)


def _splat_segments(
    hu: np.ndarray, lung: np.ndarray, grid: _Grid, a: np.ndarray, b: np.ndarray, r: np.ndarray, value: float
) -> None:
    """Draw many thin vessels at once: points along each segment, splatted bilinearly in-plane
    into their nearest slice (through-plane vessels become dots), blended inside the lung."""
    if len(a) == 0:
        return
    step = 0.5 * grid.ps
    length = np.linalg.norm(b - a, axis=1)
    n = np.maximum(np.ceil(length / step).astype(np.intp), 1) + 1
    seg = np.repeat(np.arange(len(a)), n)
    start = np.repeat(np.cumsum(n) - n, n)
    t = ((np.arange(seg.size) - start) / np.repeat(n - 1, n))[:, None]
    p = a[seg] + t * (b - a)[seg]
    k = np.rint((grid.z_top - p[:, 2]) / grid.dz).astype(np.intp)
    fi = (p[:, 1] - grid.y0) / grid.ps
    fj = (p[:, 0] - grid.x0) / grid.ps
    i0 = np.floor(fi).astype(np.intp)
    j0 = np.floor(fj).astype(np.intp)
    wi, wj = fi - i0, fj - j0
    # Partial volume: a segment of radius r fills pi r^2 / (slice thickness * pixel) pixels
    # per pixel of length, whatever its orientation.
    gain = (np.pi * r**2 / (grid.dz * grid.ps) * step / grid.ps)[seg]
    idx, wts = [], []
    for di, dj, w in ((0, 0, (1 - wi) * (1 - wj)), (1, 0, wi * (1 - wj)), (0, 1, (1 - wi) * wj), (1, 1, wi * wj)):
        ii, jj = i0 + di, j0 + dj
        ok = (k >= 0) & (k < grid.nz) & (ii >= 0) & (ii < grid.ny) & (jj >= 0) & (jj < grid.nx)
        idx.append(((k * grid.ny + ii) * grid.nx + jj)[ok])
        wts.append((w * gain)[ok])
    flat_idx = np.concatenate(idx)
    if flat_idx.size == 0:
        return
    uniq, inv = np.unique(flat_idx, return_inverse=True)
    occ = np.minimum(np.bincount(inv, weights=np.concatenate(wts)), 1.0).astype(np.float32)
    occ *= lung.ravel()[uniq]
    flat_hu = hu.ravel()
    cur = flat_hu[uniq]
    flat_hu[uniq] = cur + occ * (np.float32(value) - cur)


def _draw_lung_trees(
    hu: np.ndarray,
    lung: np.ndarray,
    left: np.ndarray,
    an: _Anatomy,
    grid: _Grid,
    rng: np.random.Generator,
    contrast: bool,
) -> None:
    """Pulmonary arteries with their bronchi and pulmonary veins (branching trees from the
    hila down to ~1.6 mm radius), plus scattered thin peripheral vessels."""
    art = min(an.contrast_hu * 0.9, 600.0) if contrast else BLOOD
    vein = min(an.contrast_hu * 0.7, 600.0) if contrast else BLOOD
    roots = _tree_roots(an)
    walls: list[tuple[np.ndarray, np.ndarray, float]] = []
    lumens: list[tuple[np.ndarray, np.ndarray, float]] = []
    flat = np.flatnonzero(lung)
    voxel_ml = grid.dz * grid.ps * grid.ps / 1000.0
    is_left_voxel = grid.x[flat % grid.nx] > an.xm
    for sx, mask, side_voxels in ((1.0, left, flat[is_left_voxel]), (-1.0, lung & ~left, flat[~is_left_voxel])):
        hilum = None
        for kind, value, r0, max_segments in (("artery", art, 5.0, 150), ("vein", vein, 4.5, 90)):
            specs = roots[kind]
            root = np.array([an.xm + sx * specs[0][0][0], specs[0][0][1], specs[0][0][2]])
            hilum = root if hilum is None else hilum
            dirs = [np.array([sx * d[0], d[1], d[2]]) for _, d in specs]
            for a, b, r, g in _grow_tree(rng, mask, grid, root, dirs, r0, 1.6, max_segments):
                _paint_segment(hu, lung, grid, a, b, r, value)
                if kind == "artery" and g <= 3 and r >= 1.6:
                    rb = 0.75 * r
                    wall = max(0.8, 0.2 * rb)
                    off = _unit(np.cross(b - a, np.array([0.3, 0.2, 1.0]))) * (r + rb + wall + 0.5)
                    walls.append((a + off, b + off, rb + wall))
                    lumens.append((a + off, b + off, rb))
        # Thin peripheral vessels: short segments scattered through the lung, pointing away
        # from the hilum (about 0.6 per mL).
        count = int(0.6 * side_voxels.size * voxel_ml)
        if count == 0:
            continue
        pick = side_voxels[rng.integers(0, side_voxels.size, count)]
        k, rem = np.divmod(pick, grid.ny * grid.nx)
        i, j = np.divmod(rem, grid.nx)
        centre = np.stack([grid.x[j], grid.y[i], grid.z[k]], axis=1).astype(np.float64)
        centre += rng.uniform(-0.5, 0.5, (count, 3)) * np.array([grid.ps, grid.ps, grid.dz])
        radial = centre - hilum
        dist = np.linalg.norm(radial, axis=1, keepdims=True)
        direction = radial / np.maximum(dist, 1e-6) + rng.normal(0, 0.45, (count, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        half = rng.uniform(2.0, 6.0, (count, 1))
        radius = rng.uniform(0.6, 1.5, count) * np.clip(1.4 - dist[:, 0] / 150.0, 0.6, 1.3)
        is_art = rng.random(count) < 0.5
        for sel, value in ((is_art, art), (~is_art, vein)):
            _splat_segments(
                hu,
                lung,
                grid,
                centre[sel] - half[sel] * direction[sel],
                centre[sel] + half[sel] * direction[sel],
                radius[sel],
                value,
            )
    for a, b, r in walls:
        _paint_segment(hu, lung, grid, a, b, r, 20.0)
    for a, b, r in lumens:
        _paint_segment(hu, lung, grid, a, b, r, AIR)


def _keep_main_lungs(lung: np.ndarray, left_side: np.ndarray) -> np.ndarray:
    """Keep the largest 6-connected component on each side of the midline (so that the
    component-based left/right split of quantify.py agrees with the phantom's own sides);
    return the removed voxels. Components never straddle the midline (mediastinal band)."""
    removed = np.zeros_like(lung)
    if not lung.any():
        return removed
    box = bbox(lung)
    sub = lung[box]
    comps, count = ndimage.label(sub)
    sizes = np.bincount(comps.ravel(), minlength=count + 1)
    left_sizes = np.bincount(comps[left_side[box]].ravel(), minlength=count + 1)
    ids = np.arange(count + 1)
    keep = []
    for on_left in (True, False):
        cand = ids[(ids > 0) & ((left_sizes * 2 > sizes) == on_left)]
        if cand.size:
            keep.append(int(cand[np.argmax(sizes[cand])]))
    if len(keep) < count:
        kept = np.isin(comps, keep)
        removed[box] = sub & ~kept
        lung[box] = kept
    return removed


def _add_noise(hu: np.ndarray, sd: float, rng: np.random.Generator) -> None:
    """Add slightly correlated Gaussian noise (a few shifted tiles, cheaper than one per voxel)."""
    if sd <= 0:
        return
    nz, ny, nx = hu.shape
    tiles = rng.standard_normal((min(nz, 6), ny, nx), dtype=np.float32)
    sm = tiles.copy()
    sm[:, 1:] += 0.5 * tiles[:, :-1]
    sm[:, :-1] += 0.5 * tiles[:, 1:]
    tiles = sm.copy()
    tiles[:, :, 1:] += 0.5 * sm[:, :, :-1]
    tiles[:, :, :-1] += 0.5 * sm[:, :, 1:]
    tiles *= np.float32(sd / float(tiles.std()))
    picks = rng.integers(0, tiles.shape[0], nz)
    shifts = rng.integers(0, [ny, nx], size=(nz, 2))
    flips = rng.integers(0, 2, size=(nz, 2))
    for k in range(nz):
        t = tiles[picks[k]]
        if flips[k, 0]:
            t = t[::-1]
        if flips[k, 1]:
            t = t[:, ::-1]
        hu[k] += np.roll(t, tuple(int(s) for s in shifts[k]), axis=(0, 1))


def make_grid(spec: PhantomSpec, an: _Anatomy) -> _Grid:
    """The output grid of ``spec``: slices centred on the range from 25 mm below the lowest
    diaphragm to ``spec.neck_mm`` above the apices; in-plane centred on x = y = 0 mm."""
    ps = spec.pixel_spacing
    dz = float(f"{spec.slice_spacing_mm:.6g}")
    z_c = (an.z_apex + spec.neck_mm + an.z_low - 25.0) / 2
    z_top = round(z_c + (spec.slices - 1) / 2 * dz, 2)
    return _Grid(
        nz=spec.slices,
        ny=spec.rows,
        nx=spec.cols,
        dz=dz,
        ps=ps,
        x0=round(-(spec.cols - 1) / 2 * ps, 4),
        y0=round(-(spec.rows - 1) / 2 * ps, 4),
        z_top=z_top,
    )


def generate_phantom(spec: PhantomSpec) -> Phantom:
    """Generate a synthetic chest CT with lesions (see :class:`Phantom`); deterministic per spec."""
    # spawn(5) gives the same first four streams as spawn(4) did: adding one kept the others.
    rng_anat, rng_tree, rng_les, rng_noise, rng_texture = (
        np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(5)
    )
    an = sample_anatomy(rng_anat)
    out_grid = make_grid(spec, an)
    sub = slice_subsamples(out_grid.dz)
    grid = subslice_grid(out_grid, sub)
    hu, lung = _build_slices(an, grid, spec.contrast)
    _muscle_texture(hu, grid, rng_texture)
    _draw_heart(hu, lung, an, grid, spec.contrast)
    for tube in _mediastinal_tubes(an, grid, spec.contrast) + _clavicles(an):
        _draw_tube(hu, lung, grid, tube)
    left_of_midline = (grid.x > an.xm)[None, None, :]  # the patient's left (LPS +x)
    left_side = np.broadcast_to(left_of_midline, lung.shape)
    removed = _keep_main_lungs(lung, left_side)
    hu[removed] = FAT
    # Aerated lung: denser towards the dependent (posterior) part.
    y = grid.y
    y_ant, y_post = _mid_cavity(an)[1:]
    lung_val = an.lung_hu + an.lung_grad * np.clip((y - y_ant) / (y_post - y_ant), 0, 1)
    lung_val = np.broadcast_to(lung_val.astype(np.float32)[:, None], (grid.ny, grid.nx))
    for k in range(grid.nz):
        np.copyto(hu[k], lung_val, where=lung[k])
    left = lung & left_side
    _draw_lung_trees(hu, lung, left, an, grid, rng_tree, spec.contrast)
    burden = random_burden_percent(rng_les) if spec.burden_percent is None else float(spec.burden_percent)
    plan = plan_lesions(rng_les, burden, spec.lesion_kinds)
    kinds = draw_lesions(hu, lung, grid.affine, rng_les, plan, left=left, noise_sd=0.0)
    labels = labels_from(lung, kinds)
    if sub > 1:
        hu, labels, left, kinds = thick_slices(hu, labels, left, kinds, sub)
        # The majority vote can leave lung islands of a few voxels: one component per lung again.
        field = labels > 0
        removed = _keep_main_lungs(field, np.broadcast_to(left_of_midline, field.shape))
        labels[removed] = L.BACKGROUND
        kinds[removed] = KIND_NONE
        left &= field
    _add_noise(hu, an.noise_sd * spec.noise_scale, rng_noise)
    np.rint(hu, out=hu)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    return Phantom(
        spec=spec,
        hu=hu.astype(np.int16),
        labels=labels,
        affine=out_grid.affine,
        left_lung=left,
        lesion_kinds=kinds,
        burden_target_percent=100.0 * plan.total,
    )


#: Sub-slice spacing (mm) below which slices are generated directly; thicker ones average
#: ceil(thickness / SUBSLICE_MM) sub-slices, at most 4 (so 2.5 mm apart at 10 mm).
SUBSLICE_MM = 1.25


def slice_subsamples(slice_spacing_mm: float) -> int:
    """Sub-slices averaged per output slice: 1 up to 1.25 mm, then ceil(spacing / 1.25), at most 4."""
    return int(min(4, max(1, math.ceil(slice_spacing_mm / SUBSLICE_MM - 1e-6))))


def subslice_grid(grid: _Grid, sub: int) -> _Grid:
    """The grid of ``sub`` equally spaced sub-slices per slice of ``grid``, centred on each slice."""
    if sub == 1:
        return grid
    dz = grid.dz / sub
    return replace(grid, nz=grid.nz * sub, dz=dz, z_top=grid.z_top + grid.dz / 2 - dz / 2)


def _majority(values: np.ndarray, sub: int, classes: int) -> np.ndarray:
    """Most frequent value of each group of ``sub`` consecutive slices; a tie goes to the value of
    the group's central sub-slice (one of the tied values), so that neither class gains volume."""
    groups = values.reshape(values.shape[0] // sub, sub, *values.shape[1:])
    shape = groups.shape[:1] + groups.shape[2:]
    out = np.zeros(shape, values.dtype)
    top = np.zeros(shape, np.uint8)
    tied = np.zeros(shape, bool)
    for c in range(classes):  # uint8 counts, one class at a time (memory: a few output-sized maps)
        count = (groups == c).sum(axis=1, dtype=np.uint8)
        more = count > top
        tied &= ~more
        tied |= (count == top) & (count > 0)
        out[more] = c
        np.maximum(top, count, out=top)
    out[tied] = groups[:, sub // 2][tied]
    return out


def thick_slices(
    hu: np.ndarray, labels: np.ndarray, left: np.ndarray, kinds: np.ndarray, sub: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reconstructed thick slices from ``sub`` sub-slices each: HU averaged (the partial-volume
    effect of a real reconstruction: the diaphragm dome or a vessel cut obliquely gives
    intermediate densities that are not opacities), ground truth by majority of the sub-voxels."""
    nz = hu.shape[0] // sub
    thick = hu.reshape(nz, sub, *hu.shape[1:]).mean(axis=1, dtype=np.float32)
    out_labels = _majority(labels, sub, 4)
    field = out_labels > 0
    groups_left = left.reshape(nz, sub, *left.shape[1:])
    groups_field = (labels > 0).reshape(groups_left.shape)
    out_left = field & (2 * np.count_nonzero(groups_left, axis=1) >= np.count_nonzero(groups_field, axis=1))
    out_kinds = _majority(kinds, sub, KIND_EFFUSION + 1)
    # Kinds agree with the labels (GGO exactly where label GGO; consolidation or effusion under
    # high opacity, consolidation where the sub-voxels' majority kind was not one of them).
    out_kinds[out_labels < L.GGO] = KIND_NONE
    out_kinds[out_labels == L.GGO] = KIND_GGO
    out_kinds[(out_labels == L.HIGH_OPACITY) & (out_kinds < KIND_CONSOLIDATION)] = KIND_CONSOLIDATION
    return thick, out_labels, out_left, out_kinds
