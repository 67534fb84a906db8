"""The network segmenter (``convlstm``): CT volume → label map on the source grid, fast on CPU.

``ConvLSTMSegmenter.segment(volume)``: preprocessing (section 2.4, :mod:`.preprocess`) → network →
logits upsampled into the crop box → argmax → ``uint8`` labels (:mod:`lungburden.labels`) →
label finishing (:mod:`.postprocess`: GGO margins by attenuation, component rules; then the
checkpoint's learned high-opacity component filter, :mod:`.component_filter`).

Fast path (default) for the ConvLSTM network, exploiting that windows of neighbouring targets
overlap in 10 of their 11 slices:

1. each slice is encoded once (stem, dense block, and the input half ``W_x * x_t + b`` of the
   ConvLSTM gate convolution), in chunks of ``encode_chunk`` slices, keeping only the last
   ``2·context`` encoded slices between chunks (so memory does not grow with the series);
2. the recurrence runs for ``target_chunk`` windows at once: step ``t`` of every window is a view
   of the per-slice gates (no copy) plus one batched ``W_h * h`` convolution;
3. heads, fusion and upsampling run once per target; logits are turned into labels (cleared
   outside the body, GGO margins refined) a chunk at a time on a helper thread while the network computes the next
   chunk, so the only full-size arrays are the input HU volume and the output labels.

``naive=True`` runs the plain per-window forward (every window re-encodes its 11 slices), for
the benchmark and the equivalence test. Other models of :func:`build_model` (UNet2D/3D) always
take the window path. All of it runs under ``torch.inference_mode()`` with ``threads`` torch
threads (default: all cores).
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from lungburden import __version__
from lungburden.dicom_io.volume import CTVolume
from lungburden.segmentation.base import AlgorithmInfo, requested_precision
from lungburden.segmentation.component_filter import CHECKPOINT_KEY as FILTER_KEY
from lungburden.segmentation.component_filter import HighOpacityFilter
from lungburden.segmentation.lesion_regions import LesionRegions, refine_lesion_regions
from lungburden.segmentation.lung_field import LungFieldRules, refine_lung_field
from lungburden.segmentation.networks import ConvLSTMEnsemble, ConvLSTMSegNet, load_checkpoint
from lungburden.segmentation.networks.convlstm import SliceFeatures
from lungburden.segmentation.networks.ensemble import EnsembleFeatures
from lungburden.segmentation.opacity_split import OpacitySplit, split_opacity
from lungburden.segmentation.postprocess import (
    APEX_MIN_LUNG_CM2,
    FAT_MEDIAN_HU,
    MAX_DETACHED_ML,
    MIN_HIGH_OPACITY_ML,
    MIN_LUNG_CONTACT,
    GGOMargins,
    refine_ggo_margins,
    relabel_unlikely_high_opacity,
    remove_high_opacity_above_apex,
    remove_opacity_components,
)
from lungburden.segmentation.preprocess import (
    PreprocessedSeries,
    clear_outside_body,
    coarse_body,
    logits_to_labels,
    pad_context,
    preprocess,
    window_indices,
)

#: Where the shipped weights live (``lungburden model train --final --export`` writes them).
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "convlstm.pt"
#: Opacity components smaller than this (mL) are dropped (:func:`remove_small_opacities`).
MIN_OPACITY_ML = 0.5


class WeightsNotFound(FileNotFoundError):
    """The network's weights file is missing (the product never runs an untrained network)."""


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` torch intra-op threads (default: all CPU cores) inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads or available_cores()))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX tiles); without it,
    oneDNN emulates bfloat16 and the network runs slower than in float32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch build without these probes
        return False


def resolve_precision(precision: str | None = None) -> str:
    """``float32`` or ``bfloat16`` for a requested precision (:func:`requested_precision`:
    ``None`` = ``$LUNGBURDEN_PRECISION``, else ``auto``; ``auto``: bfloat16 on CPUs that compute
    it natively, else float32)."""
    requested = requested_precision(precision)
    if requested == "auto":
        return "bfloat16" if native_bfloat16() else "float32"
    return requested


def network_autocast(precision: str, device_type: str = "cpu") -> AbstractContextManager[Any]:
    """The network's convolutions autocast to bfloat16 when ``precision`` is ``bfloat16`` (a no-op
    for float32). Thread-local; callers cast the logits back to float32 for the loss / argmax."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bfloat16")


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every Conv → BatchNorm pair of a ``Sequential`` folded
    into one convolution (same outputs up to rounding, one memory pass less per layer)."""
    model = copy.deepcopy(model).eval()
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, (nn.Conv2d, nn.Conv3d)) and isinstance(bn, (nn.BatchNorm2d, nn.BatchNorm3d)):
                seq[i] = fuse_conv_bn_eval(conv, bn)
                seq[i + 1] = nn.Identity()
    return model


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ConvLSTMSegmenter:
    """:class:`~lungburden.segmentation.base.Segmenter` running a trained network.

    ``weights_path``: a checkpoint of :func:`~lungburden.segmentation.networks.save_checkpoint`
    (default :data:`DEFAULT_WEIGHTS`); or ``model``: an ``nn.Module`` from ``build_model`` (tests,
    benchmarks). ``naive``: per-window forward instead of the fast path. ``threads``: torch
    threads (default all cores). ``encode_chunk`` / ``target_chunk``: slices encoded per batch and
    windows advanced together (memory/speed trade-off; defaults measured in docs/model-development.md).
    ``fold_bn``: run a copy with BatchNorm folded into the convolutions (:func:`fold_batchnorm`).
    ``ggo_margins``: the attenuation rules of the GGO margin
    (:func:`~lungburden.segmentation.postprocess.refine_ggo_margins`; None turns it off).
    ``max_detached_ml`` / ``min_lung_contact``: small opacity components with under that share of
    their surface on aerated lung are removed
    (:func:`~lungburden.segmentation.postprocess.remove_detached_opacities`; 0 mL turns it off).
    ``apex_min_lung_cm2``: high opacity cranial to the first slice with that much aerated lung is
    dropped (:func:`~lungburden.segmentation.postprocess.remove_high_opacity_above_apex`; 0 turns
    it off). ``min_high_opacity_ml`` / ``fat_median_hu``: smaller high-opacity components, and
    those whose median HU is at or below that of fat, take the label of their surroundings
    (:func:`~lungburden.segmentation.postprocess.relabel_unlikely_high_opacity`; 0 / None turn
    either test off). ``high_opacity_filter``: apply the checkpoint's learned high-opacity
    component filter, if it has one (:mod:`~lungburden.segmentation.component_filter`; False turns
    it off). ``lung_field_rules``: anatomy rules of the lung field on real CT (outside air,
    airway, non-lung air components, pleural-space fill; :mod:`~lungburden.segmentation.lung_field`;
    None turns them off). ``opacity_split``: GGO versus high opacity by attenuation relative to
    the aerated lung (:mod:`~lungburden.segmentation.opacity_split`; None turns it off).
    ``lesion_regions``: opacity ringing an organ dome cut by the slice out, in-plane opening
    (thin vessels and interface rims out) and closing (patches of one region joined) of the
    opacity (:mod:`~lungburden.segmentation.lesion_regions`; None turns it off). All three need
    an ``affine`` (a :class:`CTVolume`).
    ``logit_offsets``: one number per class added to the logits before the argmax (decision
    calibration, :mod:`lungburden.training.calibration`); default: the checkpoint's
    ``calibration`` if it has one, else none; all zeros turns a stored calibration off.
    ``precision``: ``float32``, ``bfloat16`` (convolutions autocast to bfloat16, logits back to
    float32 before the argmax) or ``auto`` (:func:`resolve_precision`; default from
    ``$LUNGBURDEN_PRECISION``). On the shipped model bfloat16 changes ~0.01 % of the labels and
    is ~1.4× faster on a Xeon with AMX (docs/model-development.md); ``float32`` gives the float32 results
    whatever the CPU's bfloat16 support.
    """

    name = "convlstm"

    def __init__(self, weights_path: str | os.PathLike[str] | None = None, model: nn.Module | None = None, *,
                 naive: bool = False, threads: int | None = None, encode_chunk: int = 16,
                 target_chunk: int = 16, window_batch: int = 8, fold_bn: bool = True,
                 min_opacity_ml: float = MIN_OPACITY_ML, precision: str | None = None,
                 logit_offsets: Sequence[float] | None = None, ggo_margins: GGOMargins | None = GGOMargins(),
                 max_detached_ml: float = MAX_DETACHED_ML,
                 min_lung_contact: float = MIN_LUNG_CONTACT, apex_min_lung_cm2: float = APEX_MIN_LUNG_CM2,
                 min_high_opacity_ml: float = MIN_HIGH_OPACITY_ML,
                 fat_median_hu: float | None = FAT_MEDIAN_HU, high_opacity_filter: bool = True,
                 lung_field_rules: LungFieldRules | None = LungFieldRules(),
                 opacity_split: OpacitySplit | None = OpacitySplit(),
                 lesion_regions: LesionRegions | None = LesionRegions()):
        self.precision = resolve_precision(precision)  # a bad value fails before the weights load
        checkpoint: dict[str, Any] = {}
        weights_id = "in-memory model"
        weights_file: str | None = None
        weights_sha256: str | None = None
        if model is None:
            path = Path(weights_path) if weights_path is not None else DEFAULT_WEIGHTS
            if not path.is_file():
                raise WeightsNotFound(
                    f"network weights not found at {path}: the convlstm segmenter needs trained weights "
                    "(train and export them with `lungburden model train --final --export "
                    f"{DEFAULT_WEIGHTS}`, or pass a checkpoint path); it never runs untrained"
                )
            model, checkpoint = load_checkpoint(path)
            weights_file, weights_sha256 = path.name, file_sha256(path)
            weights_id = f"{weights_file} sha256:{weights_sha256[:16]}"
        self.source_model = model
        self.model = fold_batchnorm(model) if fold_bn else model.eval()
        self.checkpoint_meta = {k: v for k, v in checkpoint.items() if k != "state_dict"}
        self.naive = naive
        self.threads = threads
        self.encode_chunk = max(1, encode_chunk)
        self.target_chunk = max(1, target_chunk)
        self.window_batch = max(1, window_batch)
        self.min_opacity_ml = float(min_opacity_ml)
        self.ggo_margins = ggo_margins if ggo_margins is not None and ggo_margins.steps > 0 else None
        self.max_detached_ml = float(max_detached_ml)
        self.min_lung_contact = float(min_lung_contact)
        self.apex_min_lung_cm2 = float(apex_min_lung_cm2)
        self.min_high_opacity_ml = float(min_high_opacity_ml)
        self.fat_median_hu = None if fat_median_hu is None else float(fat_median_hu)
        self.lung_field_rules = lung_field_rules
        self.opacity_split = opacity_split
        self.lesion_regions = lesion_regions
        stored_filter = checkpoint.get(FILTER_KEY)
        self.high_opacity_filter = (HighOpacityFilter.from_dict(stored_filter)
                                    if high_opacity_filter and stored_filter else None)
        if logit_offsets is None:
            logit_offsets = (checkpoint.get("calibration") or {}).get("logit_offsets")
        self.logit_offsets = _offsets_tensor(logit_offsets, int(getattr(model, "num_classes", 0)))
        model_name = str(getattr(model, "name", type(model).__name__))
        self.info = AlgorithmInfo(
            name=f"lungburden {model_name}",
            version=__version__,
            family="Artificial Intelligence",
            parameters={"model": model_name, "weights": weights_id,
                        "input_size": str(self.input_size), "context": str(self.context),
                        "min_opacity_ml": str(self.min_opacity_ml), "precision": self.precision,
                        "ggo_margins": _describe_margins(self.ggo_margins),
                        "detached_opacity": (f"< {self.max_detached_ml:g} mL with < "
                                             f"{self.min_lung_contact:g} of the surface on lung"),
                        "apex_min_lung_cm2": f"{self.apex_min_lung_cm2:g}",
                        "min_high_opacity_ml": f"{self.min_high_opacity_ml:g}",
                        "high_opacity_fat_median_hu": ("off" if self.fat_median_hu is None
                                                       else f"{self.fat_median_hu:g}"),
                        "high_opacity_filter": _describe_filter(self.high_opacity_filter),
                        "lung_field_rules": _describe_lung_field(self.lung_field_rules),
                        "opacity_split": _describe_split(self.opacity_split),
                        "lesion_regions": _describe_regions(self.lesion_regions),
                        **({"logit_offsets": " ".join(f"{v:g}" for v in self.logit_offsets.flatten().tolist())}
                           if self.logit_offsets is not None else {})},
            weights_file=weights_file,
            weights_sha256=weights_sha256,
        )

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], **kwargs: Any) -> ConvLSTMSegmenter:
        return cls(weights_path=path, **kwargs)

    @property
    def input_size(self) -> int:
        return int(getattr(self.model, "input_size", 160))

    @property
    def context(self) -> int:
        return int(getattr(self.model, "context", 0))

    # -- Segmenter protocol ----------------------------------------------------------------------
    def segment(self, volume: CTVolume | np.ndarray) -> np.ndarray:
        """``uint8`` label map with the shape of ``volume.hu`` (see :mod:`lungburden.labels`).

        Labels outside the body are cleared and the GGO margin refined
        (:func:`~lungburden.segmentation.postprocess.refine_ggo_margins`); when ``volume`` is a
        :class:`CTVolume` the component steps follow (:meth:`_finish_components`; a bare array
        has no voxel size: not applied).
        """
        hu = volume.hu if isinstance(volume, CTVolume) else np.asarray(volume)
        if hu.ndim != 3:
            raise ValueError(f"expected a (slices, rows, cols) volume, got shape {hu.shape}")
        labels = np.zeros(hu.shape, np.uint8)
        with torch_threads(self.threads), torch.inference_mode():
            pre = preprocess(hu, size=self.input_size)
            with self._label_writer(pre, hu, labels, background=torch.get_num_threads() > 1) as writer:
                self._network(pre, writer)
        if isinstance(volume, CTVolume):
            self._finish_components(labels, hu, volume.voxel_volume_ml, volume.affine)
        return labels

    def model_grid_logits(self, hu: np.ndarray) -> tuple[PreprocessedSeries, torch.Tensor]:
        """The network's raw logits ``(slices, classes, S, S)`` (float16, before any offsets) and
        the preprocessing they belong to; :meth:`labels_from_logits` finishes them as
        :meth:`segment` does (calibration fits offsets on these without rerunning the network)."""
        chunks: list[tuple[int, torch.Tensor]] = []

        class Collector:
            def submit(self, logits: torch.Tensor, start: int) -> None:
                chunks.append((start, logits.to(torch.float16)))

        with torch_threads(self.threads), torch.inference_mode():
            pre = preprocess(np.asarray(hu), size=self.input_size)
            self._network(pre, Collector())  # type: ignore[arg-type]
        return pre, torch.cat([c for _, c in sorted(chunks, key=lambda item: item[0])])

    def labels_from_logits(self, pre: PreprocessedSeries, hu: np.ndarray, logits: torch.Tensor,
                           voxel_ml: float | None, offsets: torch.Tensor | None = None,
                           affine: np.ndarray | None = None) -> np.ndarray:
        """Labels from :meth:`model_grid_logits` output: the label writer's steps (offsets,
        argmax on the source grid, body clearing, GGO margin) and the component filters, as in
        :meth:`segment`.
        ``offsets``: ``(1, classes, 1, 1)``, default this segmenter's ``logit_offsets``;
        ``affine``: the volume's (for the apex step; without it that step is skipped)."""
        labels = np.zeros(np.shape(hu), np.uint8)
        with self._label_writer(pre, np.asarray(hu), labels, background=False, offsets=offsets) as writer:
            for a in range(0, logits.shape[0], self.target_chunk):
                writer.submit(logits[a:a + self.target_chunk].float(), a)
        if voxel_ml:
            self._finish_components(labels, hu, voxel_ml, affine)
        return labels

    def _label_writer(self, pre: PreprocessedSeries, hu: np.ndarray, labels: np.ndarray, background: bool,
                      offsets: torch.Tensor | None = None) -> _LabelWriter:
        """The label writer with this segmenter's offsets (unless given) and GGO margin step."""
        return _LabelWriter(pre, hu, labels, background=background,
                            offsets=self.logit_offsets if offsets is None else offsets,
                            ggo_margins=self.ggo_margins)

    def _finish_components(self, labels: np.ndarray, hu: np.ndarray, voxel_ml: float,
                           affine: np.ndarray | None) -> None:
        """The whole-series steps, in place: opacity specks, detached opacities, high opacity
        above the apex (with an ``affine``), high-opacity specks and fat (:mod:`.postprocess`), then
        the checkpoint's high-opacity component filter (with an ``affine``; :mod:`.component_filter`),
        then, with an ``affine``, the lung-field rules (:mod:`.lung_field`) and the attenuation
        split of the opacity (:mod:`.opacity_split`)."""
        remove_opacity_components(labels, voxel_ml, self.min_opacity_ml, self.max_detached_ml, self.min_lung_contact)
        if affine is not None:
            remove_high_opacity_above_apex(labels, affine, self.apex_min_lung_cm2)
        relabel_unlikely_high_opacity(labels, hu, voxel_ml, self.min_high_opacity_ml, self.fat_median_hu)
        if self.high_opacity_filter is not None and affine is not None:
            self.high_opacity_filter.apply(labels, hu, affine, voxel_ml)
        if self.lung_field_rules is not None and affine is not None:
            refine_lung_field(labels, hu, affine, self.lung_field_rules)
        if self.opacity_split is not None and affine is not None:
            spacing = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
            split_opacity(labels, hu, self.opacity_split, pixel_cm2=float(spacing[1] * spacing[2]) / 100.0)
        if self.lesion_regions is not None and affine is not None:
            refine_lesion_regions(labels, hu, affine, self.lesion_regions)

    # -- paths -----------------------------------------------------------------------------------
    def _network_precision(self) -> AbstractContextManager[Any]:
        """Autocast of the network calls (convolutions) to bfloat16 when that is the precision.
        Thread-local: the label writer's argmax stays float32."""
        return network_autocast(self.precision)

    def _network(self, pre: PreprocessedSeries, writer: _LabelWriter) -> None:
        if not self.naive and isinstance(self.model, ConvLSTMSegNet | ConvLSTMEnsemble):
            self._fast(pre, writer)
        else:
            self._windows(pre, writer)

    def _fast(self, pre: PreprocessedSeries, writer: _LabelWriter) -> None:
        """Per-slice encoding once, windows advanced together (module docstring)."""
        model = self.model
        assert isinstance(model, ConvLSTMSegNet | ConvLSTMEnsemble)
        c = model.context
        n = pre.num_slices
        padded = pad_context(pre.image, c)  # padded index p = slice p - c
        buf: SliceFeatures | EnsembleFeatures | None = None
        buf_start = 0  # padded index of buf[0]
        done = 0  # targets 0..done-1 are labelled; target t's window is padded t .. t+2c
        for e0 in range(0, padded.shape[0], self.encode_chunk):
            with self._network_precision():
                new = model.encode(padded[e0:e0 + self.encode_chunk, None])
            buf = new if buf is None else type(new).cat([buf, new])  # type: ignore[list-item]
            ready = min(e0 + len(new) - 2 * c, n)
            while done < ready:
                count = min(self.target_chunk, ready - done)
                j = done - buf_start
                with self._network_precision():
                    logits = model.forward_features(buf[j:j + count + 2 * c])
                writer.submit(logits.float(), done)
                done += count
            buf, buf_start = buf[done - buf_start:], done

    def _windows(self, pre: PreprocessedSeries, writer: _LabelWriter) -> None:
        """Plain per-window forward, ``window_batch`` windows per call (naive / UNet path)."""
        c, n = self.context, pre.num_slices
        for a in range(0, n, self.window_batch):
            targets = range(a, min(a + self.window_batch, n))
            index = torch.from_numpy(np.stack([window_indices(n, t, c) for t in targets]))
            with self._network_precision():
                logits = self.model(pre.image[index])
            writer.submit(logits.float(), a)


