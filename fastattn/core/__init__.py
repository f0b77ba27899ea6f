"""The contract every mechanism is written against: the base class, the input checks, masks, decoding states."""
