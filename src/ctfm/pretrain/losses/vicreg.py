"""VICReg: invariance, variance and covariance terms.

Paper: Bardes, Ponce, LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", ICLR 2022.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctfm.pretrain.losses.common import check_pair, full_precision, split_stacked_views, upcast


def variance_hinge(z: torch.Tensor, eps: float) -> torch.Tensor:
    """VICReg's variance term of ``z`` [..., M, D] -> ``[...]``: mean_d relu(1 - sqrt(Var_M(z_d) + eps)).

    Var is the unbiased variance over the M samples, per feature dimension d.
    """
    standard_deviation = torch.sqrt(z.var(dim=-2) + eps)  # [..., D]
    return F.relu(1.0 - standard_deviation).mean(dim=-1)


def _off_diagonal_covariance(z: torch.Tensor) -> torch.Tensor:
    """VICReg's covariance term of ``z`` [..., M, D] -> ``[...]``: sum_{i != j} C_ij^2 / D."""
    samples, dim = z.shape[-2], z.shape[-1]
    centred = z - z.mean(dim=-2, keepdim=True)
    covariance = centred.transpose(-1, -2) @ centred / (samples - 1)  # [..., D, D]
    diagonal = torch.eye(dim, dtype=torch.bool, device=z.device)
    return covariance.masked_fill(diagonal, 0.0).pow(2).sum(dim=(-2, -1)) / dim


class VICRegLoss(nn.Module):
    """VICReg: invariance + variance + covariance (Bardes, Ponce, LeCun, ICLR 2022, Eq. 1-6).

    Inputs ``z0``, ``z1``: ``[B, D]`` embeddings of the two views (or one stacked ``[..., 2, D]``),
    not normalised. With Var and Cov the unbiased estimates over the B samples:

    - invariance ``s = mean_{b,d} (z0 - z1)^2`` (mean squared error);
    - variance ``v = 1/2 * [h(z0) + h(z1)]``, ``h(z) = mean_d relu(1 - sqrt(Var(z_d) + eps))`` (a hinge
      keeping every dimension's standard deviation at 1 or above);
    - covariance ``c = sum_{i != j} Cov(z0)_ij^2 / D + sum_{i != j} Cov(z1)_ij^2 / D``;
    - ``loss = lambda_ * s + mu * v + nu * c``.

    The variance term is the *mean* of the two views' hinges, as in the authors' released code
    (the paper's Eq. 6 writes the sum); the default weights (25, 25, 1) were tuned with it.
    :meth:`terms` returns the three unweighted terms. Needs B >= 2.
    """

    def __init__(self, lambda_: float = 25.0, mu: float = 25.0, nu: float = 1.0, eps: float = 1e-4):
        super().__init__()
        for name, value in (("lambda_", lambda_), ("mu", mu), ("nu", nu), ("eps", eps)):
            if not value >= 0:
                raise ValueError(f"{name}={value!r}: VICReg weights and eps must be >= 0")
        self.lambda_, self.mu, self.nu, self.eps = float(lambda_), float(mu), float(nu), float(eps)

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_}, mu={self.mu}, nu={self.nu}, eps={self.eps}"

    def terms(self, z0: torch.Tensor, z1: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The unweighted terms ``{"invariance", "variance", "covariance"}``; inputs ``[..., B, D]`` -> ``[...]`` each."""
        if z1 is None:
            z0, z1 = split_stacked_views(z0)
        check_pair(z0, z1)
        if z0.shape[-2] < 2:
            raise ValueError(
                f"VICReg got {z0.shape[-2]} sample (shape {tuple(z0.shape)}): variance and covariance need >= 2 samples"
            )
        with full_precision(z0.device):
            z0, z1 = upcast(z0), upcast(z1)
            return {
                "invariance": (z0 - z1).pow(2).mean(dim=(-2, -1)),
                "variance": 0.5 * (variance_hinge(z0, self.eps) + variance_hinge(z1, self.eps)),
                "covariance": _off_diagonal_covariance(z0) + _off_diagonal_covariance(z1),
            }

    def forward(self, z0: torch.Tensor, z1: torch.Tensor | None = None) -> torch.Tensor:
        """``z0``, ``z1`` [B, D] -> scalar."""
        if z1 is not None and z0.ndim != 2:
            raise ValueError(
                f"z0 has shape {tuple(z0.shape)}: expected [B, D] (use IntraSampleWrapper for per-image groups)"
            )
        return self.forward_per_group(z0, z1)

    def forward_per_group(self, z0: torch.Tensor, z1: torch.Tensor | None = None) -> torch.Tensor:
        """Independent VICReg of each group: ``[..., M, D]`` -> ``[...]``."""
        terms = self.terms(z0, z1)
        return self.lambda_ * terms["invariance"] + self.mu * terms["variance"] + self.nu * terms["covariance"]
