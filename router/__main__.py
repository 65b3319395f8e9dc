"""``python -m router``: the command line (see router.cli)."""

from router.cli import main

raise SystemExit(main())
