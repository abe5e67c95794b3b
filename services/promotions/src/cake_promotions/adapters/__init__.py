"""Adapters: PostgreSQL repositories, the outbox event writer, payments, receipts."""
