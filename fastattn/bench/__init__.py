"""Benchmarks: measurement primitives (:mod:`.measure`), peer adapters (:mod:`.peers`)."""
