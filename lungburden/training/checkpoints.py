"""Checkpoints for shipping: export of a trained network and logit-averaging ensembles
(``lungburden model train --export``, ``lungburden model ensemble``; docs/training.md)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def refuse_oversized(path: Path, max_mb: float, name: str) -> None:
    """ValueError naming ``name`` when the checkpoint at ``path`` is over ``max_mb`` (shipped weights)."""
    size_mb = path.stat().st_size / 2**20
    if size_mb > max_mb:
        raise ValueError(f"{name} is {size_mb:.1f} MB, over the {max_mb:g} MB limit of shipped weights")


def export_checkpoint(src: Path, dst: Path, max_mb: float = 20.0) -> None:
    """Copy a checkpoint to the shipped weights location, refusing files over ``max_mb``; the copy
    is staged beside ``dst`` and moved into place, so an interrupted export leaves no partial file."""
    refuse_oversized(src, max_mb, str(src))
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        staged = Path(tmp) / dst.name
        shutil.copyfile(src, staged)
        os.replace(staged, dst)


def build_ensemble(members: list[Path], out: Path, max_mb: float = 20.0) -> Path:
    """Write a :class:`~lungburden.segmentation.networks.ConvLSTMEnsemble` checkpoint of the trained
    ConvLSTM checkpoints ``members`` (docs/model-development.md, "Ensembles").

    Each member's file name, SHA-256 and training record go into ``metadata["members"]``, and the
    union of their training and validation cases into ``metadata["split"]`` (so that
    ``lungburden model calibrate`` refuses those cases for the ensemble as for one network). Staged
    next to ``out`` and moved into place (atomic); refuses files over ``max_mb``.
    """
    import shlex

    from lungburden.segmentation.convlstm import file_sha256
    from lungburden.segmentation.networks import ConvLSTMEnsemble, load_checkpoint, save_checkpoint
    from lungburden.training.trainer import git_commit

    models, records = [], []
    train: set[str] = set()
    val: set[str] = set()
    for path in members:
        model, checkpoint = load_checkpoint(path)
        if checkpoint.get("calibration"):
            raise ValueError(f"{path} carries decision offsets (calibration); ensemble uncalibrated members "
                             "and calibrate the ensemble instead")
        models.append(model)
        meta = checkpoint.get("metadata") or {}
        split = meta.get("split") or {}
        train.update(split.get("train", []))
        val.update(split.get("val", []))
        records.append({"file": path.name, "sha256": file_sha256(path), "model": checkpoint["model"],
                        "metadata": meta})
    ensemble = ConvLSTMEnsemble.from_models(models)
    metadata = {"command": " ".join(shlex.quote(a) for a in sys.argv),
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": git_commit(),
                "combination": "mean of the members' logits", "members": records,
                "split": {"name": "union of the members' splits", "train": sorted(train), "val": sorted(val)}}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        save_checkpoint(staged, ensemble, metadata)
        refuse_oversized(staged, max_mb, "the ensemble")
        os.replace(staged, out)
    return out
