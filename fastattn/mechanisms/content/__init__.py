"""Content-based selection: each query attends the keys that its content selects -- hash buckets
(reformer), k-means clusters (routing, clustered) on the bucketed engine of :mod:`fastattn.ops.bucketed`
and the k-means of :mod:`fastattn.ops.clustering`; a learned soft sort of blocks (sinkhorn); a
PatchMatch search for the best key (scram); the single best key (hard_retrieval); a product-key top-k
over a learned memory (product_key, layer-level)."""
