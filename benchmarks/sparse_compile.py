"""Graph breaks of every sparse mechanism under ``torch._dynamo.explain`` (forward, and forward with
inputs that require grad), the module built outside the traced function.

    PYTHONPATH=. python benchmarks/sparse_compile.py [name ...]

B=1, H=2, n=67, E=16, each mechanism's ``test_options``, causal where the mechanism is. Patterns and
plans are built eagerly (``PatternMechanism.pattern_and_plan``, ``cached_plan``: ``ops.sparse.plan.eager``),
which costs a break where traced work comes before them: mechanisms that call the engine once per
pattern (axial, jukebox, interlaced) or transform the inputs first (handcrafted). sac's breaks are in
its LSTM edge predictor, not in the gather.

At 7afe670 (plans built inside the traced region): bp_transformer 4/4, local 4/4, sparse_transformer
5/5, diet 4/4, longformer 17/18, bigbird 9/9, etc 7/7, gmat 4/4, star 4/4, interlaced 6/8, jukebox 8/8,
multiscale 4/4, handcrafted 5/5, hat 4/4, axial 8/8, sac 1/1 (no grad / grad).
"""

import sys

import torch

import fastattn

if __name__ == "__main__":
    names = sys.argv[1:] or [s.name for s in fastattn.methods("sparse")]
    print("| mechanism | breaks (no grad) | breaks (grad) |\n|---|---|---|")
    for name in names:
        spec = fastattn.get_method(name)
        counts = []
        for grad in (False, True):
            kw = {"generator": torch.Generator().manual_seed(0)} if spec.randomized else {}
            opts = spec.make_options(**spec.cls.test_options)
            mech = spec.cls(opts, head_dim=16, num_heads=2, num_kv_heads=2, **kw)
            q, k, v = (torch.randn(1, 2, 67, 16, requires_grad=grad) for _ in range(3))
            torch._dynamo.reset()
            counts.append(torch._dynamo.explain(lambda q, k, v: mech.run(q, k, v, is_causal=spec.causal))(q, k, v)
                          .graph_break_count)
        print(f"| {name} | {counts[0]} | {counts[1]} |", flush=True)
