"""Networks, RMI loss, preprocessing and the network segmenter (paper sections 2.4-2.6).

Small random-initialised models only (trained weights are not needed); runs in a few seconds.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lungburden import labels as L
from lungburden.labels import LABEL_NAMES, NUM_CLASSES
from lungburden.segmentation.base import PRECISION_ENV
from lungburden.segmentation.convlstm import (
    ConvLSTMSegmenter,
    WeightsNotFound,
    _LabelWriter,
    fold_batchnorm,
    native_bfloat16,
    resolve_precision,
)
from lungburden.segmentation.networks import (
    MODEL_NAMES,
    ConvLSTMSegNet,
    build_model,
    count_parameters,
    load_checkpoint,
    save_checkpoint,
)
from lungburden.segmentation.postprocess import remove_small_opacities
from lungburden.segmentation.preprocess import (
    CropBox,
    argmax_channels,
    body_box,
    clear_outside_body,
    coarse_body,
    labels_to_model_grid,
    logits_to_labels,
    normalise_slices,
    pad_context,
    preprocess,
    to_source_grid,
    window_indices,
)
from lungburden.training.losses import RMILoss, neighbourhood_vectors

SMALL = dict(input_size=32, width=8, growth=8, dense_layers=2, features=8, levels=2, hidden=8, head_width=8,
             lstm_pool=2, refine=8)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def small_convlstm(**overrides) -> ConvLSTMSegNet:
    model = build_model("convlstm", **{**SMALL, **overrides})
    assert isinstance(model, ConvLSTMSegNet)
    # Non-trivial BatchNorm statistics, so that eval mode and BN folding are really exercised.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def phantom_hu(slices: int = 14, rows: int = 70, cols: int = 90, seed: int = 0) -> np.ndarray:
    """A body ellipse (soft tissue) with two lungs (air) and a dense blob, plus noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:slices, 0:rows, 0:cols].astype(np.float32)
    hu = np.full((slices, rows, cols), -1000.0, np.float32)
    hu[((y - 35) / 28) ** 2 + ((x - 45) / 38) ** 2 < 1] = 40.0
    for cx in (30, 60):
        hu[((y - 35) / 18) ** 2 + ((x - cx) / 12) ** 2 < 1] = -850.0
    hu[((y - 30) / 5) ** 2 + ((x - 30) / 5) ** 2 + ((z - 7) / 4) ** 2 < 1] = -500.0
    return hu + rng.normal(0, 15, hu.shape).astype(np.float32)


# -- models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_window_interface_shapes(name: str) -> None:
    hp = SMALL if name == "convlstm" else dict(input_size=32, base=4)
    model = build_model(name, **hp)
    k = 2 * model.context + 1
    x = torch.rand(2, k, 32, 32)
    out = model(x)
    assert out.shape == (2, NUM_CLASSES, 32, 32)
    assert model.num_classes == NUM_CLASSES and model.input_size == 32
    assert {"convlstm": 5, "unet2d": 0, "unet3d": 2}[name] == model.context
    out.sum().backward()  # trainable through the uniform interface
    with pytest.raises(ValueError):
        model(torch.rand(2, k + 2, 32, 32))


def test_default_convlstm_is_small() -> None:
    model = build_model("convlstm")
    assert model.context == 5 and model.input_size == 160
    assert count_parameters(model) * 4 < 5 * 2**20  # float32 weights under 5 MB
    dilated = build_model("convlstm", **{**SMALL, "dilated": True, "dense_layers": 3})
    assert dilated(torch.rand(1, 11, 32, 32)).shape == (1, NUM_CLASSES, 32, 32)
    with pytest.raises(KeyError, match="unknown model"):
        build_model("resnet")
    with pytest.raises(ValueError, match="multiple of"):
        build_model("convlstm", input_size=100)


