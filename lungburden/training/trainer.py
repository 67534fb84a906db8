"""The training loop of the segmentation networks (paper sections 2.4, 2.6, 2.7).

- Loss: RMI + cross-entropy (:class:`lungburden.training.losses.RMILoss`, section 2.6).
- Optimiser: SGD, momentum 0.9, lr 1e-3, weight decay 1e-6 (``optimizer="adam"`` is a documented
  deviation for short CPU budgets, same lr schedule); ReduceLROnPlateau (factor 0.1,
  patience 10) on the validation loss; batch 32 (gradient accumulation over micro-batches);
  training stops when the learning rate reaches 1e-7 (section 2.6), or at ``max_epochs`` or the
  time budget.
- An *epoch* is a fixed number of sampled windows (``windows_per_epoch``), so that epochs are
  short on a CPU and the plateau scheduler's patience has a meaning independent of data size.
- Optional weight averaging (``ema_decay``): an exponential moving average of the weights is what
  is validated, scheduled on, selected and saved (:func:`weight_average`).
- Initialisation: Kaiming (done by the models); the paper's ImageNet weights for the dense block
  cannot be downloaded here and do not fit the one-channel input.
- k-fold cross-validation as in Fig. 3 (section 2.7): the cases are split into ``folds`` disjoint
  subsets; fold k tests on subset k and trains on the rest minus a validation share. ``final``
  trains one model on all cases (with a validation share) for the shipped weights.
- Per fold folder: ``last.pt`` and ``best.pt`` (models' checkpoint format, with the training
  record in ``metadata``), ``state.pt`` (optimiser, scheduler, RNG; for ``resume``) and
  ``history.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lungburden import __version__
from lungburden import labels as L
from lungburden.segmentation.base import requested_precision
from lungburden.segmentation.convlstm import network_autocast, resolve_precision
from lungburden.training.data import (
    Augmentation,
    CaseCache,
    CaseIndex,
    DataSpec,
    TrainingCase,
    WindowSampler,
    augment_batch,
    load_training_cases,
    make_batch,
    make_slab,
    slab_starts,
    split_folds,
)

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyper-parameters and run options (defaults = paper section 2.6 where it gives them)."""

    model: str = "convlstm"
    model_hparams: dict[str, Any] = field(default_factory=dict)
    size: int | None = None  # None: the preprocessing default (preprocess.DEFAULT_SIZE)
    lr: float = 1e-3
    #: "sgd" (paper section 2.6) or "adam" (converges faster within a CPU-hour budget).
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-6
    batch: int = 32
    micro_batch: int = 8
    windows_per_epoch: int = 512
    val_windows_per_case: int = 12
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    stop_lr: float = 1e-7
    max_epochs: int | None = None
    time_budget_min: float | None = None
    lambda_ce: float = 0.5
    folds: int = 5
    fold: int | None = None  # None: every fold
    final: bool = False
    val_fraction: float = 0.2
    split_seed: int = 0
    seed: int = 0
    augment: bool = True
    #: Train the ConvLSTM on contiguous slabs of this many target slices (``forward_sequence``: the
    #: per-slice work is shared by the overlapping windows, ~4x faster on CPU); 0 = independent windows.
    slab: int = 0
    #: Case sampling weight 1 + K·(high-opacity share of the case's lung); 0 = uniform (WindowSampler).
    high_opacity_boost: float = 0.0
    #: "auto", "float32" or "bfloat16": bfloat16 autocast of the network (weights, optimiser and
    #: loss stay float32); auto = bfloat16 where the device computes it natively
    #: (:func:`training_precision`).
    precision: str = "auto"
    #: Exponential moving average of the weights with this decay per optimiser step (its BatchNorm
    #: statistics recomputed before each validation); validation, the plateau scheduler, best.pt and
    #: last.pt use the average (Polyak averaging). 0 = off: the raw weights.
    ema_decay: float = 0.0
    threads: int | None = None
    #: "cpu", "cuda" (or "cuda:N") or "auto" (cuda when available). The data pipeline and the
    #: augmentation stay on the CPU; model, loss and validation run on this device.
    device: str = "cpu"
    #: Processes that generate and preprocess the cases before training (0 = in this process).
    workers: int = 0
    #: Start from this checkpoint's weights (fine-tuning, e.g. of the shipped model on a site's
    #: corrected SEGs); the model and its hyperparameters come from the checkpoint.
    init: str | None = None
    resume: bool = False
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Split:
    """The case ids of one fold (section 2.7, Fig. 3)."""

    name: str
    fold: int | None
    train: list[str]
    val: list[str]
    test: list[str]


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    val_dice: dict[str, float | None]
    lr: float
    seconds: float


