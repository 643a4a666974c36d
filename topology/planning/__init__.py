"""Rank placement: constructions, the search over rank orders, its lower bounds, and the plan it writes."""
