"""Pictures of a trained flow (matplotlib, Agg backend; nothing is shown on screen).

    plot_2d(data, model, samples, path)        data | model density on a grid | model samples
    plot_images(data, samples, path, shape)    a grid of data images next to a grid of samples

The 2-D picture has axes with their scale on every panel, a colorbar for each (the density in
probability per unit area, the histograms in points per bin), and the figure title above the panel
titles (constrained layout, so nothing overlaps); the trainer puts the test NLL and the iteration
count in that title.
"""

import math

import numpy as np
import torch

__all__ = ["plot_2d", "density_figure", "plot_images", "density_grid"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@torch.no_grad()
def density_grid(model, bound=4.0, resolution=150, batch_size=5000):
    """(xs, ys, p) with p = exp(log p(x, y)) on a resolution x resolution grid over [-bound, bound]^2."""
    param = next(model.parameters())
    axis = torch.linspace(-bound, bound, resolution, dtype=param.dtype, device=param.device)
    xs, ys = torch.meshgrid(axis, axis, indexing="xy")
    points = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)
    log_p = torch.cat([model.log_prob(chunk) for chunk in points.split(batch_size)])
    return xs.cpu().numpy(), ys.cpu().numpy(), log_p.exp().reshape(resolution, resolution).cpu().numpy()


def density_figure(data, model, samples, bound=4.0, resolution=150, title=None):
    """The matplotlib figure of ``plot_2d`` (the caller closes it)."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(14, 4.8), layout="constrained")
    limits = [[-bound, bound], [-bound, bound]]
    data, samples = np.asarray(data), np.asarray(samples)
    bins = resolution // 2
    panels = [axes[0].hist2d(data[:, 0], data[:, 1], bins=bins, range=limits, cmap="viridis")[3]]
    xs, ys, density = density_grid(model, bound, resolution)
    panels.append(axes[1].pcolormesh(xs, ys, density, cmap="viridis", shading="auto"))
    panels.append(axes[2].hist2d(samples[:, 0], samples[:, 1], bins=bins, range=limits, cmap="viridis")[3])
    names = (f"data ({len(data)} points)", "model density p(x)", f"model samples ({len(samples)})")
    labels = ("points per bin", "density (per unit area)", "points per bin")
    for axis, panel, name, label in zip(axes, panels, names, labels):
        axis.set_aspect("equal")
        axis.set_xlim(-bound, bound)
        axis.set_ylim(-bound, bound)
        axis.set_xlabel("$x_1$")
        axis.set_ylabel("$x_2$")
        axis.set_title(name)
        figure.colorbar(panel, ax=axis, label=label, shrink=0.85)
    if title:
        figure.suptitle(title)
    return figure


def plot_2d(data, model, samples, path, bound=4.0, resolution=150, title=None):
    """Data histogram, model density and sample histogram side by side, saved as a PNG at ``path``."""
    plt = _pyplot()
    figure = density_figure(data, model, samples, bound, resolution, title)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_images(data, samples, path, image_shape, count=64, title=None):
    """Up to ``count`` data rows and sample rows drawn as ``image_shape`` grey images, saved as a PNG."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 5.4), layout="constrained")
    for axis, rows, name in ((axes[0], data, "data"), (axes[1], samples, "model samples")):
        rows = np.asarray(rows)[:count]
        side = math.ceil(math.sqrt(len(rows)))
        height, width = image_shape
        canvas = np.zeros((side * (height + 1), side * (width + 1)))
        for index, row in enumerate(rows):
            top, left = (index // side) * (height + 1), (index % side) * (width + 1)
            canvas[top:top + height, left:left + width] = row.reshape(height, width)
        axis.imshow(canvas, cmap="gray", vmin=0.0, vmax=1.0)
        axis.set_title(name)
        axis.axis("off")
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=100)
    plt.close(figure)
