"""``python -m surgvqa <command> …``: the ``surgvqa`` command (see :mod:`surgvqa.cli`)."""

from surgvqa.cli import main

raise SystemExit(main())
