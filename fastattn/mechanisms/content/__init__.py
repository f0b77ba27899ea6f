"""Content-based selection: each query attends the keys that its content (hash bucket, cluster) selects
(reformer, clustered), on the bucketed engine of :mod:`fastattn.ops.bucketed`."""
