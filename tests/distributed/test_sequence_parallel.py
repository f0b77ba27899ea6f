"""Sequence parallelism (fastattn.distributed) on gloo with spawned processes: every strategy equals the
single process on values and on the gradients of q, k, v (float64), and bad input is a ValueError on
every rank. One spawn per world size runs every case (process start-up dominates the time)."""

from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastattn
from fastattn import distributed as fad

B, H, E, N = 2, 4, 8, 16
TOL = 1e-9

# (method, strategy, causal, layout, padding, kv heads, options)
CASES = [
    ("linear", "lasp2", True, "contiguous", False, H, {"chunk": 4}),
    ("linear", "lasp2", False, "contiguous", True, H, {}),
    ("linear", "lasp2", True, "zigzag", True, 2, {"chunk": 4}),
    ("lightning", "lasp2", True, "contiguous", False, H, {"chunk": 4}),
    ("lightning", "lasp2", True, "zigzag", True, H, {"chunk": 4, "norm": "srms"}),
    ("lightning", "lasp2", False, "contiguous", False, H, {}),
    ("performer", "lasp2", True, "contiguous", False, H, {"num_features": 16}),
    ("performer", "lasp2", False, "zigzag", True, H, {"num_features": 16}),
    ("softmax", "ring", True, "contiguous", False, H, {}),
    ("softmax", "ring", False, "contiguous", True, H, {}),
    ("softmax", "ring", True, "zigzag", True, 2, {}),
    ("flash", "ring", True, "zigzag", False, H, {"block_q": 2, "block_k": 3}),
    ("local", "auto", True, "contiguous", True, H, {}),  # the window (256) exceeds a chunk: ulysses
    ("local", "halo", True, "contiguous", False, H, {"window": 3, "block": 2}),
    ("local", "halo", False, "zigzag", True, H, {"window": 2, "block": 3}),
    ("diet", "auto", False, "contiguous", True, 2,
     {"window": 1, "dilation": 2, "layer": 1, "mode": "dilated_cascade", "block": 2}),
    ("longformer", "halo", True, "zigzag", False, H,
     {"window": 1, "dilation": (1, 2, 1, 2), "global_tokens": (), "block": 2}),
    ("local", "ulysses", True, "zigzag", False, H, {}),
    ("softmax", "ulysses", False, "zigzag", False, H, {}),
    ("linear", "auto", True, "zigzag", False, H, {}),
    ("rfa", "lasp2", True, "zigzag", True, 2, {"num_features": 8, "chunk": 4}),
    ("lightning", "lasp2", True, "zigzag", True, H, {"chunk": 4, "overlap": True}),
    ("performer", "lasp2", False, "contiguous", True, H, {"num_features": 16, "overlap": True}),
    ("linear", "lasp2", True, "contiguous", True, 2, {"chunk": 4, "overlap": True}),
]


def _inputs(hkv: int, padding: bool, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, E, dtype=torch.float64, generator=g)
    k = torch.randn(B, hkv, N, E, dtype=torch.float64, generator=g)
    v = torch.randn(B, hkv, N, E, dtype=torch.float64, generator=g)
    grad = torch.randn(B, H, N, E, dtype=torch.float64, generator=g)
    kp = None
    if padding:
        kp = torch.zeros(B, N, dtype=torch.bool)
        kp[0, 3] = kp[1, -2:] = kp[1, 9] = True  # some in every region (early, middle, late)
    return q, k, v, grad, kp


