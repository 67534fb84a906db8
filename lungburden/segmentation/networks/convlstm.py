"""The ConvLSTM segmentation network of the paper (section 2.5, Fig. 2).

Structure (S = ``input_size``; shipped configuration ``levels=1, lstm_pool=4``)::

    slice t ──► stem (2×2 space-to-depth + 3×3 conv) ──► P_t (S/2) ──► dense block ──► F_t (S/2)
    main branch:      F_target ──► segmentation head ──► S_main                        (S/2)
    attention branch: W_x * avgpool(F_{t-5}) … W_x * avgpool(F_{t+5}) ──► ConvLSTM, 11 steps (S/8)
                      final hidden state h ──► segmentation head ──► S_attn
                      h ──► attention head (segmentation head + sigmoid) ──► α
    fusion (eq. 1):   S_out = S_main · α + S_attn · (1 − α)      (S_attn, α upsampled to S/2)
    output (S):       bilinear ×2 of S_out + sub-pixel refinement from [S_out, P_target]

With ``levels=L > 1`` the dense block becomes a :class:`DenseEncoder` of dense blocks at S/2 …
S/2^L with an upsampling path back to S/2, and the ConvLSTM reads the deepest block (measured in
docs/model-development.md: better on phantoms, worse on the real study, not shipped).

Choices (measurements in docs/model-development.md):

* One per-slice encoder feeds both branches: the main branch is "a dense block followed by a
  segmentation head" on the target slice, and the ConvLSTM reads the (deepest) dense-block
  features of the 11 slices. The encoder and the input-to-hidden half of the ConvLSTM gate
  convolution are per slice, so inference computes them once per slice instead of 11 times
  (:meth:`ConvLSTMSegNet.forward_sequence`).
* The stem is a lossless stride 2 (space-to-depth keeps every pixel as a channel), the dense
  block runs at S/2 and the ConvLSTM at S/8 (``lstm_pool=4``): it supplies slice context and the
  attention map, which need no fine detail (as the low-scale attention of hierarchical multi-scale
  attention), and its recurrence is the only per-target cost that grows with the 11 slices.
* Output resolution bounds the achievable Dice (docs/model-development.md), so the logits are brought back
  to S by a sub-pixel refinement (ESPCN-style: a conv at S/2 emits the 2×2 sub-pixels of each
  class, then pixel shuffle) reading the fused logits and the stem features, which hold the
  full-resolution pixels.
* No ImageNet weights (section 2.6 uses them for the dense block): they need 3-channel input, are
  large and not reachable here; everything is Kaiming-initialised.
* The attention map has one channel (as in hierarchical multi-scale attention, the paper's
  ref. 24) shared by all classes; ``attention_channels=num_classes`` gives one per class.
* Activations are channels-last (NHWC) inside the network: oneDNN convolutions are about 2×
  faster on CPU in that layout; the LSTM state is kept NCHW, where the gate arithmetic is fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lungburden.segmentation.preprocess import DEFAULT_SIZE

_CL = torch.channels_last


def conv_bn_act(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3×3 conv → BatchNorm → LeakyReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.LeakyReLU(0.01, inplace=True))


class SegmentationHead(nn.Sequential):
    """Section 2.5: [3×3 conv, BatchNorm, LeakyReLU] × 2, then a 1×1 conv (+ sigmoid: attention head)."""

    def __init__(self, cin: int, width: int, cout: int, sigmoid: bool = False):
        layers: list[nn.Module] = [conv_bn_act(cin, width), conv_bn_act(width, width),
                                   nn.Conv2d(width, cout, 1)]
        if sigmoid:
            layers.append(nn.Sigmoid())
        super().__init__(*layers)


class DenseBlock(nn.Module):
    """DenseNet block (Huang et al. 2017): each layer adds ``growth`` channels computed from the
    concatenation of the block input and all earlier layer outputs; a 1×1 transition sets the
    output width. Layers are conv → BN → ReLU (post-activation), so each new feature map is
    normalised once rather than once per later layer as in DenseNet's BN → ReLU → conv: cheaper
    on CPU, same connectivity."""

    def __init__(self, cin: int, growth: int, layers: int, cout: int, dilated: bool = False):
        super().__init__()
        dil = [2**i if dilated else 1 for i in range(layers)]
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin + i * growth, growth, 3, padding=dil[i], dilation=dil[i], bias=False),
                          nn.BatchNorm2d(growth), nn.ReLU(inplace=True))
            for i in range(layers)
        )
        total = cin + layers * growth
        self.transition = nn.Sequential(nn.Conv2d(total, cout, 1, bias=False), nn.BatchNorm2d(cout),
                                        nn.LeakyReLU(0.01, inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1) if len(feats) > 1 else x))
        return self.transition(torch.cat(feats, 1))


class ConvLSTMCell(nn.Module):
    """Convolutional LSTM cell (Shi et al. 2015) with the gate convolution split in two halves.

    ``gates = W_x * x_t + W_h * h_{t-1} + b``: :meth:`input_gates` (``W_x * x_t + b``) depends on
    one slice only, so inference computes it once per slice and shares it between the 11 windows
    containing that slice; :meth:`step` adds ``W_h * h_{t-1}`` and applies the LSTM update.
    """

    def __init__(self, cin: int, hidden: int, kernel: int = 3):
        super().__init__()
        self.hidden = hidden
        self.x2h = nn.Conv2d(cin, 4 * hidden, kernel, padding=kernel // 2, bias=True)
        self.h2h = nn.Conv2d(hidden, 4 * hidden, kernel, padding=kernel // 2, bias=False)

    def input_gates(self, x: torch.Tensor) -> torch.Tensor:
        """``W_x * x + b`` as a contiguous NCHW tensor (gate order i, f, o, g)."""
        return self.x2h(x).contiguous()

    def step(self, xg: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One time step from precomputed input gates ``xg``; ``state=None`` is the zero state."""
        if state is None:
            gates = xg
        else:  # conv in NHWC (fast), gate arithmetic in NCHW (contiguous chunks)
            gates = self.h2h(state[0].contiguous(memory_format=_CL)).contiguous() + xg
        h = self.hidden
        ifo = torch.sigmoid(gates[:, :3 * h])
        g = torch.tanh(gates[:, 3 * h:])
        i, f, o = ifo[:, :h], ifo[:, h:2 * h], ifo[:, 2 * h:]
        c = i * g if state is None else torch.addcmul(i * g, f, state[1])
        return o * torch.tanh(c), c


