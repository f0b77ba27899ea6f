"""The ops layer: mechanism-agnostic attention computations that mechanisms are built from.

Nothing here imports a mechanism or a family; a mechanism module is a thin composition of these ops.

* :mod:`.softmax` -- dense softmax attention (the reference of everything exact), online softmax over
  key tiles (``(out, lse)`` partial results and their merge), flash blocks;
* :mod:`.chunked` -- the checkpointed query-chunk loop (O(chunk * n) memory for quadratic mechanisms);
* :mod:`.linear` -- linear attention ``phi(Q) (phi(K)^T V)``: the dense reference, the chunked scan and
  the tiled kernels (causal and not, with decay / gates and carried state);
* :mod:`.sparse` -- block-sparse attention: patterns, plans (cached across calls), the grouped engine,
  the dense reference, extra / memory nodes;
* :mod:`.gather` -- attention over an explicit per-query list of key indices (grouped, recomputing);
* :mod:`.permute` -- sort / unsort per (batch, head) by a content key, carrying the original positions;
* :mod:`.bucketed` -- attention within label-sorted neighbourhoods (hash buckets, clusters): chunks, causal
  and label windows on original positions, rounds merged with duplicates counted once; dense selection
  masks and the dense formula for references;
* :mod:`.clustering` -- k-means over the tokens of every (batch, head) row (farthest-point start, Lloyd
  steps, differentiable centroid means);
* :mod:`.features` -- named feature maps and the padding helpers kernel mechanisms share;
* :mod:`.routing` -- top-k routing of tokens over experts (softmax / renormalised / sigmoid gates), the
  load-balance, z and selection-entropy auxiliary losses, and the gates applied to head outputs or to
  batched expert projections;
* :mod:`.cluster` -- deterministic k-means over a few vectors (heads) and the cosine distance;
* :mod:`.permutohedral` -- Gaussian filtering of values at low-dimensional positions on the permutohedral
  lattice (splat, binomial blur, slice; refinable toward the exact filter) and its dense references;
* :mod:`.ema` -- the multi-dimensional damped exponential moving average (a diagonal linear recurrence per
  channel) by FFT convolution with a carried state, and its recurrence;
* :mod:`.positions` -- relative-position biases (ALiBi's head slopes);
* :mod:`.constant` -- attention by constant (input-independent) tables in probability space: looked up at
  absolute positions, masked, rows renormalised.
"""
