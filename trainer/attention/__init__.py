"""Sequence-parallel attention: zigzag ring attention, Ulysses all-to-all, and their hook into HF models."""
