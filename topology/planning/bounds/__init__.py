"""Lower bounds on a plan's step time: what no rank order can beat, and so how far a plan is from the best.

``rates`` bounds the rates a placement's flows can reach; the floors price
terms together where one argument alone is loose: the all-to-all of every
group (``a2a_floor``), ring hops with the all-to-all (``ring_floor``), ring
hops against split Ulysses groups (``split_groups``) and ring hops against
the gradient ring's bus rate (``gradient_gate``).
"""
