"""Classic attention (family ``classic``): the alignment models of neural machine translation and reading
(Bahdanau, Luong, Graves, ...). Most are kind ``seq2seq`` and selected through
:class:`fastattn.AlignmentAttention`; the catalogue gives each its kind."""
