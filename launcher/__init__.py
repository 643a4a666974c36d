"""The Ray controller and the ``ringleader`` command line."""