class _LabelWriter:
    """Turns the logits of consecutive target slices into labels on a helper thread, while the
    caller computes the next ones (both paths; step 3 of the module docstring).

    Per chunk: the ``offsets`` (calibration) added to the logits, :func:`logits_to_labels` into
    ``labels[start:stop]``, then
    :func:`clear_outside_body` and, with ``ggo_margins``,
    :func:`~lungburden.segmentation.postprocess.refine_ggo_margins` on those slices (both work per
    slice, so chunks give the whole-series result). At most ``depth`` chunks wait; an error of the helper is raised by
    the next :meth:`submit` or on leaving the ``with`` block (unless the block itself raised:
    that error is kept), and nothing is left running. ``background=False`` (a segmenter limited
    to one thread) writes in the caller's thread.
    """

    def __init__(self, pre: PreprocessedSeries, hu: np.ndarray, labels: np.ndarray, depth: int = 2,
                 background: bool = True, offsets: torch.Tensor | None = None,
                 ggo_margins: GGOMargins | None = None):
        self.pre, self.hu, self.labels, self.depth, self.offsets = pre, hu, labels, depth, offsets
        self.ggo_margins = ggo_margins
        self.body = pre.body if pre.body is not None else coarse_body(hu)
        self.any_body = bool(self.body.any())
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labels") if background else None
        self.pending: deque[Future[None]] = deque()

    def submit(self, logits: torch.Tensor, start: int) -> None:
        if self.pool is None:
            self._write(logits, start)
            return
        while len(self.pending) >= self.depth:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self._write, logits, start))

    def _write(self, logits: torch.Tensor, start: int) -> None:
        stop = start + logits.shape[0]
        rows, cols = self.labels.shape[1:]
        out = self.labels[start:stop]
        if self.offsets is not None:
            logits = logits + self.offsets
        logits_to_labels(logits, self.pre.box, rows, cols, out=out)
        clear_outside_body(out, self.hu[start:stop], self.body[start:stop], series_has_body=self.any_body)
        if self.ggo_margins is not None:
            refine_ggo_margins(out, self.hu[start:stop], self.ggo_margins)

    def __enter__(self) -> _LabelWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        try:
            while self.pending:
                future = self.pending.popleft()
                if exc_type is None:
                    future.result()
                else:  # the caller's error is the one to report; the helper's would mask it
                    future.exception()
        finally:
            for future in self.pending:
                future.cancel()
            if self.pool is not None:
                self.pool.shutdown(wait=True)