def test_fusion_formula() -> None:
    """S_out = S_main·α + S_attn·(1 − α) (eq. 1); without refinement the output is its upsampling."""
    model = small_convlstm(refine=0, lstm_pool=1, levels=1)
    seen: dict[str, torch.Tensor] = {}
    for name in ("main_head", "attn_seg_head", "attn_head"):
        getattr(model, name).register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
    with torch.no_grad():
        out = model(torch.rand(3, 11, 32, 32))
    alpha = seen["attn_head"]
    assert alpha.shape == (3, 1, 16, 16) and float(alpha.min()) >= 0 and float(alpha.max()) <= 1
    fused = seen["main_head"] * alpha + seen["attn_seg_head"] * (1 - alpha)
    expected = F.interpolate(fused, scale_factor=2.0, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected)


def test_slabs_equal_windows_and_train() -> None:
    model = small_convlstm()
    stack = torch.rand(2, 15, 32, 32)  # two slabs of 5 targets each
    with torch.no_grad():
        slabs = model.forward_slabs(stack)
        windows = torch.stack([model(stack[b, i:i + 11][None])[0] for b in range(2) for i in range(5)])
        seq = model.forward_sequence(stack[1])
    assert slabs.shape == (2, 5, NUM_CLASSES, 32, 32)
    torch.testing.assert_close(slabs.flatten(0, 1), windows, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(seq, slabs[1], atol=1e-5, rtol=1e-4)
    model.train()
    x = stack.clone().requires_grad_()
    model.forward_slabs(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_context_padding_replicates_edges() -> None:
    assert window_indices(20, 0, 5).tolist() == [0] * 6 + [1, 2, 3, 4, 5]
    assert window_indices(20, 19, 5).tolist() == [14, 15, 16, 17, 18] + [19] * 6
    assert window_indices(3, 1, 2).tolist() == [0, 0, 1, 2, 2]
    stack = torch.arange(4.0)[:, None, None].expand(4, 2, 2)
    assert pad_context(stack, 2)[:, 0, 0].tolist() == [0, 0, 0, 1, 2, 3, 3, 3]
    assert pad_context(stack, 0) is stack


def test_fold_batchnorm_same_output() -> None:
    model = small_convlstm()
    x = torch.rand(2, 11, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fold_batchnorm(model)(x), model(x), atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fold_batchnorm(model).modules())


# -- RMI loss -------------------------------------------------------------------------------------


def _labels(b: int = 2, size: int = 48) -> torch.Tensor:
    y = torch.zeros(b, size, size, dtype=torch.long)
    y[:, 8:40, 6:30] = 1
    y[:, 14:26, 10:22] = 2
    y[:, 30:38, 30:44] = 3
    return y


def test_rmi_perfect_beats_random_and_gradients_finite() -> None:
    y = _labels()
    loss = RMILoss(NUM_CLASSES)
    perfect = F.one_hot(y, NUM_CLASSES).permute(0, 3, 1, 2).float() * 12
    noisy = perfect + 8 * torch.randn_like(perfect)
    rand = torch.randn(2, NUM_CLASSES, 48, 48, requires_grad=True)
    assert loss.rmi(perfect, y) < loss.rmi(noisy, y) < loss.rmi(rand.detach(), y)
    assert loss(perfect, y) < loss(rand.detach(), y)
    total = loss(rand, y)
    total.backward()
    assert torch.isfinite(total) and rand.grad is not None and torch.isfinite(rand.grad).all()
    assert float(rand.grad.abs().sum()) > 0


def test_rmi_definition_details() -> None:
    y = _labels(1)
    logits = torch.randn(1, NUM_CLASSES, 48, 48)
    torch.testing.assert_close(RMILoss(lambda_ce=1.0)(logits, y), F.cross_entropy(logits, y))
    mixed = RMILoss(lambda_ce=0.5)(logits, y)
    torch.testing.assert_close(mixed, 0.5 * F.cross_entropy(logits, y) + 0.5 * RMILoss().rmi(logits, y))
    v = neighbourhood_vectors(torch.arange(16.0).view(1, 1, 4, 4), 3)
    assert v.shape == (1, 1, 9, 4)
    assert v[0, 0, :, 0].tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    # A class absent from image and prediction does not break the factorisations.
    empty = torch.zeros(1, 48, 48, dtype=torch.long)
    assert torch.isfinite(RMILoss()(torch.randn(1, NUM_CLASSES, 48, 48), empty))
    with pytest.raises(ValueError):
        RMILoss()(logits, y[:, :10])


# -- preprocessing --------------------------------------------------------------------------------


def test_preprocess_crops_windows_and_resizes() -> None:
    hu = phantom_hu()
    box = body_box(hu)
    # Body ellipse spans rows 7..63 and cols 7..83; the box is square and covers it.
    assert box.row0 <= 7 and box.col0 <= 7 and box.row0 + box.side >= 63 and box.col0 + box.side >= 83
    pre = preprocess(hu, size=32)
    assert pre.image.shape == (14, 32, 32) and pre.image.dtype == torch.float32
    assert float(pre.image.min()) >= 0.0 and float(pre.image.max()) <= 1.0
    assert pre.box == box and pre.source_shape == hu.shape
    # int16 input gives the same result (converted chunk by chunk).
    torch.testing.assert_close(preprocess(np.round(hu).astype(np.int16), size=32).image, pre.image,
                               atol=2e-3, rtol=0)
    # float64 and float16 too (converted on the copy into the crop square).
    torch.testing.assert_close(preprocess(hu.astype(np.float64), size=32).image, pre.image, atol=1e-6, rtol=0)
    torch.testing.assert_close(preprocess(hu.astype(np.float16), size=32).image, pre.image, atol=2e-3, rtol=0)
    # A crop square wholly outside the image reads as air: all zeros.
    assert float(normalise_slices(hu, CropBox(-80, -80, 40), 32).max()) < 1e-4
    blank = np.full((3, 20, 30), -1000, np.float32)
    assert body_box(blank).side == 30


def test_labels_outside_the_body_are_cleared() -> None:
    """Couch foam or a blanket taken for lung is dropped; the lungs, enclosed by the body, stay."""
    hu = np.full((4, 96, 96), -1000.0, np.float32)
    yy, xx = np.mgrid[:96, :96]
    body = ((yy - 40) / 30) ** 2 + ((xx - 48) / 40) ** 2 < 1
    lung = ((yy - 40) / 18) ** 2 + ((np.abs(xx - 48) - 18) / 12) ** 2 < 1
    hu[:, body] = 40.0
    hu[:, lung] = -850.0
    hu[:, 80:84, 10:86] = 200.0  # couch shell, separated from the body by air
    hu[:, 84:90, 10:86] = -750.0  # couch foam
    labels = np.zeros(hu.shape, np.uint8)
    labels[:, lung] = L.LUNG
    labels[:, 84:90, 10:86] = L.LUNG  # the network's mistake
    labels[:, 2:6, 2:6] = L.GGO
    out = clear_outside_body(labels.copy(), hu)
    assert (out[:, lung] == L.LUNG).all()
    assert not out[:, 80:, :].any() and not out[:, :6, :6].any()
    assert not clear_outside_body(labels.copy(), np.full(hu.shape, -1000.0, np.float32)).any()
    # Slice by slice (part of a series, as the segmenter's label writer does) = the whole series,
    # also for a slice without body but not air (kept in both: only air-like outside goes).
    odd = hu.copy()
    odd[3] = -800.0
    whole = clear_outside_body(labels.copy(), odd)
    body = coarse_body(odd)
    assert body.any() and not body[3].any() and (whole[3] == labels[3]).all()
    parts = labels.copy()
    for k in range(0, 4, 3):
        clear_outside_body(parts[k:k + 3], odd[k:k + 3], body[k:k + 3], series_has_body=True)
    np.testing.assert_array_equal(parts, whole)
    # A crop or reduced field of view that cuts through the body and a lung (the lung reaches the
    # image edge): the cut lung is not air-like, so it stays; also on a size not divisible by 4.
    crop_hu, crop_labels = hu[:, 12:69, 25:90], labels[:, 12:69, 25:90]
    assert crop_hu.shape[1:] == (57, 65) and lung[12:69, 25:90][:, 0].any()
    out = clear_outside_body(crop_labels.copy(), crop_hu)
    np.testing.assert_array_equal(out == L.LUNG, lung[12:69, 25:90][None].repeat(4, 0))
    # Non-contiguous label maps are updated in place too.
    wide = np.zeros((4, 96, 192), np.uint8)
    view = wide[:, :, ::2]
    view[...] = labels
    clear_outside_body(view, hu)
    assert not view[:, 84:90].any() and (view[:, lung] == L.LUNG).all()


def test_label_writer_raises_helper_errors_and_stops() -> None:
    """An error on the label thread reaches the caller, and no helper thread is left behind."""
    hu = np.full((6, 40, 40), 40.0, np.float32)
    labels = np.zeros(hu.shape, np.uint8)
    pre = preprocess(hu, size=32)
    logits = torch.zeros(4, NUM_CLASSES, 32, 32)
    logits[:, L.LUNG] = 1.0
    with pytest.raises(ValueError, match="broadcast"), _LabelWriter(pre, hu, labels) as writer:
        writer.submit(logits[:2], 0)
        writer.submit(logits, 4)  # 4 slices into the last 2: fails on the helper thread
    assert not [t for t in threading.enumerate() if t.name.startswith("labels")]
    assert labels[:2].any() and not labels[2:4].any()
    # An error of the caller's own block is the one reported, not a helper error behind it.
    with pytest.raises(KeyError, match="network"), _LabelWriter(pre, hu, labels) as writer:
        writer.submit(logits, 4)
        raise KeyError("network")
    assert not [t for t in threading.enumerate() if t.name.startswith("labels")]
    # Without a helper thread (a one-thread segmenter) the chunk is written at once.
    labels[...] = 0
    with _LabelWriter(pre, hu, labels, background=False) as writer:
        assert writer.pool is None
        writer.submit(logits[:2], 2)
        assert (labels[2:4] == L.LUNG).all() and not labels[:2].any()


def test_small_opacity_specks_are_removed() -> None:
    """Opacity components under the size floor go (to lung inside the lung, else background);
    larger ones, and a small GGO joined to a consolidation, stay."""
    labels = np.zeros((10, 40, 40), np.uint8)
    labels[:, 5:35, 5:35] = L.LUNG
    labels[2:3, 10:12, 10:12] = L.GGO  # 4 voxels inside the lung
    labels[6:9, 20:30, 20:30] = L.HIGH_OPACITY  # 300 voxels
    labels[5:6, 24:26, 24:26] = L.GGO  # touches the consolidation: one component with it
    labels[0:1, 0:2, 0:2] = L.HIGH_OPACITY  # 4 voxels outside the lung
    # Two 32-voxel cubes touching only at a corner: one 64-voxel component (26-connectivity) stays.
    labels[0:2, 36:40, 36:40] = L.GGO
    labels[2:4, 32:36, 32:36] = L.GGO
    before = labels.copy()
    out = remove_small_opacities(labels, voxel_ml=0.01, min_ml=0.5)  # floor: 50 voxels
    assert out is labels
    assert (out[2, 10:12, 10:12] == L.LUNG).all() and not out[0, 0:2, 0:2].any()
    assert (out[6:9, 20:30, 20:30] == L.HIGH_OPACITY).all() and (out[5, 24:26, 24:26] == L.GGO).all()
    assert (out[0:2, 36:40, 36:40] == L.GGO).all() and (out[2:4, 32:36, 32:36] == L.GGO).all()
    changed = out != before
    assert changed.sum() == 8
    # Disabled with a floor of 0; non-contiguous maps are updated in place.
    assert (remove_small_opacities(before.copy(), 0.01, 0.0) == before).all()
    wide = np.zeros((10, 40, 80), np.uint8)
    view = wide[:, :, ::2]
    view[...] = before
    remove_small_opacities(view, 0.01, 0.5)
    assert (view == out).all()


def test_many_specks_are_removed_in_whole_array_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A map full of noise (thousands of specks, some in the lung, some outside, a few large
    components) gives the same result by the whole-array path as by the per-speck loop."""
    rng = np.random.default_rng(0)
    labels = np.zeros((20, 60, 60), np.uint8)
    labels[:, 10:50, 5:55] = L.LUNG
    noise = rng.random(labels.shape)
    labels[noise < 0.02] = L.GGO  # sparse (3 %): specks of a few voxels, far below percolation
    labels[noise > 0.99] = L.HIGH_OPACITY
    labels[5:12, 20:30, 20:30] = L.HIGH_OPACITY  # 700 voxels: stays
    import lungburden.segmentation.postprocess as post_module

    results = []
    for limit in (10**9, 0):  # loop, then whole-array passes
        monkeypatch.setattr(post_module, "_SPECK_LOOP_LIMIT", limit)
        results.append(remove_small_opacities(labels.copy(), voxel_ml=0.01, min_ml=0.5))
    np.testing.assert_array_equal(results[0], results[1])
    out = results[1]
    assert (out[5:12, 20:30, 20:30] == L.HIGH_OPACITY).all()
    specks_before = np.count_nonzero(labels >= L.GGO) - 700
    assert specks_before > 1000 and np.count_nonzero(out >= L.GGO) < 700 + specks_before // 5
    outside = np.zeros(labels.shape, bool)
    outside[:, :4] = True  # 6 rows from the lung: specks there become background
    assert not out[outside].any()


def test_logits_to_labels_matches_upsample_argmax() -> None:
    for box in (CropBox(5, 3, 60), CropBox(-10, -4, 100)):
        logits = F.interpolate(torch.randn(3, NUM_CLASSES, 4, 4) * 3, size=(32, 32), mode="bilinear")
        got = logits_to_labels(logits, box, 70, 90)
        r0, r1, c0, c1 = box.clipped(70, 90)
        expected = np.zeros((3, 70, 90), np.uint8)
        expected[:, r0:r1, c0:c1] = to_source_grid(logits, box, 70, 90).argmax(1).numpy()
        np.testing.assert_array_equal(got, expected)
        assert got.dtype == np.uint8
    x = torch.randn(2, 4, 5, 6).round()  # ties: first index wins, as argmax
    assert torch.equal(argmax_channels(x.contiguous(memory_format=torch.channels_last)), x.argmax(1).byte())

def test_logits_to_labels_cells_match_full_upsampling_on_random_boxes() -> None:
    """The uniform-cell shortcut gives the labels of upsampling every class map, for up- and
    down-sampling boxes cut by the image edge; only exact ties (rounded logits) may differ, by
    float rounding of the interpolation weights."""
    rng = torch.Generator().manual_seed(3)
    checked = 0
    for trial in range(120):
        size, side = (int(v) for v in torch.randint(8, 48, (2,), generator=rng))
        side = side if trial % 2 else side * 3  # down- and up-sampling
        rows, cols = (int(v) for v in torch.randint(12, 140, (2,), generator=rng))
        box = CropBox(*(int(v) for v in torch.randint(-20, 12, (2,), generator=rng)), side)
        r0, r1, c0, c1 = box.clipped(rows, cols)
        if r1 <= r0 or c1 <= c0:
            continue
        logits = F.interpolate(torch.randn(3, NUM_CLASSES, 5, 5, generator=rng) * 3, size=(size, size),
                               mode="bilinear")
        if trial % 3 == 0:
            logits = logits.round()
        got = logits_to_labels(logits, box, rows, cols)
        up = to_source_grid(logits, box, rows, cols)
        expected = np.zeros_like(got)
        expected[:, r0:r1, c0:c1] = up.argmax(1).numpy()
        s, r, c = np.nonzero(got[:, r0:r1, c0:c1] != expected[:, r0:r1, c0:c1])
        if len(s):
            top2 = up[s, :, r, c].topk(2, dim=1).values
            assert (top2[:, 0] - top2[:, 1]).max().item() < 1e-5
        assert not got[:, :r0].any() and not got[:, r1:].any()
        assert not got[:, :, :c0].any() and not got[:, :, c1:].any()
        checked += 1
    assert checked > 60


def test_labels_to_model_grid_round_trip() -> None:
    labels = np.zeros((2, 70, 90), np.uint8)
    labels[:, 10:60, 10:40] = 1
    labels[:, 20:40, 15:35] = 2
    box = CropBox(0, 0, 90)
    small = labels_to_model_grid(labels, box, 45, NUM_CLASSES)
    assert small.shape == (2, 45, 45) and small.dtype == torch.int64
    back = logits_to_labels(F.one_hot(small, NUM_CLASSES).permute(0, 3, 1, 2).float(), box, 70, 90)
    assert (back == labels).mean() > 0.97


# -- checkpoints ----------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = small_convlstm()
    path = tmp_path / "w" / "convlstm.pt"
    save_checkpoint(path, model, metadata={"epochs": 3, "dice": {"lesion": 0.5}})
    loaded, ckpt = load_checkpoint(path)
    assert ckpt["model"] == "convlstm" and ckpt["hparams"] == model.hparams
    assert ckpt["class_names"] == [LABEL_NAMES[i] for i in range(NUM_CLASSES)]
    assert ckpt["preprocessing"]["size"] == 32 and ckpt["metadata"]["epochs"] == 3
    x = torch.rand(2, 11, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert not loaded.training
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt")
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a lungburden model checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


# -- segmenter ------------------------------------------------------------------------------------


def test_fast_path_equals_naive() -> None:
    model = small_convlstm()
    hu = phantom_hu(slices=23)
    naive = ConvLSTMSegmenter(model=model, naive=True, precision="float32").segment(hu)
    for encode_chunk, target_chunk in ((48, 16), (7, 3), (1, 1)):
        fast = ConvLSTMSegmenter(model=model, encode_chunk=encode_chunk, target_chunk=target_chunk,
                                 precision="float32").segment(hu)
        # Identical labels up to argmax ties at float rounding level.
        assert (fast == naive).mean() > 0.9999, (encode_chunk, target_chunk)
    # Logits too: the chunked path against a plain window forward.
    seg = ConvLSTMSegmenter(model=model)
    pre = preprocess(hu, size=32)
    windows = pre.image[torch.from_numpy(np.stack([window_indices(23, t, 5) for t in range(23)]))]
    with torch.no_grad():
        expected = seg.model(windows)
        got = seg.model.forward_sequence(pad_context(pre.image, 5))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_precision_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    assert resolve_precision() == ("bfloat16" if native_bfloat16() else "float32")
    assert resolve_precision("float32") == "float32" and resolve_precision("BFloat16") == "bfloat16"
    monkeypatch.setenv(PRECISION_ENV, "float32")
    assert resolve_precision() == "float32" and resolve_precision("bfloat16") == "bfloat16"
    assert ConvLSTMSegmenter(model=small_convlstm()).info.parameters["precision"] == "float32"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("float16")
    monkeypatch.setenv(PRECISION_ENV, "half")
    with pytest.raises(ValueError, match="'half'"):
        ConvLSTMSegmenter(model=small_convlstm())


def test_bfloat16_segmentation_close_to_float32() -> None:
    """bfloat16 convolutions (autocast) change few labels; labels come from float32 logits."""
    model = small_convlstm()
    hu = phantom_hu(slices=13)
    exact = ConvLSTMSegmenter(model=model, precision="float32")
    bf16 = ConvLSTMSegmenter(model=model, precision="bfloat16")
    assert bf16.info.parameters["precision"] == "bfloat16"
    with torch.inference_mode(), bf16._network_precision():
        assert bf16.model.encode(torch.rand(2, 1, 32, 32)).feats.dtype == torch.bfloat16
    with torch.inference_mode(), exact._network_precision():
        assert exact.model.encode(torch.rand(2, 1, 32, 32)).feats.dtype == torch.float32
    for naive in (False, True):
        bf16.naive = exact.naive = naive
        assert (bf16.segment(hu) == exact.segment(hu)).mean() > 0.99, naive


def test_segment_runs_the_network_under_autocast_and_the_argmax_in_float32(monkeypatch) -> None:
    from lungburden.segmentation import convlstm as predict

    seen: list[tuple[str, bool]] = []
    to_labels = predict.logits_to_labels

    def record_labels(logits, *args, **kwargs):
        seen.append((f"labels {logits.dtype}", torch.is_autocast_enabled("cpu")))
        return to_labels(logits, *args, **kwargs)

    monkeypatch.setattr(predict, "logits_to_labels", record_labels)
    hu = phantom_hu(slices=13)
    for precision in ("bfloat16", "float32"):
        for naive in (False, True):
            seg = ConvLSTMSegmenter(model=small_convlstm(), precision=precision, naive=naive)
            network = seg.model.forward if naive else seg.model.forward_features

            def record_network(*args, _network=network, **kwargs):
                seen.append(("network", torch.is_autocast_enabled("cpu")))
                return _network(*args, **kwargs)

            monkeypatch.setattr(seg.model, "forward" if naive else "forward_features", record_network)
            seen.clear()
            seg.segment(hu)
            assert ("network", precision == "bfloat16") in seen and ("network", precision != "bfloat16") not in seen
            assert set(x for x in seen if x[0] != "network") == {("labels torch.float32", False)}, (precision, naive)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_segmenter_output_on_source_grid(name: str, tmp_path: Path) -> None:
    hp = SMALL if name == "convlstm" else dict(input_size=32, base=4)
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, build_model(name, **hp))
    seg = ConvLSTMSegmenter.from_checkpoint(path, threads=1)
    hu = phantom_hu(slices=4)  # fewer slices than a window: edges replicated
    labels = seg.segment(hu)
    assert labels.shape == hu.shape and labels.dtype == np.uint8
    assert labels.max() < NUM_CLASSES
    box = body_box(hu)
    r0, r1, c0, c1 = box.clipped(*hu.shape[1:])
    outside = np.ones(hu.shape, bool)
    outside[:, r0:r1, c0:c1] = False
    assert not labels[outside].any()
    assert seg.info.family == "Artificial Intelligence" and seg.info.parameters
    assert seg.info.parameters["model"] == name and "sha256:" in seg.info.parameters["weights"]
    assert torch.get_num_threads() >= 1


def test_missing_weights_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "convlstm.pt"
    with pytest.raises(WeightsNotFound, match="never runs untrained") as err:
        ConvLSTMSegmenter(weights_path=missing)
    assert str(missing) in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


# -- ensemble -------------------------------------------------------------------------------------


def test_ensemble_is_the_mean_of_its_members_and_round_trips(tmp_path: Path) -> None:
    from lungburden.training.checkpoints import build_ensemble

    a, b = small_convlstm(), small_convlstm(levels=1, width=12, hidden=6)  # members may differ in shape
    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    save_checkpoint(paths[0], a, metadata={"epochs": 3, "split": {"train": ["p1", "p2"], "val": ["p3"]}})
    save_checkpoint(paths[1], b, metadata={"epochs": 5, "split": {"train": ["p2", "p4"], "val": ["p5"]}})
    out = build_ensemble(paths, tmp_path / "w" / "ensemble.pt")
    ensemble, ckpt = load_checkpoint(out)
    assert ckpt["model"] == "convlstm_ensemble" and ckpt["preprocessing"]["size"] == 32
    assert [m["metadata"]["epochs"] for m in ckpt["metadata"]["members"]] == [3, 5]
    assert [m["file"] for m in ckpt["metadata"]["members"]] == ["a.pt", "b.pt"]
    # The members' training cases stay off-limits to `lungburden model calibrate` for the ensemble.
    from lungburden.training.calibration import overlapping_ids
    assert overlapping_ids(["p1", "p4", "p5", "p9"], ckpt) == ["p1", "p4", "p5"]
    x = torch.rand(2, 11, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ensemble(x), (a(x) + b(x)) / 2)
    # The segmenter's chunked fast path (per-slice encoding shared between windows) gives the
    # plain per-window result, and the logits are the mean of the members' own.
    hu = phantom_hu(slices=19)
    naive = ConvLSTMSegmenter(out, naive=True, precision="float32").segment(hu)
    fast_seg = ConvLSTMSegmenter(out, encode_chunk=7, target_chunk=3, precision="float32")
    assert fast_seg.info.parameters["model"] == "convlstm_ensemble"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast_seg.model.modules())  # folded
    assert (fast_seg.segment(hu) == naive).mean() > 0.9999
    _, got = fast_seg.model_grid_logits(hu)
    members = [ConvLSTMSegmenter(p, precision="float32").model_grid_logits(hu)[1].float() for p in paths]
    torch.testing.assert_close(got.float(), (members[0] + members[1]) / 2, atol=2e-2, rtol=0)  # float16 store


def test_ensemble_refuses_what_it_cannot_combine(tmp_path: Path) -> None:
    from lungburden.segmentation.networks import ConvLSTMEnsemble
    from lungburden.training.checkpoints import build_ensemble

    a = small_convlstm()
    save_checkpoint(tmp_path / "a.pt", a)
    save_checkpoint(tmp_path / "b64.pt", small_convlstm(input_size=64))
    with pytest.raises(ValueError, match="input_size"):
        build_ensemble([tmp_path / "a.pt", tmp_path / "b64.pt"], tmp_path / "e.pt")
    with pytest.raises(ValueError, match="at least two"):
        build_ensemble([tmp_path / "a.pt"], tmp_path / "e.pt")
    save_checkpoint(tmp_path / "u.pt", build_model("unet2d", input_size=32))
    with pytest.raises(ValueError, match="ConvLSTM"):
        build_ensemble([tmp_path / "a.pt", tmp_path / "u.pt"], tmp_path / "e.pt")
    calibrated = torch.load(tmp_path / "a.pt", weights_only=True)
    calibrated["calibration"] = {"logit_offsets": [0, 0, 1, 0]}
    torch.save(calibrated, tmp_path / "cal.pt")
    with pytest.raises(ValueError, match="calibration"):
        build_ensemble([tmp_path / "a.pt", tmp_path / "cal.pt"], tmp_path / "e.pt")
    with pytest.raises(ValueError, match="over the 0.001 MB limit"):
        build_ensemble([tmp_path / "a.pt", tmp_path / "a.pt"], tmp_path / "e.pt", max_mb=0.001)
    assert not (tmp_path / "e.pt").exists()
    from lungburden.cli import main
    from lungburden.training.commands import EXIT_BAD_INPUT

    assert main(["model", "ensemble", str(tmp_path / "a.pt"), "--out", str(tmp_path / "e.pt")]) == EXIT_BAD_INPUT
    members = [str(tmp_path / "a.pt"), str(tmp_path / "a.pt")]
    assert main(["model", "ensemble", *members, "--out", str(tmp_path / "e.pt")]) == 0
    assert load_checkpoint(tmp_path / "e.pt")[1]["model"] == "convlstm_ensemble"
    with pytest.raises(ValueError, match="ConvLSTM"):
        ConvLSTMEnsemble.from_models([a, build_model("unet2d", input_size=32)])
