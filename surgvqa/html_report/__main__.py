"""``python -m surgvqa.html_report …``: the same as ``surgvqa report …``."""

from surgvqa.html_report import main

raise SystemExit(main())
