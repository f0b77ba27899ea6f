"""Expectation-maximisation attention (Li et al., 2019, arXiv:1907.13426): "Expectation-Maximization
Attention Networks for Semantic Segmentation". Checked against the authors' code (``XiaLiPKU/EMANet``,
``network.py``: ``EMAU``; the bases' moving average in ``train.py``).

Instead of attending every pixel to every pixel, soft-cluster the ``N = H W`` pixels into ``K`` bases
with a few EM iterations and rebuild each pixel from the bases (a rank-``K`` reconstruction)::

    x    = conv1(x_in)                                     1x1 conv, (C, N)
    mu   = the bases buffer                                (C, K), unit-norm columns
    for t = 1..T:
        Z  = softmax_k(x^T mu)                             E-step, (N, K): responsibilities (lambda = 1)
        mu = x Z / (1e-6 + sum_n Z)                        M-step: responsibility-weighted means
        mu = mu / ||mu||_columns                           bases kept on the unit sphere
    out  = relu(BN(conv2(relu(mu Z^T))) + x_in)

In training mode the forward pass also moves the buffer toward the batch mean of the final bases,
``mu0 <- normalise(m mu0 + (1 - m) mean_batch(mu_T))`` (momentum ``m = 0.9``; the authors do this in
their training loop, here it is the module's own, like BatchNorm's running statistics), so the bases
survive save/load in the ``state_dict``.

Gradients (option ``gradient``): the authors' code runs every EM iteration under ``no_grad``, so
``conv1`` receives no gradient at all (``gradient="none"``). By default (``"last"``) the first ``T - 1``
iterations are detached and the last E-step and M-step carry the gradient to ``conv1`` -- the
network still learns the embedding the clustering runs on, without back-propagating through the
iteration chain (which the paper reports to be unstable).

Padding (``mask``): padding pixels get zero responsibility in the M-step, so they never shape the
bases; every pixel is rebuilt from the same bases. ``O(N C K T)`` time, ``O(N (C + K))`` memory. The
reference (:meth:`EMAttention.reference`) writes the E- and M-steps as explicit sums over pixels and
bases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastattn.core.vision import VisionMechanism, batch_norm
from fastattn.registry import register

__all__ = ["EMAttention"]

_GRADIENTS = ("last", "none")
_EPS = 1e-6  # the M-step's guard, as in the authors' code


def _unit_columns(mu: Tensor) -> Tensor:
    """``mu (..., C, K)`` with every column scaled to unit L2 norm (the code's ``_l2norm`` over C)."""
    return mu / (1e-6 + mu.norm(dim=-2, keepdim=True))


@register(
    "emanet", complexity="O(HW C K T)", causal=False, decoding=False, padding=True,
    time_growth=1.0, memory_growth=1.0,
)
class EMAttention(VisionMechanism):
    """EM attention unit: K bases, T EM iterations, a moving-average bases buffer (see the module docstring)."""

    test_options = {"bases": 4, "stages": 3}
    deviations = (
        (
            "Gradient through the last E- and M-step by default (gradient='last'; the authors' code detaches "
            "all EM iterations, gradient='none', so conv1 never learns); the bases' moving average is "
            "updated inside forward (training mode), not in the training loop."
        ),
    )

    @dataclass(frozen=True)
    class Options:
        bases: int = 64  # K
        stages: int = 3  # T EM iterations
        momentum: float = 0.9  # moving average of the bases buffer (training mode)
        gradient: str = "last"  # "last" (last E and M step) | "none" (the authors' code)

        def __post_init__(self) -> None:
            if self.bases < 1:
                raise ValueError(f"bases must be >= 1, got {self.bases}")
            if self.stages < 1:
                raise ValueError(f"stages must be >= 1, got {self.stages}")
            if not 0.0 <= self.momentum <= 1.0:
                raise ValueError(f"momentum must be in [0, 1], got {self.momentum}")
            if self.gradient not in _GRADIENTS:
                raise ValueError(f"gradient must be one of {_GRADIENTS}, got {self.gradient!r}")

    def __init__(self, options=None, *, channels: int, num_heads: int = 1, scale: float | None = None) -> None:
        if scale is not None or num_heads != 1:
            raise ValueError("emanet has no score scale (lambda = 1) and no heads; do not pass scale= or num_heads=")
        super().__init__(options, channels=channels, num_heads=num_heads, scale=scale)
        k = self.options.bases
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.conv2 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        # the authors' initialisation, drawn from a fixed seed: construction leaves torch's global random
        # state alone and every module of these sizes starts from the same bases (any dtype)
        g = torch.Generator().manual_seed(0)
        mu = torch.randn(1, channels, k, generator=g, dtype=torch.float64) * math.sqrt(2.0 / k)
        self.register_buffer("mu", _unit_columns(mu).to(torch.get_default_dtype()))

    def _embed(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``conv1(x)`` as ``(B, C, N)`` and the real-pixel weights ``(B, N, 1)`` (None without padding)."""
        keep = None if mask is None else (~mask).flatten(1)[:, :, None].to(x.dtype)
        return self.conv1(x).flatten(2), keep

    def em(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The EM iterations on ``conv1(x)``: the final bases ``mu (B, C, K)`` (unit columns) and the last
        responsibilities ``Z (B, N, K)`` (rows sum to 1)."""
        e, keep = self._embed(x, mask)
        mu = self.mu.to(e.dtype).expand(e.shape[0], -1, -1)
        stages = self.options.stages
        with torch.no_grad():
            mu, z = self._iterate(e.detach(), mu, keep, stages - 1 if self.options.gradient == "last" else stages)
        if self.options.gradient == "last":
            mu, z = self._iterate(e, mu, keep, 1)
        return mu, z

    @staticmethod
    def _iterate(e: Tensor, mu: Tensor, keep: Tensor | None, stages: int) -> tuple[Tensor, Tensor | None]:
        z = None
        for _ in range(stages):
            z = torch.softmax(torch.bmm(e.transpose(1, 2), mu), dim=2)  # E-step (B, N, K)
            zm = z if keep is None else z * keep  # padding pixels take no part in the M-step
            mu = _unit_columns(torch.bmm(e, zm / (_EPS + zm.sum(dim=1, keepdim=True))))  # M-step (B, C, K)
        return mu, z

    def _update_bases(self, mu: Tensor) -> None:
        if self.training:
            with torch.no_grad():
                m = self.options.momentum
                new = m * self.mu + (1.0 - m) * mu.detach().mean(dim=0, keepdim=True).to(self.mu.dtype)
                self.mu.copy_(_unit_columns(new))

    def _out(self, x: Tensor, rebuilt: Tensor, mask: Tensor | None) -> Tensor:
        rebuilt = torch.relu(rebuilt.reshape(x.shape))
        return torch.relu(batch_norm(self.bn, self.conv2(rebuilt), mask, "emanet") + x)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        mu, z = self.em(x, mask)
        out = self._out(x, torch.bmm(mu, z.transpose(1, 2)), mask)  # mu Z^T: (B, C, N)
        self._update_bases(mu)  # after _out, which refuses a mask in training before any state changes
        return out

    def reference(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The soft-EM written per pixel ``n`` and basis ``k`` (same gradient policy as ``forward``)."""
        e, keep = self._embed(x, mask)
        b, _, n = e.shape
        w = torch.ones(b, n, dtype=e.dtype) if keep is None else keep[:, :, 0]
        mu = self.mu.to(e.dtype).expand(b, -1, -1)
        for t in range(self.options.stages):
            tracked = self.options.gradient == "last" and t == self.options.stages - 1
            et = e if tracked else e.detach()
            mu = mu.detach()
            with torch.set_grad_enabled(tracked and torch.is_grad_enabled()):
                scores = torch.einsum("bcn,bck->bnk", et, mu)  # x_n . mu_k
                p = torch.exp(scores - scores.amax(dim=2, keepdim=True))
                z = p / p.sum(dim=2, keepdim=True)  # E-step
                new = []
                for k in range(mu.shape[2]):  # M-step, basis by basis
                    r = z[:, :, k] * w  # (B, N)
                    m_k = (et * r[:, None, :]).sum(dim=2) / (_EPS + r.sum(dim=1, keepdim=True))
                    new.append(m_k / (1e-6 + torch.sqrt((m_k * m_k).sum(dim=1, keepdim=True))))
                mu = torch.stack(new, dim=2)
        rebuilt = torch.einsum("bck,bnk->bcn", mu, z)  # x~_n = sum_k z_nk mu_k
        return self._out(x, rebuilt, mask)