class DenseEncoder(nn.Module):
    """Per-slice encoder: lossless stride-2 stem, then ``levels`` dense blocks at S/2, S/4, … each
    after a 2×2 average pooling, and an upsampling path that brings the deepest features back to
    S/2 through the skips of every level (the fully convolutional DenseNet of Jégou et al. 2017,
    lightened: one [3×3 conv, BN, LeakyReLU] per level on the way up).

    ``levels=1`` is the single dense block of section 2.5 at S/2. More levels widen the receptive
    field (at ``levels=3`` the deepest block sees most of a 160-px slice), which is what tells a
    consolidation or an effusion from the chest wall it touches (same HU; docs/model-development.md).
    Channels: ``features·(2+i)/2`` at level ``i`` (32, 48, 64 for ``features=32``).

    Returns ``(stem, feats, deep)``: stem output (S/2), decoded features (S/2, ``features`` ch) and
    the deepest block's output (S/2^levels), which feeds the ConvLSTM.
    """

    def __init__(self, width: int, growth: int, dense_layers: int, features: int, levels: int, dilated: bool):
        super().__init__()
        self.channels = [features * (2 + i) // 2 for i in range(levels)]
        self.stem = conv_bn_act(4, width)
        cins = [width, *self.channels[:-1]]
        self.blocks = nn.ModuleList(DenseBlock(cin, growth, dense_layers, cout, dilated and i == levels - 1)
                                    for i, (cin, cout) in enumerate(zip(cins, self.channels, strict=True)))
        self.up = nn.ModuleList(conv_bn_act(self.channels[i + 1] + self.channels[i], self.channels[i])
                                for i in range(levels - 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        stem = self.stem(F.pixel_unshuffle(x, 2).contiguous(memory_format=_CL))
        skips = []
        h = stem
        for i, block in enumerate(self.blocks):
            h = block(F.avg_pool2d(h, 2) if i else h)
            skips.append(h)
        deep = h
        for i in reversed(range(len(self.up))):
            h = F.interpolate(h, size=skips[i].shape[-2:], mode="bilinear", align_corners=False)
            h = self.up[i](torch.cat([h, skips[i]], 1))
        return stem, h, deep


@dataclass
class SliceFeatures:
    """Per-slice results shared between windows (see :meth:`ConvLSTMSegNet.encode`)."""

    stem: torch.Tensor  #: stem output P, (n, width, S/2, S/2)
    feats: torch.Tensor  #: dense-block features F, (n, features, S/2, S/2)
    gates: torch.Tensor  #: ConvLSTM input gates W_x * pool(F) + b, (n, 4·hidden, S/(2·lstm_pool), …)

    def __getitem__(self, index: slice) -> SliceFeatures:
        return SliceFeatures(self.stem[index], self.feats[index], self.gates[index])

    def __len__(self) -> int:
        return int(self.gates.shape[0])

    @staticmethod
    def cat(parts: list[SliceFeatures]) -> SliceFeatures:
        return SliceFeatures(torch.cat([p.stem for p in parts]), torch.cat([p.feats for p in parts]),
                             torch.cat([p.gates for p in parts]))


class ConvLSTMSegNet(nn.Module):
    """Two-branch ConvLSTM network (section 2.5): ``(B, 2·context+1, S, S)`` → ``(B, C, S, S)``.

    Hyperparameters: ``num_classes``; ``context`` (slices each side, paper 5); ``input_size`` (S of
    the preprocessing; the network is fully convolutional but S must be a multiple of
    ``2^levels·lstm_pool``); ``width`` (stem channels at S/2), ``growth`` and ``dense_layers``
    (each dense block), ``features`` (encoder output at S/2), ``levels`` (scales of the
    :class:`DenseEncoder`; 1 = the single dense block), ``hidden`` (ConvLSTM state channels),
    ``head_width`` (segmentation/attention heads), ``lstm_pool`` (extra pooling of the deepest
    features before the ConvLSTM), ``attention_channels`` (1 or num_classes), ``refine``
    (channels of the sub-pixel refinement; 0 = plain bilinear upsampling of the fused logits),
    ``dilated`` (dilations 1, 2, 4, … in the deepest dense block).
    """

    name = "convlstm"

    def __init__(self, num_classes: int = 4, context: int = 5, input_size: int = DEFAULT_SIZE, width: int = 16,
                 growth: int = 16, dense_layers: int = 4, features: int = 32, levels: int = 1, hidden: int = 16,
                 head_width: int = 16, lstm_pool: int = 4, attention_channels: int = 1, refine: int = 16,
                 dilated: bool = False):
        super().__init__()
        stride = 2 ** levels * lstm_pool
        if input_size % stride:
            raise ValueError(f"input_size {input_size} must be a multiple of {stride}")
        self.hparams = dict(num_classes=num_classes, context=context, input_size=input_size, width=width,
                            growth=growth, dense_layers=dense_layers, features=features, levels=levels,
                            hidden=hidden, head_width=head_width, lstm_pool=lstm_pool,
                            attention_channels=attention_channels, refine=refine, dilated=dilated)
        self.num_classes = num_classes
        self.context = context
        self.input_size = input_size
        self.lstm_pool = lstm_pool
        self.encoder = DenseEncoder(width, growth, dense_layers, features, levels, dilated)
        self.main_head = SegmentationHead(features, head_width, num_classes)
        self.lstm = ConvLSTMCell(self.encoder.channels[-1], hidden)
        self.attn_seg_head = SegmentationHead(hidden, head_width, num_classes)
        self.attn_head = SegmentationHead(hidden, head_width, attention_channels, sigmoid=True)
        self.refine = (nn.Sequential(conv_bn_act(num_classes + width, refine),
                                     nn.Conv2d(refine, 4 * num_classes, 1))
                       if refine else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming He initialisation (section 2.6); LSTM forget-gate bias 1."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0.01, mode="fan_out", nonlinearity="leaky_relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            h = self.lstm.hidden
            self.lstm.x2h.bias[h:2 * h].fill_(1.0)

    # -- building blocks shared by the training forward and the fast inference path ------------
    def encode(self, x: torch.Tensor) -> SliceFeatures:
        """Per-slice work on ``x`` ``(n, 1, S, S)``: encoder, ConvLSTM input gates."""
        stem, feats, deep = self.encoder(x)
        lstm_in = F.avg_pool2d(deep, self.lstm_pool) if self.lstm_pool > 1 else deep
        return SliceFeatures(stem=stem, feats=feats, gates=self.lstm.input_gates(lstm_in))

    def recur(self, gates_at: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """Run the ConvLSTM over the ``2·context+1`` steps (top to bottom); ``gates_at(t)`` gives
        step ``t`` of every window, batched. Returns the final hidden state (the paper's output)."""
        state = None
        for t in range(2 * self.context + 1):
            state = self.lstm.step(gates_at(t), state)
        assert state is not None
        return state[0].contiguous(memory_format=_CL)

    def decode(self, stem: torch.Tensor, feats: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Main head, attention-branch heads, fusion (eq. 1) and output at S, for the targets."""
        s_main = self.main_head(feats)
        s_attn = self.attn_seg_head(hidden)
        alpha = self.attn_head(hidden)
        if s_attn.shape[-1] != s_main.shape[-1]:
            s_attn = F.interpolate(s_attn, size=s_main.shape[-2:], mode="bilinear", align_corners=False)
            alpha = F.interpolate(alpha, size=s_main.shape[-2:], mode="bilinear", align_corners=False)
        fused = s_main * alpha + s_attn * (1.0 - alpha)
        out = F.interpolate(fused, scale_factor=2.0, mode="bilinear", align_corners=False)
        if self.refine is not None:
            out = out + F.pixel_shuffle(self.refine(torch.cat([fused, stem], 1)), 2)
        return out

    # -- public forwards -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training interface: windows ``(B, 2·context+1, S, S)`` → target logits ``(B, C, S, S)``."""
        if x.dim() != 4 or x.shape[1] != 2 * self.context + 1:
            raise ValueError(f"expected windows (B, {2 * self.context + 1}, S, S), got {tuple(x.shape)}")
        return self.forward_slabs(x)[:, 0]

    def forward_slabs(self, x: torch.Tensor) -> torch.Tensor:
        """Slabs of consecutive slices ``(B, L, S, S)`` → logits of their ``n = L − 2·context``
        interior slices ``(B, n, C, S, S)``, every slice encoded once.

        Window ``i`` of a slab is slices ``i … i+2·context``; step ``t`` of all windows is slices
        ``t … t+n−1``, so all windows advance together in one batched convolution. A batch of
        windows is the case ``L = 2·context+1``.
        """
        b, length, h, w = x.shape
        c = self.context
        n = length - 2 * c
        if n <= 0:
            raise ValueError(f"need more than {2 * c} slices per slab, got {length}")
        enc = self.encode(x.reshape(b * length, 1, h, w))
        if b == 1:
            out = self.forward_features(enc)
        else:
            # Per-slice tensors; step t stacks slice t+i of every slab (autograd-friendly: the
            # backward of unbind/stack is one copy, where slicing would zero-fill per step).
            gates = enc.gates.unflatten(0, (b, length)).unbind(1)
            hidden = self.recur(lambda t: torch.stack(gates[t:t + n], 1).flatten(0, 1))

            def targets(t: torch.Tensor) -> torch.Tensor:
                return t.unflatten(0, (b, length))[:, c:c + n].flatten(0, 1)

            out = self.decode(targets(enc.stem), targets(enc.feats), hidden)
        return out.view(b, n, self.num_classes, h, w)

    def forward_features(self, enc: SliceFeatures) -> torch.Tensor:
        """Logits ``(n, C, S, S)`` of the interior slices of ``n + 2·context`` consecutive encoded
        slices (the chunked inference path: step ``t`` of all windows is a view ``gates[t:t+n]``)."""
        c = self.context
        n = len(enc) - 2 * c
        if n <= 0:
            raise ValueError(f"need more than {2 * c} slices, got {len(enc)}")
        hidden = self.recur(lambda t: enc.gates[t:t + n])
        return self.decode(enc.stem[c:c + n], enc.feats[c:c + n], hidden)

    def forward_sequence(self, stack: torch.Tensor) -> torch.Tensor:
        """Consecutive slices ``(n + 2·context, S, S)`` (already context-padded) → ``(n, C, S, S)``."""
        return self.forward_slabs(stack[None])[0]