@dataclass
class FoldResult:
    """Outcome of training one fold (or the final model)."""

    split: Split
    out_dir: Path
    best_checkpoint: Path
    epochs: int
    best_epoch: int
    best_val_loss: float
    final_lr: float
    stop_reason: str
    history: list[EpochRecord]


# --------------------------------------------------------------------------------------------------
# Splits


def make_splits(case_ids: list[str], config: TrainConfig) -> list[Split]:
    """Fold splits (train/val/test) or the single final split (train/val), deterministic per seed.

    Validation is a group-aware ``val_fraction`` of the non-test cases (variants of one real
    volume stay together), at least one case.
    """
    if not case_ids:
        raise ValueError("no training cases: give --phantoms, --real-ct-variants, --nifti or --dicom-seg")

    def train_val(ids: list[str], tag: int) -> tuple[list[str], list[str]]:
        if len(ids) < 2:
            raise ValueError(f"need at least 2 cases for a train/val split, got {len(ids)}")
        parts = max(2, round(1.0 / config.val_fraction)) if config.val_fraction > 0 else 2
        val = split_folds(ids, min(parts, len(ids)), seed=config.split_seed + 7919 * (tag + 1))[0]
        return [i for i in ids if i not in set(val)], val

    if config.final:
        train, val = train_val(list(case_ids), -1)
        return [Split("final", None, train, val, [])]
    if config.folds < 2:
        raise ValueError("--folds must be at least 2 (or use --final)")
    subsets = split_folds(case_ids, config.folds, seed=config.split_seed)
    wanted = range(config.folds) if config.fold is None else [config.fold]
    splits = []
    for k in wanted:
        if not 0 <= k < config.folds:
            raise ValueError(f"--fold {k} is outside 0..{config.folds - 1}")
        rest = [i for j, s in enumerate(subsets) if j != k for i in s]
        train, val = train_val(rest, k)
        splits.append(Split(f"fold-{k}", k, train, val, subsets[k]))
    return splits


# --------------------------------------------------------------------------------------------------
# Provenance


def git_commit() -> str | None:
    """The commit of the lungburden source tree, when it is a git checkout."""
    root = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------------------------------
# Loop


def _val_batches(model, cases: list[TrainingCase], per_case: int, micro: int):
    """Fixed validation inputs: with ``forward_sequence`` one slab of ``per_case`` consecutive
    targets per case (centred on a seeded lung slice), else ``per_case`` windows evenly over the
    lung slices. Yields ``(x, y, slab)``."""
    if hasattr(model, "forward_sequence"):
        for i, c in enumerate(cases):
            lab = c.labels.reshape(c.num_slices, -1)
            lung = np.flatnonzero((lab > 0).any(1))
            centre = int(np.random.default_rng(i).choice(lung)) if lung.size else c.num_slices // 2
            (ci, t0, n), = slab_starts(cases, [(i, centre)], per_case)
            x, y = make_slab(c, t0, n, model.context)
            yield x, y, True
        return
    picks = WindowSampler(cases).evenly(per_case)
    for a in range(0, len(picks), micro):
        x, y = make_batch(cases, picks[a:a + micro], model.context)
        yield x, y, False


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; any other name as given (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


def training_precision(requested: str, device: torch.device) -> str:
    """``float32`` or ``bfloat16`` for ``requested`` on ``device``: ``auto`` = bfloat16 on a CPU
    that computes it natively (AMX / AVX512-BF16, where it halves a training step's time) or a
    CUDA GPU that supports it, else float32."""
    requested = requested or "auto"  # never the inference default $LUNGBURDEN_PRECISION
    if device.type == "cuda" and requested_precision(requested) == "auto":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return resolve_precision(requested)


def weight_average(model: torch.nn.Module, decay: float) -> AveragedModel | None:
    """EMA copy of ``model``, updated after each optimiser step: θ_avg ← decay·θ_avg + (1 − decay)·θ
    (its BatchNorm statistics are recomputed before each validation: :func:`refresh_batchnorm`).
    ``None`` for ``decay`` 0.
    ``torch.optim.swa_utils``; Polyak & Juditsky 1992."""
    if decay == 0:
        return None
    if not 0 < decay < 1:
        raise ValueError(f"ema decay must be in (0, 1) or 0 (off), got {decay:g}")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))