def _case(case: tuple, seed: int, group=None) -> None:
    method, strategy, causal, layout, padding, hkv, options = case
    sp_options = dict(options)
    options = {k: v for k, v in options.items() if k != "overlap"}  # a keyword of the sequence-parallel call
    q, k, v, grad, kp = _inputs(hkv, padding, seed)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(seed)  # randomised mechanisms draw their features from here, both sides
    want = fastattn.attention(*leaves, method, is_causal=causal, key_padding_mask=kp, **options)
    (want * grad).sum().backward()
    mine = [t.clone() for t in fad.shard_sequence((q, k, v), layout=layout)]
    for t in mine:
        t.requires_grad_()
    kp_l = None if kp is None else fad.shard_sequence(kp, layout=layout, dim=1)
    torch.manual_seed(seed + dist.get_rank())  # rank 0 draws as the single process; the others differ
    out = fad.sequence_parallel_attention(*mine, method, is_causal=causal, strategy=strategy, layout=layout,
                                          key_padding_mask=kp_l, group=group, **sp_options)
    (out * fad.shard_sequence(grad, layout=layout)).sum().backward()
    checks = [("out", out, want)] + [(f"d{n}", t.grad, w.grad) for n, t, w in zip("qkv", mine, leaves)]
    for name, got, full in checks:
        ref = fad.shard_sequence(full.detach(), layout=layout)
        err = (got.detach() - ref).abs().max().item()
        assert err < TOL, f"{case}: {name} differs by {err:.3g}"
    back = fad.unshard_sequence(out.detach(), layout=layout)
    assert (back - want.detach()).abs().max().item() < TOL, f"{case}: unshard_sequence"


def _layer(method: str, causal: bool, seed: int, **options) -> None:
    """MultiheadAttention(..., sequence_parallel_group=g) on shards equals the layer on the whole sequence:
    outputs, input gradients, and parameter gradients summed over the ranks."""
    d = H * E
    torch.manual_seed(seed)
    ref = fastattn.MultiheadAttention(d, H, method, batch_first=True, dtype=torch.float64, **options)
    torch.manual_seed(seed + dist.get_rank())  # rank 0 builds ref's layer; the others differ until broadcast
    sp = fastattn.MultiheadAttention(d, H, method, batch_first=True, dtype=torch.float64,
                                     sequence_parallel_group=dist.group.WORLD, **options)
    g = torch.Generator().manual_seed(seed)
    if options.get("gate"):  # gated rfa: gates that differ per token (the gate weight starts at zero)
        w = torch.randn(H, d, dtype=torch.float64, generator=g)
        with torch.no_grad():
            for layer in (ref, sp):
                layer.mechanism.gate_proj.weight.copy_(w)
    x = torch.randn(B, N, d, dtype=torch.float64, generator=g, requires_grad=True)
    grad = torch.randn(B, N, d, dtype=torch.float64, generator=g)
    want, _ = ref(x, is_causal=causal)
    (want * grad).sum().backward()
    x_l = fad.shard_sequence(x.detach(), dim=1).requires_grad_()
    out, _ = sp(x_l, is_causal=causal)
    (out * fad.shard_sequence(grad, dim=1)).sum().backward()
    errs = {"out": (out.detach() - fad.shard_sequence(want.detach(), dim=1)).abs().max().item(),
            "dx": (x_l.grad - fad.shard_sequence(x.grad, dim=1)).abs().max().item()}
    for (name, p), (_, p_ref) in zip(sp.named_parameters(), ref.named_parameters()):
        total = p.grad.clone()
        dist.all_reduce(total)
        errs[name] = (total - p_ref.grad).abs().max().item()
    bad = {k: v for k, v in errs.items() if not v < TOL}
    assert not bad, f"layer {method} causal={causal}: {bad}"


def _raises(fn, *words: str) -> None:
    try:
        fn()
    except ValueError as e:
        missing = [w for w in words if w not in str(e)]
        assert not missing, f"error {e!r} does not name {missing}"
        return
    raise AssertionError(f"no ValueError (expected one naming {words})")


