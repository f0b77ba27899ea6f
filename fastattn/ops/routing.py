"""Top-k routing of tokens over experts (heads, projections, memories), with the usual auxiliary losses.

A router maps each token to ``E`` logits (``x W_g``, computed by the caller). :func:`route` selects the
``k`` largest per token (dropless: no capacity, so no token's selection depends on another token's) and
turns the logits into gates:

* ``gate="softmax"``: probabilities ``p = softmax(logits)`` over all ``E`` experts; the selected
  experts keep ``p_e``, the others get 0. With ``renormalize=True`` the kept gates are divided by their
  sum (equal to a softmax over the selected logits only);
* ``gate="sigmoid"``: ``p = sigmoid(logits)``, each expert on its own; ``renormalize`` as above.

The auxiliary losses read the routing of a batch of tokens (optionally only the ``valid`` ones):

* :func:`load_balance_loss` -- Switch-style ``E * sum_e f_e P_e`` with ``f_e`` the fraction of tokens
  that select expert ``e`` and ``P_e`` the mean router probability of ``e``: ``k`` when routing is
  uniform, larger when a few experts take most tokens;
* :func:`z_loss` -- ``mean(logsumexp(logits)^2)``, which keeps the router's logits small;
* :func:`entropy_loss` -- minus the entropy of the token-averaged selection distribution (per group of
  experts, averaged over groups): ``log E`` below zero when the batch uses every expert equally.

**The weighting convention** (every routed layer follows it): a layer's ``aux_loss`` is already weighted
-- the weighted sum :func:`router_loss` of the terms it uses, each weight an option of the layer named
``<term>_weight`` (``balance_weight``, ``z_weight``, ``entropy_weight``) with the paper's value as its
default, 0 switching a term off -- so a training loop adds ``sum(layer.aux_loss)`` to the task loss as it
is, whatever the mechanism. The terms are computed in training mode only (``aux_loss`` is zero in eval
mode).

Applying the gates, batched over experts (one einsum / matmul each, no loop over experts; every expert
is computed and unselected ones weigh 0):

* :func:`gate_heads` -- head outputs ``(B, H, L, E)`` times per-token head gates ``(B, L, H)``;
* :func:`experts_in` -- ``sum_e g_e x W^{g,e}``: a mixture-of-experts linear map into ``G`` groups (heads);
* :func:`experts_out` -- ``sum_{g,e} g_{g,e} h_g W^{g,e}``: a mixture-of-experts linear map out of ``G``
  groups, summed into one output.

Computing only what was selected (tokens grouped by expert, padded to the busiest expert):

* :func:`group_by_expert` -- for a selection ``(B, L, G)``, the tokens of each expert in token order
  ``(B, G, S)`` and which slots are real;
* :func:`gather_tokens` / :func:`scatter_tokens` -- per-expert rows in and out of that layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "LOSS_TERMS", "Routing", "entropy_loss", "experts_in", "experts_out", "gate_heads", "gather_tokens",
    "group_by_expert", "load_balance_loss", "loss_weights", "route", "router_loss", "scatter_tokens", "z_loss",
]

LOSS_TERMS = ("balance", "z", "entropy")

GATES = ("softmax", "sigmoid")


@dataclass(frozen=True)
class Routing:
    """One routing decision for tokens ``(..., E)``.

    ``gates`` -- the weight of each expert for each token, 0 where not selected; ``mask`` -- bool,
    True where selected (exactly ``k`` per token); ``index`` -- ``(..., k)`` the selected experts, in no
    particular order; ``probs`` -- the router probabilities over all experts before selection (what the
    load-balance loss reads); ``logits`` -- the router logits it was made from (what the z-loss and the
    entropy loss read)."""

    gates: Tensor
    mask: Tensor
    index: Tensor
    probs: Tensor
    logits: Tensor


def route(logits: Tensor, k: int, *, gate: str = "softmax", renormalize: bool = True) -> Routing:
    """Select the top ``k`` of the last dimension of ``logits`` ``(..., E)`` and gate them."""
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    n = logits.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of experts), got {k}")
    probs = torch.softmax(logits, dim=-1) if gate == "softmax" else torch.sigmoid(logits)
    # Both gates are increasing in the logits, so the logits' top-k is the probabilities' top-k.
    index = torch.topk(logits, k, dim=-1, sorted=False).indices
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, index, True)
    gates = probs.masked_fill(~mask, 0.0)
    if renormalize:
        gates = gates / gates.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(gates.dtype).tiny)
    return Routing(gates=gates, mask=mask, index=index, probs=probs, logits=logits)


def _token_mean(x: Tensor, valid: Tensor | None) -> Tensor:
    """Mean of ``x (..., E)`` over every leading (token) position, or over the ``valid`` ones only."""
    x = x.reshape(-1, x.shape[-1])
    if valid is None:
        return x.mean(dim=0)
    if valid.numel() != x.shape[0]:
        raise ValueError(f"valid must have one entry per token ({x.shape[0]}), got shape {tuple(valid.shape)}")
    w = valid.reshape(-1, 1).to(x.dtype)
    return (x * w).sum(dim=0) / w.sum().clamp_min(1.0)


def load_balance_loss(probs: Tensor, mask: Tensor, valid: Tensor | None = None) -> Tensor:
    """``E * sum_e f_e P_e``: ``f_e`` = mean over tokens of ``mask[..., e]`` (selection frequency),
    ``P_e`` = mean over tokens of ``probs[..., e]``. Tokens where ``valid`` is False do not count."""
    f = _token_mean(mask.to(probs.dtype), valid)
    p = _token_mean(probs, valid)
    return probs.shape[-1] * (f * p).sum()


def z_loss(logits: Tensor, valid: Tensor | None = None) -> Tensor:
    """Router z-loss ``mean over tokens of logsumexp(logits)^2``."""
    return _token_mean(torch.logsumexp(logits, dim=-1, keepdim=True).pow(2), valid)[0]


def entropy_loss(logits: Tensor, valid: Tensor | None = None) -> Tensor:
    """``mean_g sum_e pbar_{g,e} log pbar_{g,e}`` for ``logits (B, L, G, E)`` (``G`` independent routers,
    e.g. one per head), ``pbar_g`` the mean over the (``valid`` ``(B, L)``) tokens of ``softmax(logits_g)``:
    minus the entropy of the batch's average selection distribution, minimal (``-log E``) when the batch
    spreads evenly over the experts."""
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, L, G, E), got shape {tuple(logits.shape)}")
    p = torch.softmax(logits, dim=-1)
    if valid is None:
        pbar = p.mean(dim=(0, 1))
    else:
        if valid.shape != logits.shape[:2]:
            raise ValueError(f"valid must be (B, L) = {tuple(logits.shape[:2])}, got {tuple(valid.shape)}")
        w = valid.to(p.dtype)[..., None, None]
        pbar = (p * w).sum(dim=(0, 1)) / w.sum().clamp_min(1.0)
    return (pbar * torch.log(pbar.clamp_min(torch.finfo(pbar.dtype).tiny))).sum(-1).mean()


def loss_weights(options: object, *terms: str) -> dict[str, float]:
    """The weights ``{term: options.<term>_weight}`` of the auxiliary-loss ``terms`` a layer uses (see the
    module docstring's convention); a negative or non-finite weight is a ``ValueError`` naming the option."""
    out = {}
    for term in terms:
        if term not in LOSS_TERMS:
            raise ValueError(f"unknown auxiliary-loss term {term!r}; known: {LOSS_TERMS}")
        w = float(getattr(options, f"{term}_weight"))
        if not (w >= 0 and w < float("inf")):
            raise ValueError(f"{term}_weight must be a finite number >= 0, got {w}")
        out[term] = w
    return out


def router_loss(routing: Routing, weights: dict[str, float], valid: Tensor | None = None) -> Tensor | None:
    """``sum_term weights[term] * term`` over the terms with a positive weight (``None`` when there is
    none): ``balance`` -- :func:`load_balance_loss` of ``routing``; ``z`` -- :func:`z_loss` of its logits;
    ``entropy`` -- :func:`entropy_loss` of its logits ``(B, L, G, E)``. ``valid`` marks the real tokens."""
    logits = routing.logits
    terms = {
        "balance": lambda: load_balance_loss(routing.probs, routing.mask, valid),
        "z": lambda: z_loss(logits, valid),
        "entropy": lambda: entropy_loss(logits, valid),
    }
    total = None
    for term, w in weights.items():
        if w > 0:
            part = w * terms[term]()
            total = part if total is None else total + part
    return total


def gate_heads(heads: Tensor, gates: Tensor) -> Tensor:
    """Head outputs ``(B, H, L, E)`` scaled by per-token gates ``(B, L, H)``."""
    return heads * gates.transpose(1, 2).unsqueeze(-1)


def experts_in(x: Tensor, weight: Tensor, gates: Tensor) -> Tensor:
    """``y[..., g, :] = sum_e gates[..., g, e] * x W[g, e]``: ``x (..., Din)``, ``weight (G, E, Din, Dout)``,
    ``gates (..., G, E)`` (zero for unselected experts) -> ``(..., G, Dout)``."""
    y = torch.einsum("...i,geio->...geo", x, weight)
    return (y * gates.unsqueeze(-1)).sum(-2)


def experts_out(h: Tensor, weight: Tensor, gates: Tensor) -> Tensor:
    """``y = sum_{g, e} gates[..., g, e] * h[..., g, :] W[g, e]``: ``h (..., G, Din)``, ``weight (G, E, Din,
    Dout)``, ``gates (..., G, E)`` -> ``(..., Dout)``; one matmul over the gated, concatenated inputs."""
    g, e, din, dout = weight.shape
    gated = h.unsqueeze(-2) * gates.unsqueeze(-1)  # (..., G, E, Din)
    return gated.flatten(-3) @ weight.reshape(g * e * din, dout)


def group_by_expert(selected: Tensor) -> tuple[Tensor, Tensor]:
    """The tokens each expert was selected by: ``selected`` bool ``(B, L, G)`` -> ``index`` long ``(B, G, S)``
    (token positions in increasing order, padded with 0) and ``valid`` bool ``(B, G, S)`` (False on the
    padding slots); ``S`` is the largest number of tokens any expert of any batch row has."""
    m = selected.transpose(1, 2)  # (B, G, L)
    counts = m.sum(-1)
    s = int(counts.max()) if m.numel() else 0
    order = torch.sort((~m).to(torch.uint8), dim=-1, stable=True).indices[..., :s]  # selected first, in order
    valid = torch.arange(s, device=m.device) < counts[..., None]
    return torch.where(valid, order, 0), valid


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x (B, G, L, E)`` at ``index (B, G, S)``: ``(B, G, S, E)``."""
    return x.gather(2, index[..., None].expand(*index.shape, x.shape[-1]))


def scatter_tokens(y: Tensor, index: Tensor, valid: Tensor, length: int) -> Tensor:
    """The inverse of :func:`gather_tokens` on the ``valid`` slots: ``y (B, G, S, E)`` written at ``index``
    into zeros ``(B, G, length, E)``."""
    out = y.new_zeros(*y.shape[:2], length, y.shape[-1])
    y = y * valid[..., None].to(y.dtype)
    return out.scatter_add(2, index[..., None].expand_as(y), y)
