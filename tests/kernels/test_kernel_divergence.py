"""The Hutchinson estimator of fastcnf.cnf.divergence runs the fused kernel for ODEnet MLPs (every layer kind,
folded into affine layers at the evaluation time)."""

import pytest
import torch

pytest.importorskip("triton")

from fastcnf.kernels import hutchinson  # noqa: E402

from fastcnf.cnf.divergence import HutchinsonDivergence  # noqa: E402
from fastcnf.cnf.nets import ODEnet  # noqa: E402


@pytest.mark.parametrize("layer", ["concat", "concatsquash", "ignore"])
def test_estimator_with_kernel_equals_autograd(layer, device, monkeypatch):
    monkeypatch.setenv("FASTCNF_BACKEND", "triton")
    calls = []
    kernel = hutchinson.hutchinson_mlp
    monkeypatch.setattr(hutchinson, "hutchinson_mlp", lambda *args: calls.append(1) or kernel(*args))
    torch.manual_seed(0)
    net = ODEnet(2, (8, 8), layer, "softplus").double().to(device)
    z = torch.randn(5, 2, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.tensor(0.3, dtype=torch.float64, device=device)
    results = []
    for fused in (False, True):
        estimator = HutchinsonDivergence("rademacher", fused_kernel=fused)
        torch.manual_seed(1)
        estimator.resample(z)
        estimate = estimator(net, t, z)
        loss = estimate.f.pow(2).sum() + estimate.divergence.sum()
        results.append((estimate.f, estimate.divergence, torch.autograd.grad(loss, [z, *net.parameters()])))
    assert calls, "the fused kernel was not used"
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])
    for fused_grad, autograd_grad in zip(results[1][2], results[0][2]):
        torch.testing.assert_close(fused_grad, autograd_grad)
