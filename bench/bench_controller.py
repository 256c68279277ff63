"""Step-size controllers at equal accuracy: NFE of the PI controller against torchdiffeq's integral one.

    python bench/bench_controller.py --json bench/results/cpu-controller.json          # about 3 min on 2 cores
    python bench/bench_controller.py --problems vdp lotka --coefficients 0.4,0.3 0.2,0.4

A script, not a pytest suite. For every problem and controller it solves with dopri5 at a sweep of
tolerances rtol = atol = 10^-k, measures the error of the final state against a tight reference
solution (dopri8 at 1e-13, float64) as the max over components of |error| / (1 + |reference|),
and counts the evaluations. The work-precision curve (log NFE against log error, piecewise
linear) of each controller is then read at the errors the integral controller reached, so the
table compares NFE at equal accuracy, not at equal tolerance (a controller that is more careful at
the same tolerance would otherwise look worse). Ratios below 1 mean the PI controller needs fewer
evaluations for the same error.

Problems (float64):

    vdp       Van der Pol, mu = 1 (mildly nonlinear, not stiff), y0 = (2, 0), t in [0, 20]
    lotka     Lotka-Volterra, (a, b, c, d) = (1.5, 1, 3, 1), y0 = (1, 1), t in [0, 15]
    kepler    Kepler orbit, eccentricity 0.6, three periods
    cnf2d     2-D CNF forward solve (z, logp): fastcnf's ODEnet 2-64-64-64-2 concatsquash tanh with
              weights x2.5 (a trained-looking flow), 8gaussians batch 512, exact divergence, T = 0.5
    cnf64     64-D CNF forward solve: ODEnet 64-256-256-64 concatsquash tanh, weights x1.5, digits
              batch 128, Hutchinson divergence (fixed noise), T = 0.5

The CNF training step itself (forward and adjoint solve, the NFE that costs time) is measured by
``bench/bench_training_step.py --controller pi``.
"""

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastcnf  # noqa: E402

PROBLEMS = ("vdp", "lotka", "kepler", "cnf2d", "cnf64")
DEFAULT_COEFFICIENTS = ("0.4,0.3", "0.3,0.3", "0.2,0.4", "0.4,1.0", "0.1,0.9")


def van_der_pol():
    def func(t, y):
        return torch.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]])

    return func, torch.tensor([2.0, 0.0], dtype=torch.float64), 20.0


def lotka_volterra():
    def func(t, y):
        return torch.stack([1.5 * y[0] - y[0] * y[1], -3.0 * y[1] + y[0] * y[1]])

    return func, torch.tensor([1.0, 1.0], dtype=torch.float64), 15.0


def kepler(eccentricity=0.6):
    def func(t, y):
        r3 = (y[0] ** 2 + y[1] ** 2) ** 1.5
        return torch.stack([y[2], y[3], -y[0] / r3, -y[1] / r3])

    y0 = torch.tensor([1 - eccentricity, 0.0, 0.0, math.sqrt((1 + eccentricity) / (1 - eccentricity))],
                      dtype=torch.float64)
    return func, y0, 3 * 2 * math.pi


def _cnf(dim, hidden, scale, data, estimator):
    from fastcnf.cnf import CNFDynamics, ODEnet

    torch.manual_seed(0)
    net = ODEnet(dim, hidden, "concatsquash", "tanh").double()
    with torch.no_grad():
        for layer in net.layers:
            layer.linear.weight.mul_(scale)
    estimator.resample(data)
    dynamics = CNFDynamics(net, estimator)
    return dynamics, (data, torch.zeros(data.shape[0], dtype=torch.float64)), 0.5


def cnf_2d():
    from fastcnf.cnf import ExactDivergence
    from fastcnf.training.data import toy_sample

    data = torch.as_tensor(toy_sample("8gaussians", 512, np.random.default_rng(0)), dtype=torch.float64)
    return _cnf(2, (64, 64, 64), 2.5, data, ExactDivergence())