def initial_model(config: TrainConfig, hparams: dict[str, Any]) -> torch.nn.Module:
    """The model of ``config.init`` (fine-tuning); its hyperparameters must agree with ``hparams``."""
    from lungburden.segmentation.networks import load_checkpoint

    model, checkpoint = load_checkpoint(config.init)
    if checkpoint["model"] != config.model:
        raise ValueError(f"--init {config.init} holds a {checkpoint['model']} model, not {config.model}")
    differ = {k: (v, model.hparams.get(k)) for k, v in hparams.items() if model.hparams.get(k) != v}
    if differ:
        raise ValueError(f"--init {config.init}: hyperparameters differ from the checkpoint's: "
                         + ", ".join(f"{k}={a} (checkpoint {b})" for k, (a, b) in differ.items()))
    model.train()
    return model


def _validate(model, loss_fn, batches, device: torch.device | None = None,
              precision: str = "float32") -> tuple[float, dict[str, float | None]]:
    """Mean loss and pooled Dice per class over the fixed validation inputs (model grid)."""
    device = device or torch.device("cpu")
    model.eval()
    total, n = 0.0, 0
    tp = np.zeros(L.NUM_CLASSES)
    fp = np.zeros(L.NUM_CLASSES)
    fn = np.zeros(L.NUM_CLASSES)
    lesion = np.zeros(3)
    with torch.no_grad():
        for x, y, slab in batches:
            x, y = x.to(device), y.to(device)
            logits = _network_forward(model, x, bool(slab), precision, device.type).float()
            total += float(loss_fn(logits, y)) * len(y)
            n += len(y)
            pred = logits.argmax(1)
            for c in range(L.NUM_CLASSES):
                p, t = pred == c, y == c
                tp[c] += int((p & t).sum())
                fp[c] += int((p & ~t).sum())
                fn[c] += int((~p & t).sum())
            pl, tl = pred >= L.GGO, y >= L.GGO
            lesion += [int((pl & tl).sum()), int((pl & ~tl).sum()), int((~pl & tl).sum())]

    def d(t: float, f1: float, f2: float) -> float | None:
        return round(float(2 * t / (2 * t + f1 + f2)), 5) if (2 * t + f1 + f2) else None

    dice = {L.LABEL_NAMES[c]: d(tp[c], fp[c], fn[c]) for c in range(1, L.NUM_CLASSES)}
    dice["lesion"] = d(*lesion)
    model.train()
    return total / max(n, 1), dice


#: Optimiser batches of training windows that :func:`refresh_batchnorm` runs through the average.
BN_REFRESH_BATCHES = 2


def _bn_inputs(cases, sampler: WindowSampler, config: TrainConfig, aug: Augmentation, model, epoch: int):
    """Training inputs for the BatchNorm statistics of the weight average: ``BN_REFRESH_BATCHES``
    batches drawn (and augmented) as in training, from a random stream of their own, so the
    training draws are those of a run without averaging."""
    rng = np.random.default_rng([config.seed, 7919, epoch])
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    for _ in range(BN_REFRESH_BATCHES):
        for x, _, _ in _batch_parts(cases, sampler, rng, gen, model, config, aug):
            yield x


def _network_forward(model: torch.nn.Module, x: torch.Tensor, slab: bool, precision: str,
                     device_type: str) -> torch.Tensor:
    """The network's logits under the run's autocast: ``forward_sequence`` of one slab
    (``(n + 2·context, S, S)`` in, ``(n, C, S, S)`` out) when ``slab``, else the window forward."""
    with network_autocast(precision, device_type):
        return model.forward_sequence(x) if slab else model(x)


