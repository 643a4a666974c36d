"""The search over rank orders: exact for small pools, local search otherwise.

``optimise`` drives it from the constructed orders; ``exact`` is the branch
and bound (up to the cluster's ``symmetry``, cut by ``lookahead``'s bounds on
the flows still to come), ``delta`` prices local search's moves by the
flows they touch, and ``anneal`` ends an unproven small search.
"""
