"""Benchmarks: measurement primitives (:mod:`.measure`), peer adapters (:mod:`.peers`), the inputs and
metrics of the approximation-error section (:mod:`.inputs`, :mod:`.metrics`), the sections
(:mod:`.suite`, :mod:`.tasks`) and the report (:mod:`.report`)."""
