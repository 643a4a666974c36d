"""Needle-in-a-haystack evaluation: prompts, sharded scoring over a ring, heatmaps."""
