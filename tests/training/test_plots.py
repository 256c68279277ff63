"""The 2-D density picture: every panel has axes with their scale and a colorbar, the figure title
(the trainer puts the test NLL and the iteration count there) sits above the panel titles, and no two
pieces of text or panels overlap."""

import itertools
import math

import numpy as np
import pytest
import torch

from fastcnf.training.config import TrainConfig
from fastcnf.training.plots import density_figure
from fastcnf.training.trainer import Trainer

pytest.importorskip("matplotlib")


class StandardNormal(torch.nn.Module):
    """log N(x; 0, I) in 2-D, with one (unused) parameter so the grid takes its dtype."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def log_prob(self, x):
        return -0.5 * x.pow(2).sum(1) - math.log(2 * math.pi)


@pytest.fixture
def figure():
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(4000, 2, generator=generator).numpy()
    samples = torch.randn(3000, 2, generator=generator).numpy()
    figure = density_figure(data, StandardNormal(), samples, bound=4.0, resolution=60,
                            title="ffjord on 8gaussians, 1000 iterations: test NLL 2.871 nats")
    figure.canvas.draw()
    yield figure
    import matplotlib.pyplot as plt

    plt.close(figure)


def panels_and_colorbars(figure):
    panels = [axis for axis in figure.axes if axis.get_label() != "<colorbar>"]
    colorbars = [axis for axis in figure.axes if axis.get_label() == "<colorbar>"]
    return panels, colorbars


def test_every_panel_has_scaled_axes_and_a_colorbar(figure):
    panels, colorbars = panels_and_colorbars(figure)
    assert len(panels) == 3 and len(colorbars) == 3
    for axis in panels:
        assert axis.get_xlim() == (-4.0, 4.0) and axis.get_ylim() == (-4.0, 4.0)
        for ticks in (axis.get_xticks(), axis.get_yticks()):
            shown = [tick for tick in ticks if -4.0 <= tick <= 4.0]
            assert len(shown) >= 3 and min(shown) < 0 < max(shown)
        assert [label.get_text() for label in axis.get_xticklabels() if label.get_text()]
        assert axis.get_xlabel() and axis.get_ylabel()
    density_bar = colorbars[1]
    assert density_bar.get_ylabel() == "density (per unit area)"
    low, high = density_bar.get_ylim()  # the colorbar spans the density's range: max of N(0, I) is 1/(2 pi)
    assert low == pytest.approx(0.0, abs=1e-3) and high == pytest.approx(1 / (2 * math.pi), rel=0.02)


def test_titles_and_panels_do_not_overlap(figure):
    renderer = figure.canvas.get_renderer()
    panels, colorbars = panels_and_colorbars(figure)
    title = figure._suptitle
    assert title.get_text().endswith("test NLL 2.871 nats")
    boxes = {"figure title": title.get_window_extent(renderer)}
    for index, axis in enumerate(panels):
        boxes[f"title {index}"] = axis.title.get_window_extent(renderer)
        boxes[f"panel {index}"] = axis.get_window_extent(renderer)
        boxes[f"colorbar {index}"] = colorbars[index].get_tightbbox(renderer)
    for (name_a, a), (name_b, b) in itertools.combinations(boxes.items(), 2):
        assert not a.overlaps(b), (name_a, name_b)
    for axis in panels:  # the figure title is above every panel title, all inside the figure
        assert boxes["figure title"].y0 >= axis.title.get_window_extent(renderer).y1
    width, height = figure.canvas.get_width_height()
    assert all(0 <= box.x0 and box.x1 <= width and 0 <= box.y0 and box.y1 <= height for box in boxes.values())


def test_the_trainer_titles_the_picture_with_test_nll_and_iterations(tmp_path, monkeypatch):
    titles = []
    monkeypatch.setattr("fastcnf.training.plots.plot_2d", lambda *args, title=None, **kwargs: titles.append(title))
    config = TrainConfig(data="8gaussians", hidden=(8,), batch_size=32, iterations=2, rtol=1e-3, atol=1e-3,
                         val_size=100, out=str(tmp_path / "run"), threads=1)
    summary = Trainer(config, progress=False).run()
    assert titles == [f"ffjord on 8gaussians, 2 iterations: test NLL {summary['test']['nll']:.3f} nats"]
    assert np.isfinite(summary["test"]["nll"])
