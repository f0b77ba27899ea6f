"""Low-rank and compressed-memory attention: keys and values summarised into a few memory nodes (projected,
pooled, convolved or synthesized) before softmax attention."""
