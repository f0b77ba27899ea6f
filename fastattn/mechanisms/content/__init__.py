"""Content-based selection: each query attends the keys that its content (hash bucket, k-means cluster)
selects (reformer, routing, clustered), on the bucketed engine of :mod:`fastattn.ops.bucketed` and the
k-means of :mod:`fastattn.ops.clustering`."""
