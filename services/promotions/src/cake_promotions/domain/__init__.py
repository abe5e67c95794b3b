"""Promotion rules with no I/O: campaigns, enrolment, vouchers, money and top-ups."""
