"""The structured MLP trace pass (fastcnf.kernels.tangent_mlp) and the Triton Hutchinson kernel against the
same references: torch.func.jvp, the exact Jacobian, and float64 finite differences (gradcheck)."""

import pytest
import torch

from fastcnf.kernels import tangent_mlp

# torch.func.jvp loads TorchScript decompositions on first use, which warns in torch 2.13.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}
ACTIVATIONS = list(tangent_mlp.ACTIVATIONS)


def _mlp(widths, dtype=torch.float64, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(n_out, n_in, generator=generator, dtype=dtype) * 1.5 / n_in ** 0.5
               for n_in, n_out in zip(widths, widths[1:])]
    biases = [torch.randn(n_out, generator=generator, dtype=dtype) * 0.5 for n_out in widths[1:]]
    return [w.to(device) for w in weights], [b.to(device) for b in biases]


def _states(batch, dim, dtype=torch.float64, seed=1, probes=1, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, dim, generator=generator, dtype=dtype) * 2  # reaches the activations' curved parts
    eps = torch.randn(probes, batch, dim, generator=generator, dtype=dtype)
    return z.to(device), eps.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("exact", [True, False], ids=["unit-probes", "two-probes"])
def test_matches_the_jvp_reference(activation, exact, dtype):
    weights, biases = _mlp((3, 17, 5, 3), dtype)
    z, probes = _states(33, 3, dtype, probes=2)
    probes = None if exact else probes
    got = tangent_mlp.tangent_mlp(weights, biases, activation, z, probes, frobenius=True)
    expected = tangent_mlp.tangent_mlp_reference(weights, biases, activation, z, probes, frobenius=True)
    for value, reference in zip(got, expected):
        torch.testing.assert_close(value, reference, **TOL[dtype])


@pytest.mark.parametrize("widths, batch", [((1, 1), 1), ((2, 4, 2), 7), ((7, 33, 2, 7), 70)])
def test_odd_shapes_against_the_exact_jacobian(widths, batch):
    """A single linear layer on 1-D states, one row, a bottleneck: trace and Frobenius norm of df/dz."""
    weights, biases = _mlp(widths)
    z, _ = _states(batch, widths[0])
    f, trace, squares = tangent_mlp.tangent_mlp(weights, biases, "softplus", z, frobenius=True)

    def mlp(row):
        return tangent_mlp.tangent_mlp_reference(weights, biases, "softplus", row[None])[0][0]

    jacobians = torch.stack([torch.autograd.functional.jacobian(mlp, row) for row in z])
    torch.testing.assert_close(f, torch.stack([mlp(row) for row in z]), **TOL[torch.float64])
    torch.testing.assert_close(trace, jacobians.diagonal(dim1=1, dim2=2).sum(1), **TOL[torch.float64])
    torch.testing.assert_close(squares, jacobians.square().sum((1, 2)), **TOL[torch.float64])


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("exact", [True, False], ids=["unit-probes", "two-probes"])
def test_gradcheck(activation, exact):
    """The hand-derived backward: gradients of (f, trace, frobenius) for z, the probes, every weight and bias."""
    weights, biases = _mlp((2, 4, 3, 2))
    z, probes = _states(3, 2, probes=2)
    inputs = [z, *weights, *biases] + ([] if exact else [probes])
    inputs = [tensor.clone().requires_grad_() for tensor in inputs]

    def fused(z, *params):
        return tangent_mlp.tangent_mlp(params[:3], params[3:6], activation, z, None if exact else params[6],
                                       frobenius=True)

    assert torch.autograd.gradcheck(fused, inputs)


def test_backward_matches_autograd_of_the_reference_in_float32():
    weights, biases = _mlp((3, 16, 16, 3), torch.float32)
    z, eps = _states(40, 3, torch.float32)
    grad_f, grad_trace = _states(40, 3, torch.float32, seed=3)
    grads = []
    for function in (tangent_mlp.tangent_mlp, tangent_mlp.tangent_mlp_reference):
        inputs = [x.clone().requires_grad_() for x in (z, eps, *weights, *biases)]
        f, trace = function(inputs[2:5], inputs[5:], "tanh", inputs[0], inputs[1])
        loss = (f * grad_f).sum() + (trace * grad_trace[0, :, 0]).sum()
        grads.append(torch.autograd.grad(loss, inputs))
    for fused, expected in zip(*grads):
        torch.testing.assert_close(fused, expected, **TOL[torch.float32])


def test_no_graph_without_gradients(monkeypatch):
    weights, biases = _mlp((2, 8, 2))
    z, _ = _states(9, 2)
    calls = []
    monkeypatch.setattr(tangent_mlp.TangentMLP, "apply", lambda *args: calls.append(args))
    f, trace = tangent_mlp.tangent_mlp(weights, biases, "elu", z)
    assert not calls and not f.requires_grad and not trace.requires_grad


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_derivatives_are_torchs(activation):
    x = torch.linspace(-25, 25, 2000, dtype=torch.float64).requires_grad_()  # not at the softplus threshold
    value, slope, curvature = tangent_mlp.activation_derivatives(activation, x.detach())
    reference = tangent_mlp.ACTIVATIONS[activation](x)
    (first,) = torch.autograd.grad(reference.sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), x)
    torch.testing.assert_close(value, reference.detach(), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(slope, first.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(curvature, second, rtol=1e-9, atol=1e-12)


def test_bad_inputs_raise_clear_errors():
    weights, biases = _mlp((3, 5, 3))
    z, eps = _states(4, 3)
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        tangent_mlp.tangent_mlp(weights, biases, "relu", z)
    with pytest.raises(ValueError, match="maps 3 to 2 features; it must map back to D = 3"):
        tangent_mlp.tangent_mlp(weights[:1] + [weights[1][:2]], biases[:1] + [biases[1][:2]], "tanh", z)
    with pytest.raises(ValueError, match="layer 0: weight"):
        tangent_mlp.tangent_mlp(weights, biases, "tanh", z[:, :2])
    with pytest.raises(ValueError, match=r"probes must be a \(P, B, D\) tensor"):
        tangent_mlp.tangent_mlp(weights, biases, "tanh", z, eps[0])
    with pytest.raises(ValueError, match="must be torch.float64"):
        tangent_mlp.tangent_mlp(weights, biases, "tanh", z, eps.float())


# ------------------------------------------------------------ the Triton kernel, on the same references
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_kernel_is_the_same_pass_with_one_probe(activation, dtype, device):
    """hutchinson_mlp (time_concat 'none', the specs fastcnf hands it) and tangent_mlp with the noise as
    the one probe: equal values and gradients."""
    pytest.importorskip("triton")
    from fastcnf.kernels import hutchinson

    from fastcnf.cnf.mlp_spec import MLPSpec

    weights, biases = _mlp((3, 12, 7, 3), dtype, device=device)
    z, eps = _states(21, 3, dtype, device=device)
    results = []
    for run in (lambda w, b, x: hutchinson.hutchinson_mlp(MLPSpec(tuple(w), tuple(b), activation, "none"), 0.0, x,
                                                          eps[0]),
                lambda w, b, x: tangent_mlp.tangent_mlp(w, b, activation, x, eps)):
        inputs = [x.clone().requires_grad_() for x in (z, *weights, *biases)]
        f, trace = run(inputs[1:4], inputs[4:], inputs[0])
        results.append((f, trace, torch.autograd.grad(f.square().sum() + trace.sum(), inputs)))
    for got, expected in zip(results[0][:2], results[1][:2]):
        torch.testing.assert_close(got, expected, **TOL[dtype])
    for got, expected in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(got, expected, **TOL[dtype])
