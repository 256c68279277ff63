"""``python -m fastcnf <command>``; see ``fastcnf.cli``."""

from .cli import main

raise SystemExit(main())
