"""Softmax attention ops: :mod:`.dense` (the literal formula: the reference), :mod:`.online` (partial
results ``(out, lse)``, :func:`~.online.merge_partials`, the online softmax over key tiles) and
:mod:`.flash` (tiled, recomputing backward; its per-block forward and backward are public) and
:mod:`.fused` (torch's fused SDPA under any mask, all-masked rows zero)."""
