"""Cluster topology: the network model, the profiler, the planner, the one cost model, and the visualiser.

- ``topology.network``: the graph, routing and presets.
- ``topology.profiling``: measuring a live cluster.
- ``topology.planning``: rank orders, their search and bounds, the plan.
- ``topology.cost`` (with ``topology.calibration``): step time of a placement.
- ``topology.viz``: pictures of a topology and its plan.
"""
