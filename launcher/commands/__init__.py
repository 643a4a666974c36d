"""One module per ``ringleader`` subcommand, each with ``add_arguments(parser)`` and ``run(args)``."""
