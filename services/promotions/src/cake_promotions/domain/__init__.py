"""Promotion rules with no I/O: campaigns, enrollment, vouchers, money and top-ups."""
