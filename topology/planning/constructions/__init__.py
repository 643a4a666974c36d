"""Constructed rank orders: the starting points the search scores and improves (``topology.planning.planner``).

Each module builds orders of one kind from a ``PlanRequest``: ``hosts``
chooses and orders the hosts every construction starts from;
``hierarchical`` is the textbook order; ``packing`` fills rings with whole
hosts; ``inside_hosts`` keeps rings inside hosts and strings the rest;
``segments`` uses part of each host; ``rings_apart`` spreads Ulysses groups
across rings; ``cycles`` cuts rings from one gradient-ring cycle (built by
``gradient_cycle`` or ``block_cycle``); ``card_fit`` fits cp groups to the
cards; ``cycle_rings`` re-cuts host runs at ring borders; ``ring_order``
orders GPUs inside a host and hosts in a cycle.
"""
