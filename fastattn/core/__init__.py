"""Building blocks shared by all mechanisms: the base class, masks, dense reference, online softmax."""
