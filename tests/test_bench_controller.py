"""bench/bench_controller.py: NFE at equal accuracy read off work-precision curves, and one real problem."""

import importlib.util
import math
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


controller = _load("bench_controller")


def test_nfe_at_error_interpolates_in_log_log():
    points = [(3, 1e-3, 100), (5, 1e-5, 400)]  # NFE ~ error^(-0.301...)
    assert controller.nfe_at_error(points, 1e-4) == pytest.approx(200.0)
    assert controller.nfe_at_error(points, 1e-2) is None  # outside the curve: no extrapolation


def test_compare_reads_nfe_at_the_baselines_errors():
    curves = {"integral": [(3, 1e-3, 100), (5, 1e-5, 400)],
              "pi": [(3, 1e-3, 50), (5, 1e-5, 200)]}  # half the work at every error
    summary = controller.compare(curves)
    assert summary["pi"]["geomean"] == pytest.approx(0.5) and summary["pi"]["points"] == 2


def test_work_precision_on_van_der_pol():
    """The errors fall with the tolerance and the integral controller's NFE rise; the PI rule at
    pcoeff=0, icoeff=1 takes the same steps as the integral one."""
    curves = controller.work_precision("vdp", {"integral": None,
                                               "pi(0,1)": dict(controller="pi", pcoeff=0.0, icoeff=1.0)})
    errors = [error for _, error, _ in curves["integral"]]
    assert errors[-1] < 1e-3 * errors[0] and all(math.isfinite(e) for e in errors)
    assert [n for *_, n in curves["integral"]] == sorted(n for *_, n in curves["integral"])
    assert [n for *_, n in curves["pi(0,1)"]] == [n for *_, n in curves["integral"]]
