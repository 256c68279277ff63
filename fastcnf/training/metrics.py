"""Training metrics on disk: one CSV row per iteration, a JSON summary rewritten atomically.

``MetricsLog`` appends rows to ``metrics.csv`` (flushed per row) with the columns of its first
row. On resume ``truncate(iteration)`` drops rows written after the checkpoint being resumed, so
the file ends up with exactly one row per iteration, as if the run had never stopped.
"""

import csv
import json
import math
import os

from .checkpoint import atomic_write_text

__all__ = ["MetricsLog", "write_summary"]


def _format(value):
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


class MetricsLog:
    """CSV file of per-iteration rows (dicts with the same keys); ``iteration`` is the first column."""

    def __init__(self, path):
        self.path = path
        self.columns = None
        if os.path.isfile(path):
            with open(path, newline="") as handle:
                header = next(csv.reader(handle), None)
            self.columns = header or None

    def rows(self):
        """Every row as a dict of strings."""
        if not os.path.isfile(self.path):
            return []
        with open(self.path, newline="") as handle:
            return list(csv.DictReader(handle))

    def truncate(self, iteration):
        """Keep the complete rows with iteration <= ``iteration`` (atomically rewritten).

        A row cut short by a killed process (no final newline) is dropped too.
        """
        if self.columns is None:
            return
        with open(self.path, newline="") as handle:
            lines = handle.readlines()
        complete = [line for line in lines[1:] if line.endswith("\n")]
        kept = [line for line in complete if int(line.split(",", 1)[0]) <= iteration]
        atomic_write_text("".join([lines[0]] + kept), self.path)

    def append(self, row):
        if self.columns is None:
            self.columns = list(row)
            with open(self.path, "w", newline="") as handle:
                handle.write(",".join(self.columns) + "\n")
        missing = set(self.columns) ^ set(row)
        if missing:
            raise ValueError(f"metrics row keys {sorted(row)} differ from the CSV columns {self.columns}.")
        with open(self.path, "a", newline="") as handle:
            handle.write(",".join(_format(row[c]) for c in self.columns) + "\n")
            handle.flush()


def write_summary(summary, path):
    """``summary`` (JSON-serializable dict) to ``path`` atomically, pretty-printed."""
    atomic_write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", path)