def refresh_batchnorm(model: torch.nn.Module, inputs, slab: bool, device: torch.device,
                      precision: str = "float32") -> None:
    """Recompute the BatchNorm running statistics of ``model`` as the plain mean over ``inputs``.

    An average of weights that moved fast (Adam at lr 2e-3) is a network whose activations no
    longer match the averaged running statistics; validated with those it segments nothing
    (lung Dice 0.02 after 13 epochs in a trial run). Recomputing them for the averaged weights is
    the step SWA prescribes (``torch.optim.swa_utils.update_bn``, done here with the sequence
    forward of slab training).
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the inputs
    was_training = model.training
    model.train()
    with torch.no_grad():
        for x in inputs:
            x = x.to(device)
            _network_forward(model, x[0] if slab else x, slab, precision, device.type)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)


def _batch_parts(cases, sampler: WindowSampler, rng: np.random.Generator, gen: torch.Generator, model,
                 config: TrainConfig, aug: Augmentation):
    """The micro-batches of one optimiser step, as ``(x, y, weight)`` with weights summing to 1.

    Windows: ``batch`` sampled windows in micro-batches of ``micro_batch``. Slabs: ``batch / slab``
    slabs of ``slab`` consecutive targets, one per micro-batch (``x`` ``(1, n+2c, S, S)``,
    ``y`` ``(1, n, S, S)``); the augmentation is the same for the whole slab.
    """
    slab = config.slab if hasattr(model, "forward_sequence") else 0
    if slab:
        count = max(1, round(config.batch / slab))
        slabs = slab_starts(cases, sampler.sample(count, rng), slab)
        total = sum(n for _, _, n in slabs)
        for ci, t0, n in slabs:
            x, y = make_slab(cases[ci], t0, n, model.context)
            x, y = x[None], y[None]
            if config.augment:
                x, y = augment_batch(x, y, gen, aug)
            yield x, y, n / total
        return
    picks = sampler.sample(config.batch, rng)
    for a in range(0, len(picks), config.micro_batch):
        part = picks[a:a + config.micro_batch]
        x, y = make_batch(cases, part, model.context)
        if config.augment:
            x, y = augment_batch(x, y, gen, aug)
        yield x, y, len(part) / len(picks)


def _say(msg: str, bars: bool) -> None:
    """Epoch and stop lines: always shown (stderr), around the progress bars when they are on."""
    from tqdm import tqdm

    if bars:
        tqdm.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr, flush=True)
    log.info(msg)


def _plain(obj: Any) -> Any:
    """Plain Python types only (checkpoints are read with ``weights_only=True``)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state()}


