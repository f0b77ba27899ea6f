"""Peak memory of forward+backward for the sparse engine (memory only: quick, and not disturbed by CPU load).

    python benchmarks/sparse_memory.py

Each case runs in a fresh subprocess (:func:`fastattn.bench.measure.peak_memory_mb`); B=1, H=8, E=64, fp32.
The SDPA-with-dense-mask baseline is in ``benchmarks/sparse.py`` (1218 MiB at n=16384).
"""

from fastattn.bench.measure import Case, peak_memory_mb

LONGFORMER = {"window": 256, "global_tokens": (0, 1, 2, 3, 4, 5, 6, 7)}
BIGBIRD = {"block": 64, "window_blocks": 3, "global_blocks": 2, "random_blocks": 3}

if __name__ == "__main__":
    print("| case | n | peak MiB fwd+bwd |\n|---|---|---|")
    for name, opts, lengths in (("local", {"window": 256}, (16384, 65536)), ("longformer", LONGFORMER, (16384,)),
                                ("bigbird", BIGBIRD, (16384,))):
        for n in lengths:
            print(f"| {name} | {n} | {peak_memory_mb(Case(name, n, mode='fwdbwd', options=opts)):.0f} |", flush=True)
    print(f"| sdpa (no mask) | 16384 | {peak_memory_mb(Case('sdpa', 16384, mode='fwdbwd')):.0f} |")