def _errors() -> None:
    q, k, v, _, _ = _inputs(H, False, 0)
    s = fad.shard_sequence((q, k, v))
    _raises(lambda: fad.sequence_parallel_attention(*s, "softmax", strategy="bogus"), "strategy", "bogus")
    _raises(lambda: fad.sequence_parallel_attention(*s, "softmax", strategy="lasp2"), "lasp2", "softmax")
    _raises(lambda: fad.sequence_parallel_attention(*s, "linear", strategy="ring"), "ring", "linear")
    _raises(lambda: fad.sequence_parallel_attention(*s, "efficient", strategy="lasp2"), "efficient",
            "token-wise")
    _raises(lambda: fad.sequence_parallel_attention(*s, "lightning", is_causal=True, strategy="ulysses"),
            "ulysses", "lightning", "heads_independent")
    _raises(lambda: fad.sequence_parallel_attention(*s, "bigbird", strategy="ulysses", block=2, random_blocks=1),
            "ulysses", "bigbird", "heads_independent")
    _raises(lambda: fad.sequence_parallel_attention(*s, "local", strategy="halo", window=9), "halo", "reaches 9")
    _raises(lambda: fad.sequence_parallel_attention(*s, "longformer", strategy="halo"), "halo", "longformer")
    _raises(lambda: fad.sequence_parallel_attention(*s, "softmax", strategy="halo"), "halo", "softmax")
    _raises(lambda: fad.sequence_parallel_attention(*s, "softmax", layout="diagonal"), "layout", "diagonal")
    _raises(lambda: fad.shard_sequence(q[:, :, :N - 1]), "divisible", str(N - 1))
    rank = dist.get_rank()
    uneven = (q[:, :, : 4 + 2 * rank], k[:, :, : 4 + 2 * rank], v[:, :, : 4 + 2 * rank])
    _raises(lambda: fad.sequence_parallel_attention(*uneven, "softmax"), "ranks disagree")
    odd = [t[:, :, : 4 - (rank == 1)] for t in s]  # only rank 1 has an odd length: every rank raises, none hangs
    _raises(lambda: fad.sequence_parallel_attention(*odd, "softmax", layout="zigzag"), "rank 1", "divisible")
    alone = dist.new_group([0])  # every rank creates it
    if rank == 0:
        _raises(lambda: fad.sequence_parallel_attention(*s, "softmax", group=alone), "at least 2 ranks")
    _raises(lambda: fad.sequence_parallel_attention(*s, "rfa", is_causal=True, gate=True), "rfa", "gate_logits")
    _raises(lambda: fad.sequence_parallel_attention(*s, "linear", is_causal=True, gate_logits=s[0][..., 0]),
            "linear", "no per-token gates")
    with pytest.raises(ValueError, match="layer form"):
        fastattn.MultiheadAttention(H * E, H, "transnormer", sequence_parallel_group=dist.group.WORLD)
    assert fad.choose_strategy("softmax") == "ring"
    assert fad.choose_strategy("lightning") == "lasp2"
    assert fad.choose_strategy("rfa", gate=True) == "lasp2"
    assert fad.choose_strategy("efficient") == "ulysses"
    assert fad.choose_strategy("local") == "halo"
    assert fad.choose_strategy("local", chunk=4, window=9) == "ulysses"
    assert fad.choose_strategy("diet", mode="dilated") == "halo"
    assert fad.choose_strategy("longformer") == "ulysses"  # global tokens
    assert fad.choose_strategy("longformer", global_tokens=()) == "halo"
    assert fad.choose_strategy("bigbird") == "ulysses"


def _worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # a collective out of step fails, never hangs
    failures = []
    try:
        for i, case in enumerate(CASES):
            try:
                _case(case, seed=100 + i)
            except Exception:  # noqa: BLE001 -- collect: every rank runs every case (collectives in step)
                failures.append(traceback.format_exc())
        for j, (method, causal, options) in enumerate(
            [("linear", True, {}), ("lightning", True, {"chunk": 4}), ("softmax", False, {}),
             ("rfa", True, {"gate": True, "num_features": 8, "chunk": 4}), ("local", False, {"window": 2})]
        ):
            try:
                _layer(method, causal, seed=200 + j, **options)
            except Exception:  # noqa: BLE001
                failures.append(traceback.format_exc())
        try:
            _errors()
        except Exception:  # noqa: BLE001
            failures.append(traceback.format_exc())
    finally:
        dist.barrier()  # no rank tears its connections down while another still uses them
        dist.destroy_process_group()
    if failures:
        raise AssertionError(f"rank {rank} of {world}:\n" + "\n".join(failures))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_equals_single_process(world: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(world, _free_port()), nprocs=world, join=True)


def test_needs_initialised_group() -> None:
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match="init_process_group"):
        fad.sequence_parallel_attention(q, q, q, "softmax")
