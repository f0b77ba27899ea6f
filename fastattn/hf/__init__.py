"""Hugging Face transformers integration (optional: ``pip install 'fastattn[hf]'``).

* :func:`register` -- a fastattn mechanism as a transformers attention implementation (attention + mask
  function);
* :func:`linearize` -- swap a model's attention modules' attention for a fastattn mechanism (learned parts
  become model parameters; decoding keeps fastattn's constant-size state in the cache);
* :func:`distill` -- Hedgehog-style attention transfer, then optional fine-tuning;
* :func:`from_pretrained` -- load a model saved after :func:`linearize`.

``fastattn convert`` (:mod:`fastattn.hf.convert`) runs the conversion of two pretrained models end to end.
"""

from .attention import register
from .distill import distill
from .linearize import attention_modules, from_pretrained, linearize

__all__ = ["register", "linearize", "distill", "from_pretrained", "attention_modules"]
