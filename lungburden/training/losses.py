"""Region Mutual Information loss (Zhao, Wang, Cai & He, NeurIPS 2019), the paper's cost (section 2.6).

RMI treats each pixel together with its ``R × R`` neighbourhood as a ``d = R²``-dimensional
point, so the loss sees the joint structure of a region instead of independent pixels. For one
class of one image, let ``Y`` be the neighbourhood vectors of the one-hot ground truth and ``P``
those of the predicted probabilities (both ``d × N``, over the ``N`` positions). Modelling them
as jointly Gaussian, the mutual information is bounded below by (RMI paper eq. 8-11)

    I(Y; P) ≥ −½ · log det(Σ_Y|P) + const,   Σ_Y|P = Σ_Y − Σ_YP · Σ_P⁻¹ · Σ_YPᵀ

(the posterior covariance of Y given P). The RMI term minimised here is
``½ · log det(Σ_Y|P + εI) / d``, averaged over classes and images, computed in float64 with
Cholesky factorisations; the probabilities and labels are first downsampled by average pooling
(``pool_stride``, as the RMI paper does to save memory) and the probabilities clipped at 1e-6.
As in the RMI paper it is combined with a pixel-wise cross-entropy:

    L = λ · CE + (1 − λ) · RMI,   λ = ``lambda_ce`` (0.5).

Differences from the reference code: covariances are normalised by ``N`` (true covariances, so
the loss does not depend on the image size) and the per-class terms are averaged, not summed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def neighbourhood_vectors(x: torch.Tensor, radius: int) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, C, radius², (H−radius+1)·(W−radius+1))``: the ``radius × radius``
    neighbourhood of every position whose neighbourhood lies inside the image."""
    _, _, h, w = x.shape
    nh, nw = h - radius + 1, w - radius + 1
    if nh < 1 or nw < 1:
        raise ValueError(f"image {h}×{w} smaller than the RMI radius {radius}")
    shifts = [x[:, :, i:i + nh, j:j + nw] for i in range(radius) for j in range(radius)]
    return torch.stack(shifts, 2).flatten(3)


def _logdet_spd(a: torch.Tensor, jitter: float) -> torch.Tensor:
    """log det of symmetric positive-definite matrices by Cholesky (retrying with more jitter)."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for scale in (1.0, 10.0, 100.0):
        chol, info = torch.linalg.cholesky_ex(a + eye * (jitter * (scale - 1.0)))
        if not bool(info.any()):
            return 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return torch.linalg.slogdet(a + eye * (jitter * 100.0))[1]


def rmi_lower_bound(labels_onehot: torch.Tensor, probs: torch.Tensor, radius: int = 3,
                    eps: float = 5e-4) -> torch.Tensor:
    """``½ · log det(Σ_Y|P + εI) / d`` per image and class, ``(B, C)`` (see module docstring)."""
    y = neighbourhood_vectors(labels_onehot, radius).double()
    p = neighbourhood_vectors(probs, radius).double()
    n = y.shape[-1]
    y = y - y.mean(-1, keepdim=True)
    p = p - p.mean(-1, keepdim=True)
    eye = torch.eye(y.shape[2], dtype=y.dtype, device=y.device)
    cov_y = y @ y.transpose(-1, -2) / n
    cov_p = p @ p.transpose(-1, -2) / n + eps * eye
    cov_yp = y @ p.transpose(-1, -2) / n
    # Σ_P⁻¹ Σ_YPᵀ by Cholesky solve; Σ_P was regularised so the Schur complement stays PSD.
    chol_p, _ = torch.linalg.cholesky_ex(cov_p)
    solved = torch.cholesky_solve(cov_yp.transpose(-1, -2), chol_p)
    posterior = cov_y - cov_yp @ solved
    posterior = 0.5 * (posterior + posterior.transpose(-1, -2)) + eps * eye
    return 0.5 * _logdet_spd(posterior, eps) / y.shape[2]


class RMILoss(nn.Module):
    """``λ · CE + (1 − λ) · RMI`` on logits ``(B, C, H, W)`` and integer labels ``(B, H, W)``.

    ``radius``: neighbourhood side R (d = R²); ``pool_stride``: average-pooling factor applied to
    probabilities and one-hot labels before RMI (1 = none); ``lambda_ce``: weight λ of the
    cross-entropy; ``eps``: diagonal regularisation of the covariances.
    """

    def __init__(self, num_classes: int = 4, radius: int = 3, pool_stride: int = 3, lambda_ce: float = 0.5,
                 eps: float = 5e-4, clip_min: float = 1e-6):
        super().__init__()
        if not 0.0 <= lambda_ce <= 1.0:
            raise ValueError("lambda_ce must be in [0, 1]")
        self.num_classes = num_classes
        self.radius = radius
        self.pool_stride = pool_stride
        self.lambda_ce = lambda_ce
        self.eps = eps
        self.clip_min = clip_min

    def rmi(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The RMI term alone (mean over images and classes)."""
        probs = torch.softmax(logits.float(), 1).clamp_min(self.clip_min)
        onehot = F.one_hot(target.long(), self.num_classes).permute(0, 3, 1, 2).to(probs.dtype)
        if self.pool_stride > 1:
            probs = F.avg_pool2d(probs, self.pool_stride, self.pool_stride)
            onehot = F.avg_pool2d(onehot, self.pool_stride, self.pool_stride)
        return rmi_lower_bound(onehot, probs, self.radius, self.eps).mean().to(logits.dtype)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 4 or target.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(f"expected logits (B, C, H, W) and target (B, H, W), got {tuple(logits.shape)} "
                             f"and {tuple(target.shape)}")
        loss = logits.new_zeros(())
        if self.lambda_ce > 0:
            loss = loss + self.lambda_ce * F.cross_entropy(logits, target.long())
        if self.lambda_ce < 1:
            loss = loss + (1.0 - self.lambda_ce) * self.rmi(logits, target)
        return loss