def train_split(split: Split, index: CaseIndex, config: TrainConfig, data: DataSpec, out_dir: Path,
                cache: CaseCache, started: float | None = None) -> FoldResult:
    """Train one model on ``split`` (see module docstring); returns where its best checkpoint is."""
    from tqdm import tqdm

    from lungburden.segmentation.networks import build_model, save_checkpoint
    from lungburden.training.losses import RMILoss

    out_dir.mkdir(parents=True, exist_ok=True)
    started = started or time.time()
    torch.manual_seed(config.seed + 1000 * (split.fold if split.fold is not None else 99))
    hparams = dict(config.model_hparams)
    if config.size:
        hparams["input_size"] = config.size
    device = resolve_device(config.device)
    if config.init:
        model = initial_model(config, hparams)
        hparams = dict(model.hparams)
    else:
        model = build_model(config.model, **hparams)
    size = int(model.input_size)
    if cache.size != size:
        cache = CaseCache(cache.directory, size)
    # One call for both (with --workers: one process pool, not two).
    cases = load_training_cases(index, [*split.train, *split.val], cache, config.progress, config.workers)
    train_cases, val_cases = cases[:len(split.train)], cases[len(split.train):]
    model.to(device)
    loss_fn = RMILoss(num_classes=L.NUM_CLASSES, lambda_ce=config.lambda_ce)
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    elif config.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r} (sgd or adam)")
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=config.plateau_factor,
                                                           patience=config.plateau_patience)
    sampler = WindowSampler(train_cases, high_opacity_boost=config.high_opacity_boost)
    precision = training_precision(config.precision, device)
    averaged = weight_average(model, config.ema_decay)
    evaluated = averaged.module if averaged is not None else model  # what is validated and saved
    history: list[EpochRecord] = []
    best_loss, best_epoch, epoch = math.inf, 0, 0
    best_state: dict[str, torch.Tensor] | None = None
    state_path = out_dir / "state.pt"
    if config.resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state.get("model") != config.model or state.get("split_train") != split.train:
            raise ValueError(f"{state_path}: the saved run has another model or split; not resuming")
        model.load_state_dict(state["model_state"])
        if averaged is not None:
            if "average_state" not in state:
                raise ValueError(f"{state_path}: the saved run has no weight average (--ema-decay); not resuming")
            averaged.load_state_dict(state["average_state"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        history = [EpochRecord(**h) for h in state["history"]]
        best_loss, best_epoch, epoch = state["best_loss"], state["best_epoch"], state["epoch"]
        best_state = state.get("best_state")
        log.info("resumed %s at epoch %d (lr %.1e)", split.name, epoch, optimizer.param_groups[0]["lr"])
    slab = config.slab if hasattr(model, "forward_sequence") else 0
    if config.slab and not slab:
        log.warning("model %s has no forward_sequence; training on independent windows", config.model)
    steps = max(1, config.windows_per_epoch // config.batch)
    aug = Augmentation()
    stop_reason = ""

    def lr_now() -> float:
        return float(optimizer.param_groups[0]["lr"])

    def metadata(kind: str) -> dict[str, Any]:
        last = history[-1] if history else None
        return _plain({
            "kind": kind,
            "command": " ".join(shlex.quote(a) for a in sys.argv),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "lungburden_version": __version__,
            "host": f"{platform.node()} {platform.processor() or platform.machine()}, "
                    f"{torch.get_num_threads()} threads"
                    + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
            "precision": precision,
            "config": config.to_dict(),
            "data": data.to_dict(),
            "split": {"name": split.name, "fold": split.fold, "train": split.train, "val": split.val,
                      "test": split.test},
            "epochs": epoch,
            "best_epoch": best_epoch,
            "best_val_loss": None if math.isinf(best_loss) else round(best_loss, 6),
            "final_lr": lr_now(),
            "stop_reason": stop_reason,
            "val_dice": (history[best_epoch - 1].val_dice if kind == "best" and best_epoch
                         else last.val_dice if last else None),
            "history": [dataclasses.asdict(h) for h in history],
            "training_seconds": round(sum(h.seconds for h in history), 1),
        })

    model.train()
    while True:
        if lr_now() <= config.stop_lr * (1 + 1e-6):
            stop_reason = f"learning rate reached {config.stop_lr:g}"
            break
        if config.max_epochs is not None and epoch >= config.max_epochs:
            stop_reason = f"max epochs {config.max_epochs}"
            break
        if config.time_budget_min is not None and time.time() - started > 60 * config.time_budget_min:
            stop_reason = f"time budget {config.time_budget_min:g} min"
            break
        t0 = time.time()
        rng = np.random.default_rng([config.seed, split.fold if split.fold is not None else 99, epoch])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        running, seen = 0.0, 0
        bar = tqdm(range(steps), desc=f"{split.name} epoch {epoch + 1}", unit="batch", leave=False,
                   disable=not config.progress)
        for _ in bar:
            optimizer.zero_grad(set_to_none=True)
            for part_x, part_y, weight in _batch_parts(train_cases, sampler, rng, gen, model, config, aug):
                part_x = part_x.to(device, non_blocking=True)
                part_y = part_y.to(device, non_blocking=True)
                logits = _network_forward(model, part_x[0] if slab else part_x, bool(slab), precision, device.type)
                loss = loss_fn(logits.float(), part_y[0] if slab else part_y)
                (loss * weight).backward()
                running += loss.item() * weight * config.batch
                seen += weight * config.batch
            optimizer.step()
            if averaged is not None:
                averaged.update_parameters(model)
            bar.set_postfix(loss=f"{running / max(seen, 1):.4f}", lr=f"{lr_now():.0e}")
        if averaged is not None:
            refresh_batchnorm(evaluated, _bn_inputs(train_cases, sampler, config, aug, model, epoch),
                              slab=bool(slab), device=device, precision=precision)
        val_batches = _val_batches(evaluated, val_cases, config.val_windows_per_case, config.micro_batch)
        val_loss, val_dice = _validate(evaluated, loss_fn, val_batches, device, precision)
        scheduler.step(val_loss)
        epoch += 1
        record = EpochRecord(epoch, round(running / max(seen, 1), 6), round(val_loss, 6), val_dice, lr_now(),
                             round(time.time() - t0, 2))
        history.append(record)
        improved = val_loss < best_loss
        if improved:
            best_loss, best_epoch = val_loss, epoch
            best_state = {k: v.detach().cpu().clone() for k, v in evaluated.state_dict().items()}
        dice_text = " ".join(f"{k}={'-' if v is None else f'{v:.3f}'}" for k, v in val_dice.items())
        msg = (f"{split.name} epoch {epoch}: train {record.train_loss:.4f} val {val_loss:.4f} "
               f"[{dice_text}] lr {lr_now():.0e} {record.seconds:.0f}s{' *' if improved else ''}")
        _say(msg, config.progress)
        save_checkpoint(out_dir / "last.pt", evaluated, metadata("last"))
        if improved:
            save_checkpoint(out_dir / "best.pt", evaluated, metadata("best"))
        tmp = state_path.with_name("state.pt.tmp")
        torch.save({"model": config.model, "split_train": split.train, "model_state": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                    "history": [dataclasses.asdict(h) for h in history], "best_loss": best_loss,
                    "best_epoch": best_epoch, "best_state": best_state, "epoch": epoch,
                    **({"average_state": averaged.state_dict()} if averaged is not None else {})}, tmp)
        os.replace(tmp, state_path)
        (out_dir / "history.json").write_text(json.dumps([dataclasses.asdict(h) for h in history], indent=1))
    # Record the stop reason in both checkpoints (weights unchanged).
    save_checkpoint(out_dir / "last.pt", evaluated, metadata("last"))
    best_model = evaluated
    if best_state is not None:
        best_model = build_model(config.model, **hparams)
        best_model.load_state_dict(best_state)
    save_checkpoint(out_dir / "best.pt", best_model, metadata("best"))
    msg = f"{split.name}: stopped after {epoch} epochs ({stop_reason}); best epoch {best_epoch}"
    _say(msg, config.progress)
    return FoldResult(split, out_dir, out_dir / "best.pt", epoch, best_epoch, best_loss, lr_now(), stop_reason,
                      history)


def run_training(config: TrainConfig, data: DataSpec, out: Path, cache_dir: Path | None) -> list[FoldResult]:
    """Train the folds (or the final model) of ``config`` on the cases of ``data`` under ``out``."""
    if config.threads:
        torch.set_num_threads(config.threads)
    index = CaseIndex(data.build_sources())
    splits = make_splits(index.ids(), config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from lungburden.segmentation.preprocess import DEFAULT_SIZE

    cache = CaseCache(cache_dir, config.size or DEFAULT_SIZE)
    (out / "splits.json").write_text(json.dumps([dataclasses.asdict(s) for s in splits], indent=1))
    results = []
    for split in splits:
        results.append(train_split(split, index, config, data, out / split.name, cache))
    summary = [{"split": r.split.name, "checkpoint": str(r.best_checkpoint), "epochs": r.epochs,
                "best_epoch": r.best_epoch, "best_val_loss": r.best_val_loss, "final_lr": r.final_lr,
                "stop_reason": r.stop_reason, "val_dice": r.history[-1].val_dice if r.history else None}
               for r in results]
    (out / "training.json").write_text(json.dumps({"config": config.to_dict(), "data": data.to_dict(),
                                                   "results": summary}, indent=1))
    return results
