"""Linear-attention ops: the dense reference, the chunked scan, the tiled kernels."""
