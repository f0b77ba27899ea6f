"""Classic alignment attention (kind ``seq2seq``): a decoder state attends over encoder states, selected
through :class:`fastattn.AlignmentAttention`."""
