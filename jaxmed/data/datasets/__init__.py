"""Adapters for the official downloads of real datasets; importing registers them."""
