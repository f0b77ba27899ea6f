"""Softmax attention ops: dense (the reference), online over key tiles, flash blocks."""
