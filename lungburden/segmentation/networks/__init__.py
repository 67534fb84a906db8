"""Segmentation networks: the paper's ConvLSTM model and the UNet2D/UNet3D baselines of Table 4.

Uniform training interface (one harness trains all three)
---------------------------------------------------------
``model = build_model(name, **hparams)`` with ``name`` in :data:`MODEL_NAMES`. Every model has

* ``model.context: int`` — slices needed on each side of the target (convlstm 5, unet2d 0,
  unet3d 2 by default);
* ``model.input_size: int`` — S, the in-plane size the preprocessing must produce
  (:func:`lungburden.segmentation.preprocess.preprocess` with ``size=model.input_size``);
* ``model.num_classes: int`` and ``model.hparams: dict`` (the constructor arguments, saved in
  checkpoints);
* ``model(x)``: ``x`` float32 ``(B, 2·context+1, S, S)`` in [0, 1] (a window of consecutive
  preprocessed slices, target in the middle, edges replicated as in
  :func:`~lungburden.segmentation.preprocess.window_indices`) → logits ``(B, num_classes, S, S)``
  of the target slice. Train with :class:`lungburden.training.losses.RMILoss` on these logits.

The ConvLSTM model also has ``forward_sequence(stack)``: consecutive slices
``(n + 2·context, S, S)`` → logits of the ``n`` interior slices, sharing per-slice work between
windows (fast inference; also a cheap way to train on contiguous slabs).

Checkpoint format (:func:`save_checkpoint` / :func:`load_checkpoint`): a ``torch.save`` dict ::

    {"format": "lungburden-model", "format_version": 1,
     "model": "convlstm", "hparams": {...constructor kwargs...},
     "state_dict": {...}, "class_names": ["background", "lung", "ggo", "high_opacity"],
     "preprocessing": {"size": S, "hu_window": [-1024, 600], "crop": "body", "edge": "replicate"},
     "metadata": {...free-form training record: data, epochs, metrics, date, git commit...},
     "lungburden_version": "...", "torch_version": "..."}

An ensemble (:class:`ConvLSTMEnsemble`, model ``"convlstm_ensemble"``) is a checkpoint of the
same format whose ``hparams`` are ``{"members": [member hparams, ...], "num_classes": C}`` and whose
state dict holds ``members.K.*``; its ``metadata["members"]`` keeps each member's own training
record.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lungburden import __version__
from lungburden.labels import LABEL_NAMES, NUM_CLASSES

from .convlstm import ConvLSTMSegNet
from .ensemble import ConvLSTMEnsemble
from .unet import UNet2D, UNet3D

#: Models ``lungburden model train`` can train; an ensemble is assembled from trained ones
#: (``lungburden model ensemble``).
MODEL_NAMES = ("convlstm", "unet2d", "unet3d")
CHECKPOINT_FORMAT = "lungburden-model"
CHECKPOINT_VERSION = 1
_CLASSES: dict[str, type[nn.Module]] = {"convlstm": ConvLSTMSegNet, "unet2d": UNet2D, "unet3d": UNet3D,
                                        ConvLSTMEnsemble.name: ConvLSTMEnsemble}

__all__ = ["MODEL_NAMES", "ConvLSTMEnsemble", "ConvLSTMSegNet", "UNet2D", "UNet3D", "build_model", "count_parameters",
           "load_checkpoint", "save_checkpoint", "write_checkpoint"]


def build_model(name: str, **hparams: Any) -> nn.Module:
    """Instantiate model ``name`` ("convlstm", "unet2d", "unet3d", or "convlstm_ensemble" from a
    checkpoint) with constructor ``hparams``."""
    try:
        cls = _CLASSES[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(_CLASSES)}") from None
    hparams.setdefault("num_classes", NUM_CLASSES)
    return cls(**hparams)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module,
                    metadata: dict[str, Any] | None = None) -> None:
    """Write ``model`` (built by :func:`build_model`) with its hyperparameters and class names.

    Written atomically (temporary file + rename). ``metadata`` is a free-form, ``torch.load``-safe
    dict (plain str/int/float/list/dict) describing the training run.
    """
    name = getattr(model, "name", None)
    if name not in _CLASSES:
        raise ValueError("model was not built by build_model (no known .name)")
    num_classes = int(model.num_classes)  # type: ignore[arg-type]
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "model": name,
        "hparams": dict(model.hparams),  # type: ignore[arg-type]
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "class_names": [LABEL_NAMES.get(i, f"class{i}") for i in range(num_classes)],
        "preprocessing": {"size": int(model.input_size), "hu_window": [-1024.0, 600.0],  # type: ignore[arg-type]
                          "crop": "body", "edge": "replicate"},
        "metadata": dict(metadata or {}),
        "lungburden_version": __version__,
        "torch_version": str(torch.__version__),
    }
    write_checkpoint(path, checkpoint)


def write_checkpoint(path: str | os.PathLike[str], checkpoint: dict[str, Any]) -> None:
    """Write a checkpoint dict atomically (temporary file + rename), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint` → ``(model in eval mode, checkpoint dict)``.

    Loads with ``weights_only=True`` (no code execution from the file). Raises ``FileNotFoundError``
    or ``ValueError`` with the path in the message.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint {path} not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ValueError(f"model checkpoint {path} is unreadable: {exc}") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a lungburden model checkpoint")
    if int(checkpoint.get("format_version", 0)) > CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {checkpoint['format_version']} is newer than "
                         f"this lungburden ({CHECKPOINT_VERSION})")
    model = build_model(checkpoint["model"], **checkpoint["hparams"])
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    return model, checkpoint
