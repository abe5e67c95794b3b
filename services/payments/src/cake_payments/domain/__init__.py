"""The bank's rules: ledger entries and the faults it can act out (no I/O)."""
