"""A logit-averaging ensemble of ConvLSTM networks (docs/model-development.md, "Ensembles").

Each member is a trained :class:`~.convlstm.ConvLSTMSegNet` (section 2.5), possibly of different
widths or depths, sharing ``num_classes``, ``context`` and ``input_size`` so one preprocessing
(section 2.4) and one window rule serve all. The ensemble's logits are the mean of the members'
logits (a "deep ensemble", Lakshminarayanan et al. 2017, averaged before the argmax), so every
downstream step — decision offsets, argmax on the source grid, label finishing — is unchanged.

It offers the members' fast inference interface (:meth:`encode` / :meth:`forward_features`, each
slice encoded once per member), so the segmenter's chunked path runs it as it runs one network;
memory grows by the members' per-slice features only. It is assembled from trained checkpoints
(``lungburden model ensemble``), never trained as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .convlstm import ConvLSTMSegNet, SliceFeatures


@dataclass
class EnsembleFeatures:
    """One :class:`SliceFeatures` per member for the same slices (sliced and joined together)."""

    members: tuple[SliceFeatures, ...]

    def __getitem__(self, index: slice) -> EnsembleFeatures:
        return EnsembleFeatures(tuple(m[index] for m in self.members))

    def __len__(self) -> int:
        return len(self.members[0])

    @staticmethod
    def cat(parts: list[EnsembleFeatures]) -> EnsembleFeatures:
        return EnsembleFeatures(tuple(SliceFeatures.cat([p.members[i] for p in parts])
                                      for i in range(len(parts[0].members))))


class ConvLSTMEnsemble(nn.Module):
    """Mean of the logits of ``members`` (hyperparameter dicts of :class:`ConvLSTMSegNet`)."""

    name = "convlstm_ensemble"

    def __init__(self, members: list[dict[str, Any]], num_classes: int | None = None):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
        nets = [ConvLSTMSegNet(**dict(h)) for h in members]
        for key in ("num_classes", "context", "input_size"):
            values = {getattr(n, key) for n in nets}
            if len(values) > 1:
                raise ValueError(f"ensemble members differ in {key}: {sorted(values)}")
        if num_classes is not None and num_classes != nets[0].num_classes:
            raise ValueError(f"num_classes {num_classes} does not match the members' {nets[0].num_classes}")
        self.members = nn.ModuleList(nets)
        self.num_classes = nets[0].num_classes
        self.context = nets[0].context
        self.input_size = nets[0].input_size
        self.hparams = {"members": [dict(n.hparams) for n in nets], "num_classes": self.num_classes}

    @classmethod
    def from_models(cls, models: list[nn.Module]) -> ConvLSTMEnsemble:
        """An ensemble holding copies of the trained ``models``' weights."""
        for model in models:
            if not isinstance(model, ConvLSTMSegNet):
                raise ValueError(f"ensemble members must be ConvLSTM networks, got {type(model).__name__}")
        ensemble = cls([dict(m.hparams) for m in models])
        for member, model in zip(ensemble.members, models, strict=True):
            member.load_state_dict(model.state_dict())
        return ensemble.eval()

    def _mean(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """Mean in float32 (under bfloat16 autocast the members' logits are bfloat16)."""
        return torch.stack([o.float() for o in outputs]).mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Windows ``(B, 2·context+1, S, S)`` → mean target logits ``(B, C, S, S)``."""
        return self._mean([m(x) for m in self.members])

    def encode(self, x: torch.Tensor) -> EnsembleFeatures:
        """Per-slice work of every member on ``x`` ``(n, 1, S, S)``."""
        return EnsembleFeatures(tuple(m.encode(x) for m in self.members))

    def forward_features(self, enc: EnsembleFeatures) -> torch.Tensor:
        """Mean logits ``(n, C, S, S)`` of the interior slices (see
        :meth:`ConvLSTMSegNet.forward_features`)."""
        return self._mean([m.forward_features(f) for m, f in zip(self.members, enc.members, strict=True)])
