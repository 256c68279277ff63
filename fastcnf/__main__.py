"""``python -m fastcnf <command>``; see ``fastcnf.training.cli``."""

from .training.cli import main

raise SystemExit(main())
