"""Pictures: the density grid is a normalized density; PNGs are written."""

import matplotlib.image
import torch

from fastcnf.cnf import CNF, SolverSettings
from fastcnf.cnf.nets import ODEnet
from fastcnf.training.plots import density_grid, plot_2d, plot_images


def _model():
    torch.manual_seed(0)
    solver = SolverSettings(rtol=1e-5, atol=1e-5)
    return CNF(ODEnet(2, (8,), "concat", "tanh"), divergence="exact", test_solver=solver).eval()


def test_density_grid_integrates_to_about_one():
    xs, ys, density = density_grid(_model(), bound=6.0, resolution=61)
    assert density.shape == (61, 61) and xs[0, 1] > xs[0, 0] and ys[1, 0] > ys[0, 0]
    cell = (xs[0, 1] - xs[0, 0]) * (ys[1, 0] - ys[0, 0])
    assert abs(density.sum() * cell - 1.0) < 5e-3


def test_plots_write_pngs(tmp_path):
    data, samples = torch.randn(500, 2), torch.randn(500, 2)
    plot_2d(data, _model(), samples, str(tmp_path / "density.png"), resolution=40, title="test")
    image = matplotlib.image.imread(str(tmp_path / "density.png"))
    assert image.shape[1] > 2 * image.shape[0]  # three panels side by side
    plot_images(torch.rand(10, 64), torch.rand(10, 64), str(tmp_path / "digits.png"), (8, 8))
    assert matplotlib.image.imread(str(tmp_path / "digits.png")).shape[0] > 100
