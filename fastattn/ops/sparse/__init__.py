"""Block-sparse attention ops: ``patterns`` (what each query may see, as data), ``plan`` (the block
layout and masks of one call, cached across calls), ``engine`` (the grouped autograd engine, ``(out,
lse)`` on request), ``reference`` (the literal dense form) and ``nodes`` (extra and learned memory
keys/values)."""