def _describe_margins(margins: GGOMargins | None) -> str:
    """The GGO margin rules for the algorithm parameters."""
    if margins is None:
        return "off"
    text = f"{margins.steps} steps; lung->GGO {margins.lung_hu[0]:g} < HU <= {margins.lung_hu[1]:g}"
    if margins.high_hu is not None:
        text += f"; GGO <= {margins.high_hu[0]:g} < unchanged <= {margins.high_hu[1]:g} < high opacity"
    return text


def _describe_filter(component_filter: HighOpacityFilter | None) -> str:
    """The high-opacity component filter for the algorithm parameters."""
    if component_filter is None:
        return "off"
    fitted = component_filter.provenance
    return (f"{len(component_filter.ensemble.roots)} trees, reject p > {component_filter.threshold:g}"
            + (f", fitted on {fitted['first_case']}..{fitted['last_case']}" if fitted.get("first_case") else ""))


def _describe_lung_field(rules: LungFieldRules | None) -> str:
    """The lung-field rules for the algorithm parameters."""
    if rules is None:
        return "off"
    steps = [name for name, on in (("outside air", rules.outside_air), ("airway", rules.airway),
                                   ("lung components", rules.components),
                                   (f"pleural fill {rules.pleural_fill_mm:g} mm", rules.pleural_fill_mm > 0)) if on]
    return ", ".join(steps) or "off"


