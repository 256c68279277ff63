"""Per-iteration CSV metrics: append, read back, truncate on resume."""

import pytest

from fastcnf.training.metrics import MetricsLog, write_summary


def _row(iteration):
    return {"iteration": iteration, "phase": "weights", "loss": 1.0 / iteration, "nfe_forward": 14}


def test_rows_round_trip_with_exact_floats(tmp_path):
    log = MetricsLog(str(tmp_path / "metrics.csv"))
    for i in (1, 2, 3):
        log.append(_row(i))
    rows = MetricsLog(str(tmp_path / "metrics.csv")).rows()
    assert [float(row["loss"]) for row in rows] == [1.0, 0.5, 1.0 / 3.0]
    assert list(rows[0]) == ["iteration", "phase", "loss", "nfe_forward"]


def test_truncate_drops_later_and_partial_rows(tmp_path):
    path = tmp_path / "metrics.csv"
    log = MetricsLog(str(path))
    for i in range(1, 6):
        log.append(_row(i))
    with open(path, "a") as handle:
        handle.write("1")  # a row cut short by SIGKILL: "1" must not count as iteration 1
    resumed = MetricsLog(str(path))
    resumed.truncate(3)
    assert [int(row["iteration"]) for row in resumed.rows()] == [1, 2, 3]
    resumed.append(_row(4))
    assert [int(row["iteration"]) for row in resumed.rows()] == [1, 2, 3, 4]


def test_rows_with_other_columns_are_rejected(tmp_path):
    log = MetricsLog(str(tmp_path / "metrics.csv"))
    log.append(_row(1))
    with pytest.raises(ValueError, match="differ from the CSV columns"):
        log.append({"iteration": 2, "loss": 0.1})


def test_summary_is_json(tmp_path):
    import json

    write_summary({"b": 1, "a": [1.5]}, str(tmp_path / "summary.json"))
    assert json.loads((tmp_path / "summary.json").read_text()) == {"a": [1.5], "b": 1}
