"""``python -m fastcnf <command>``; see ``fastcnf.training.cli``."""

import sys

try:
    from .training.cli import main
except KeyboardInterrupt:  # Ctrl-C while torch is still being imported
    print("fastcnf: interrupted before it started.", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
