"""Cluster configs for a recipe: rendered for the Ray cluster launcher and KubeRay, and validated offline."""
