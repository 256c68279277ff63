"""Shared test set-up: the helpers next to this file (``problems``, ``cli_runs``) import from every
test folder."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