def _describe_split(split: OpacitySplit | None) -> str:
    """The attenuation split of the opacity for the algorithm parameters."""
    if split is None:
        return "off"
    parts = []
    if split.ggo_delta_hu is not None:
        parts.append(f"lesion <= aerated P{split.reference_percentile:g} + {split.ggo_delta_hu:g} HU -> lung")
    if split.high_hu is not None:
        parts.append(f"high opacity > {split.high_hu:g} HU ({split.smooth_px} px mean)")
    if split.min_lung_contact > 0:
        limit = f" up to {split.max_detached_cm2:g} cm²" if split.max_detached_cm2 is not None else ""
        parts.append(f"patches{limit} with < {100 * split.min_lung_contact:g} % aerated outline removed")
    return "; ".join(parts) or "off"


def _describe_regions(regions: LesionRegions | None) -> str:
    """The lesion-region step for the algorithm parameters."""
    if regions is None or (regions.open_mm <= 0 and regions.close_mm <= 0 and regions.dome_rim_mm <= 0):
        return "off"
    dome = f"organ-dome rim {regions.dome_rim_mm:g} mm, " if regions.dome_rim_mm > 0 else ""
    return (f"{dome}in-plane opening {regions.open_mm:g} mm, closing {regions.close_mm:g} mm "
            f"(added voxels high opacity > {regions.high_hu:g} HU)")


def _offsets_tensor(offsets: Sequence[float] | None, num_classes: int) -> torch.Tensor | None:
    """``(1, classes, 1, 1)`` float32 offsets, or None for none / all zeros."""
    if offsets is None:
        return None
    values = [float(v) for v in offsets]
    if num_classes and len(values) != num_classes:
        raise ValueError(f"logit offsets {values} do not match the model's {num_classes} classes")
    if not all(np.isfinite(values)):
        raise ValueError(f"logit offsets must be finite numbers, got {values}")
    if not any(values):
        return None
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)
