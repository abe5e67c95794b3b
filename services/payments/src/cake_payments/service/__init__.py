"""Use cases of the bank: charge, look up (and void), faults."""
