"""Entropy coding: integer CDF tables and the range coder (numpy only, no torch)."""
