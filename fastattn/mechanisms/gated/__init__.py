"""Gated and mixture-of-heads attention: layer-level mechanisms whose routers or gates read the layer input
(moh today)."""