def cnf_64():
    from fastcnf.cnf import HutchinsonDivergence
    from fastcnf.training.data import load_digits

    data = (torch.as_tensor(load_digits(seed=0).train[:128], dtype=torch.float64) + 0.5) / 17.0  # levels -> (0, 1)
    torch.manual_seed(1)
    return _cnf(64, (256, 256), 1.5, data, HutchinsonDivergence())


BUILDERS = {"vdp": van_der_pol, "lotka": lotka_volterra, "kepler": kepler, "cnf2d": cnf_2d, "cnf64": cnf_64}
TOLERANCES = {"vdp": range(3, 11), "lotka": range(3, 11), "kepler": range(3, 11), "cnf2d": range(3, 9),
              "cnf64": range(3, 8)}


def _final(solution):
    if isinstance(solution, tuple):
        return torch.cat([part[-1].reshape(-1) for part in solution])
    return solution[-1].reshape(-1)


def _solve(func, y0, t_end, tol, options, method="dopri5"):
    t = torch.tensor([0.0, t_end], dtype=torch.float64)
    with torch.no_grad(), fastcnf.track() as stats:
        solution = fastcnf.odeint(func, y0, t, rtol=tol, atol=tol, method=method, options=options)
    return _final(solution), stats.nfe_forward


def work_precision(name, controllers):
    """{controller label: [(tolerance exponent, error, nfe)]} for one problem."""
    func, y0, t_end = BUILDERS[name]()
    reference, _ = _solve(func, y0, t_end, 1e-13, None, method="dopri8")
    curves = {}
    for label, options in controllers.items():
        points = []
        for k in TOLERANCES[name]:
            final, nfe = _solve(func, y0, t_end, 10.0 ** -k, options)
            error = float(((final - reference).abs() / (1 + reference.abs())).max())
            points.append((k, error, nfe))
        curves[label] = points
    return curves


def nfe_at_error(points, error):
    """NFE of a work-precision curve at ``error``, by piecewise-linear interpolation in log-log (None outside)."""
    pairs = sorted((math.log(max(e, 1e-300)), math.log(n)) for _, e, n in points)
    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    x = math.log(error)
    if not xs[0] <= x <= xs[-1]:
        return None
    return math.exp(float(np.interp(x, xs, ys)))


def compare(curves, baseline="integral"):
    """Per controller: the geometric mean over the baseline's errors of NFE / baseline NFE, and the range."""
    summary = {}
    for label, points in curves.items():
        if label == baseline:
            continue
        ratios = []
        for _, error, nfe in curves[baseline]:
            other = nfe_at_error(points, error)
            if other is not None:
                ratios.append(other / nfe)
        if ratios:
            summary[label] = dict(geomean=math.exp(sum(map(math.log, ratios)) / len(ratios)), low=min(ratios),
                                  high=max(ratios), points=len(ratios))
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", choices=PROBLEMS, default=list(PROBLEMS))
    parser.add_argument("--coefficients", nargs="+", default=list(DEFAULT_COEFFICIENTS),
                        help="PI coefficient pairs pcoeff,icoeff")
    parser.add_argument("--json", help="write the curves and the comparison here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    controllers = {"integral": None}
    for pair in args.coefficients:
        pcoeff, icoeff = (float(v) for v in pair.split(","))
        controllers[f"pi({pcoeff:g},{icoeff:g})"] = dict(controller="pi", pcoeff=pcoeff, icoeff=icoeff)
    results = {}
    print("| problem | controller | NFE / integral NFE at equal error (geomean) | range | points |")
    print("|---|---|---|---|---|")
    for name in args.problems:
        curves = work_precision(name, controllers)
        summary = compare(curves)
        results[name] = dict(curves=curves, comparison=summary)
        for label, row in summary.items():
            print(f"| {name} | {label} | {row['geomean']:.3f} | {row['low']:.2f}-{row['high']:.2f} | {row['points']} |",
                  flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(tolerances={k: list(v) for k, v in TOLERANCES.items()}, results=results), handle, indent=1)


if __name__ == "__main__":
    main()
