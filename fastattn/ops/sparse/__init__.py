"""Block-sparse attention ops: patterns, plans, the grouped engine, the dense reference, memory nodes."""
