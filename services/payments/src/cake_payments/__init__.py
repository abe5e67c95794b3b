"""Cake payments: a bank simulator with a durable, idempotent ledger and switchable faults."""
