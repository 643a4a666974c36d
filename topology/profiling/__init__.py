"""Measuring a live cluster's links with the transport training uses, and turning the figures into a topology."""
