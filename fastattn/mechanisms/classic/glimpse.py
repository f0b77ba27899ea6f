"""Deep recurrent visual attention (DRAM; Ba, Mnih and Kavukcuoglu, arXiv 1412.7755): hard attention that
reads an image through a sequence of glimpses, each at a location chosen by a stochastic policy from
the glimpses before it, trained by REINFORCE with a baseline.

One glimpse ``n`` (``l_n in [-1, 1]^2``, ``(x, y)``; -1 and 1 the outer edges of the image)::

    x_n  = sensor(I, l_n)                   k patches of s*2^j pixels centred at l_n, each averaged down to
                                            s x s (zeros beyond the border)
    g_n  = G_image(x_n) * G_loc(l_n)        the glimpse network: what times where (element-wise)
    r1_n = LSTM_1(g_n, r1_{n-1})            the recurrent core: the lower layer's state is the feature
    r2_n = LSTM_2(r1_n, r2_{n-1})           a classifier reads; the upper layer drives the policy
    l_{n+1} ~ N(mu_n, std^2 I),  mu_n = tanh(E r2_n)   the emission network (fixed std)
    r2_0 = C(coarse I)                      the context network: initialises the policy's state

The module returns the features ``r1_n``, the locations, their log-probabilities under the policy and a
learned baseline ``b_n = B(r2_{n-1})`` (the policy's state when it chose ``l_n``); the reward comes from
the task, so the REINFORCE loss is formed by the caller (:func:`fastattn.reinforce_loss`), never as an
``aux_loss``. Sampling is on in training mode (``sample=None``); in eval mode the policy's mean is used.

The efficient sensor box-filters the image once per scale (a pyramid of ``avg_pool2d`` over the
zero-padded image) and gathers ``s x s`` samples per glimpse; the reference crops each patch explicitly
and resizes it by area averaging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.vision import GlimpseMechanism, GlimpseResult, GlimpseState
from ...registry import register

__all__ = ["DRAM", "patch_corner"]


def patch_corner(loc: Tensor, size: int, extent: int) -> Tensor:
    """The first pixel (integer) of a ``size``-pixel patch centred at ``loc`` in ``[-1, 1]`` along an axis
    of ``extent`` pixels: the centre ``(loc + 1) / 2 * extent`` (pixel edges), rounded half up."""
    return torch.floor((loc + 1) / 2 * extent - size / 2 + 0.5).long()


@register(
    "glimpse", complexity="O(N (k s^2 C + d^2)) for N glimpses, plus O(k C H W) once per image (the pyramid)",
    causal=True, decoding=True, padding=False, randomized=True, time_growth=1.0, memory_growth=1.0,
)
class DRAM(GlimpseMechanism):
    """``fastattn.GlimpseAttention(C, method="glimpse", patch=8, scales=3, hidden=128, std=0.1, ...)``.
    Parameters: ``g_image`` (the flattened retina ``C k s^2 -> glimpse_dim``, ReLU), ``g_loc``
    (``2 -> glimpse_dim``, ReLU), ``core1``/``core2`` (LSTM cells), ``emission`` (``hidden -> 2``),
    ``context`` (the ``context_size^2`` average-pooled image ``-> hidden``, ReLU) and ``baseline``
    (``hidden -> 1``, reading the policy's state detached, so it does not shape the features)."""

    test_options: ClassVar[dict[str, Any]] = {"patch": 3, "scales": 2, "hidden": 10, "glimpse_dim": 12, "context_size": 2}
    deviations = (
        "Reduced scope: the glimpse network's image branch is one linear layer over the retina "
        "(the paper: three convolutions and a linear layer), the context network one linear layer over an "
        "average-pooled image (the paper: convolutions over a down-sampled image); no classifier (the task's); "
        "defaults (patch 8, 3 scales, std 0.1) are RAM's translated-MNIST settings, not verified against the "
        "DRAM PDF.",
    )

    @dataclass(frozen=True)
    class Options:
        patch: int = 8  # s: every scale is averaged down to s x s
        scales: int = 3  # k: patches of s, 2s, 4s, ... pixels
        hidden: int = 128  # the LSTM width (features and policy state)
        glimpse_dim: int | None = None  # width of g_n; None: hidden
        std: float = 0.1  # the policy's fixed standard deviation
        context_size: int = 8  # the context network's pooled image is context_size x context_size
        glimpses: int = 4  # N, the default number of glimpses of forward

    def __init__(self, options: Any = None, *, channels: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(options, channels=channels)
        o = self.options
        for name in ("patch", "scales", "hidden", "context_size", "glimpses"):
            if getattr(o, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(o, name)}")
        if not o.std > 0:
            raise ValueError(f"std must be positive, got {o.std}")
        gdim = o.hidden if o.glimpse_dim is None else o.glimpse_dim
        if gdim <= 0:
            raise ValueError(f"glimpse_dim must be positive, got {gdim}")
        self.generator = generator  # the default source of the policy's samples
        fk = {"device": device, "dtype": dtype}
        self.g_image = nn.Linear(channels * o.scales * o.patch ** 2, gdim, **fk)
        self.g_loc = nn.Linear(2, gdim, **fk)
        self.core1 = nn.LSTMCell(gdim, o.hidden, **fk)
        self.core2 = nn.LSTMCell(o.hidden, o.hidden, **fk)
        self.emission = nn.Linear(o.hidden, 2, **fk)
        self.context = nn.Linear(channels * o.context_size ** 2, o.hidden, **fk)
        self.baseline = nn.Linear(o.hidden, 1, **fk)

    def dims(self) -> str:
        o = self.options
        return f"channels={self.channels}, retina={o.scales}x{o.patch}x{o.patch}"

    # ---- the sensor ---------------------------------------------------------------------------------
    def pyramid(self, x: Tensor) -> list[Tensor]:
        """Per scale ``j``, the zero-padded image box-filtered by ``2^j x 2^j`` (stride 1): entry
        ``(y, x)`` is the mean of the block whose first pixel is ``(y - pad, x - pad)``."""
        pad = self.options.patch * 2 ** (self.options.scales - 1) + 1
        xp = F.pad(x, (pad, pad, pad, pad))
        return [xp if j == 0 else F.avg_pool2d(xp, 2 ** j, stride=1) for j in range(self.options.scales)]

    def retina(self, pyramid: list[Tensor], loc: Tensor, size: tuple[int, int]) -> Tensor:
        """``(B, k, C, s, s)``: the ``k`` patches at ``loc (B, 2)``, gathered from :meth:`pyramid`."""
        s, hh, ww = self.options.patch, *size
        pad = s * 2 ** (self.options.scales - 1) + 1
        b = loc.shape[0]
        bi = torch.arange(b, device=loc.device)[:, None, None]
        out = []
        for j, box in enumerate(pyramid):
            f = 2 ** j
            steps = torch.arange(s, device=loc.device) * f + pad
            rows = patch_corner(loc[:, 1], s * f, hh)[:, None] + steps  # (B, s)
            cols = patch_corner(loc[:, 0], s * f, ww)[:, None] + steps
            out.append(box[bi, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2))  # (B, C, s, s)
        return torch.stack(out, 1)

    def retina_reference(self, x: Tensor, loc: Tensor) -> Tensor:
        """The sensor literally: per image and scale, crop the ``s 2^j``-pixel square at ``loc`` onto a
        zero canvas, and resize it to ``s x s`` by area averaging."""
        s, (b, c, hh, ww) = self.options.patch, x.shape
        out = x.new_zeros(b, self.options.scales, c, s, s)
        for i in range(b):
            for j in range(self.options.scales):
                size = s * 2 ** j
                top = int(patch_corner(loc[i, 1], size, hh))
                left = int(patch_corner(loc[i, 0], size, ww))
                canvas = x.new_zeros(c, size, size)
                y0, y1 = max(top, 0), min(top + size, hh)
                x0, x1 = max(left, 0), min(left + size, ww)
                if y0 < y1 and x0 < x1:
                    canvas[:, y0 - top:y1 - top, x0 - left:x1 - left] = x[i, :, y0:y1, x0:x1]
                out[i, j] = F.interpolate(canvas[None], size=(s, s), mode="area")[0]
        return out

    # ---- the recurrence -----------------------------------------------------------------------------
    def start(self, x: Tensor) -> GlimpseState:
        """The state before the first glimpse: ``r1_0 = 0``, ``r2_0 = C(coarse image)``."""
        b, k = x.shape[0], self.options.context_size
        coarse = F.adaptive_avg_pool2d(x, k).flatten(1)
        zeros = x.new_zeros(b, self.options.hidden)
        return GlimpseState(zeros, zeros, torch.relu(self.context(coarse)), zeros, 0)

    def _glimpse(
        self, see: Callable[[Tensor], Tensor], state: GlimpseState, generator: torch.Generator | None, sample: bool,
    ) -> tuple[tuple[Tensor, ...], GlimpseState]:
        mean = torch.tanh(self.emission(state.h2))  # the policy chose l_n from r2_{n-1}
        std = self.options.std
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            raw = (mean + std * noise).detach()
        else:
            raw = mean.detach()
        log_prob = (-((raw - mean) ** 2) / (2 * std ** 2) - math.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)
        loc = raw.clamp(-1.0, 1.0)
        baseline = self.baseline(state.h2.detach()).squeeze(-1)
        g = torch.relu(self.g_image(see(loc).flatten(1))) * torch.relu(self.g_loc(loc))
        h1, c1 = self.core1(g, (state.h1, state.c1))
        h2, c2 = self.core2(h1, (state.h2, state.c2))
        return (h1, loc, log_prob, baseline, mean), GlimpseState(h1, c1, h2, c2, state.length + 1)

    def _run(self, x: Tensor, num_glimpses: int, state: GlimpseState | None, generator, sample, reference: bool):
        if reference:
            see = lambda loc: self.retina_reference(x, loc)  # noqa: E731
        else:
            pyr = self.pyramid(x)
            see = lambda loc: self.retina(pyr, loc, x.shape[2:])  # noqa: E731
        state = self.start(x) if state is None else state
        steps = []
        for _ in range(num_glimpses):
            out, state = self._glimpse(see, state, generator, sample)
            steps.append(out)
        result = GlimpseResult(*(torch.stack(parts, 1) for parts in zip(*steps)))
        return result, state

    def forward(
        self, x: Tensor, num_glimpses: int | None = None, *, state: GlimpseState | None = None,
        generator: torch.Generator | None = None, sample: bool | None = None, reference: bool = False,
    ) -> tuple[GlimpseResult, GlimpseState]:
        n = self.options.glimpses if num_glimpses is None else num_glimpses
        sample = self.training if sample is None else sample
        return self._run(x, n, state, self.generator if generator is None else generator, sample, reference)

    def reference(self, x: Tensor, num_glimpses: int | None = None, **kwargs: Any) -> tuple[GlimpseResult, GlimpseState]:
        return self.forward(x, num_glimpses, reference=True, **kwargs)
