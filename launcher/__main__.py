"""``python -m launcher`` is the ``ringleader`` command."""

from launcher.cli import main

raise SystemExit(main())
