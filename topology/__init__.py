"""Cluster topology model, measured profiles and the hierarchical ring planner."""
