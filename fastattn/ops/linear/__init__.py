"""Linear-attention ops: ``engine`` (the op :func:`linear_attention`, the dense reference, the closed-form
state), ``tiled`` (the one implementation of the recurrence: tiled kernels with state, decay and gates,
registered as ``torch.library`` custom ops), ``state`` (:class:`LinearState`, the decoding state)."""
