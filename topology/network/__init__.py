"""The network a plan runs on: the graph of GPUs, links and switches, its routes, and where it comes from."""
