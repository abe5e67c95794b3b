"""Use cases of the promotions service, each one transaction through the unit of work."""
