"""The fused Hutchinson kernel against torch.func.jvp and autograd (fastcnf.kernels.hutchinson)."""

import pytest
import torch

pytest.importorskip("triton")

from fastcnf.kernels import hutchinson  # noqa: E402

from fastcnf.cnf.mlp_spec import ACTIVATIONS, MLPSpec  # noqa: E402

# torch.func.jvp loads TorchScript decompositions on first use, which warns in torch 2.13.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

# f and quad are sums over a few layers of O(1) products.
TOL = {torch.float32: dict(rtol=1e-5, atol=2e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _spec(widths, activation="tanh", time_concat="all", dtype=torch.float64, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    weights, biases = [], []
    for layer in range(len(widths) - 1):
        time_column = time_concat == "all" or (time_concat == "first" and layer == 0)
        fan_in = widths[layer] + time_column
        weights.append(torch.randn(widths[layer + 1], fan_in, generator=generator, dtype=dtype) / fan_in ** 0.5 * 1.5)
        biases.append(torch.randn(widths[layer + 1], generator=generator, dtype=dtype) * 0.5)
    return MLPSpec(tuple(w.to(device) for w in weights), tuple(b.to(device) for b in biases), activation, time_concat)


def _inputs(batch, dim, dtype, device, seed=1):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, dim, generator=generator, dtype=dtype)
    eps = torch.randn(batch, dim, generator=generator, dtype=dtype)
    return z.to(device), eps.to(device)


def _with_params(spec, params):
    layers = len(spec.weights)
    return MLPSpec(tuple(params[:layers]), tuple(params[layers:]), spec.activation, spec.time_concat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("time_concat", ["all", "first", "none"])
def test_matches_jvp_reference(dtype, activation, time_concat, device):
    spec = _spec((3, 17, 5, 3), activation, time_concat, dtype, device)
    z, eps = _inputs(33, 3, dtype, device)
    f, quad = hutchinson.hutchinson_mlp(spec, 0.4, z, eps)
    expected_f, expected_quad = hutchinson.hutchinson_reference(spec, 0.4, z, eps)
    assert f.shape == (33, 3) and quad.shape == (33,)
    torch.testing.assert_close(f, expected_f, **TOL[dtype])
    torch.testing.assert_close(quad, expected_quad, **TOL[dtype])


@pytest.mark.parametrize("widths, batch", [((1, 1), 1), ((2, 4, 2), 7), ((7, 33, 7), 70)])
def test_odd_shapes(widths, batch, device):
    """A single linear layer on 1-D states, a batch of one block and several blocks, odd widths."""
    spec = _spec(widths, "softplus", dtype=torch.float32, device=device)
    z, eps = _inputs(batch, widths[0], torch.float32, device)
    f, quad = hutchinson.hutchinson_mlp(spec, torch.tensor(-0.7), z, eps)
    expected_f, expected_quad = hutchinson.hutchinson_reference(spec, torch.tensor(-0.7), z, eps)
    torch.testing.assert_close(f, expected_f, **TOL[torch.float32])
    torch.testing.assert_close(quad, expected_quad, **TOL[torch.float32])


def test_quad_is_the_jacobian_quadratic_form(device):
    """Against the exact Jacobian: quad = eps^T (df/dz) eps for every row."""
    spec = _spec((4, 9, 4), "swish", device=device)
    z, eps = _inputs(5, 4, torch.float64, device)
    _, quad = hutchinson.hutchinson_mlp(spec, 1.3, z, eps)
    for row in range(5):
        jacobian = torch.autograd.functional.jacobian(
            lambda state: hutchinson.hutchinson_reference(spec, 1.3, state[None], eps[row:row + 1])[0][0], z[row])
        torch.testing.assert_close(quad[row], eps[row] @ jacobian @ eps[row], **TOL[torch.float64])


def test_non_contiguous_inputs(device):
    spec = _spec((3, 8, 3), "elu", device=device)
    z_storage, eps_storage = _inputs(20, 6, torch.float64, device)
    z, eps = z_storage[::2, ::2], eps_storage.t().contiguous().t()[1::2, 1::2]
    assert not z.is_contiguous() and not eps.is_contiguous()
    f, quad = hutchinson.hutchinson_mlp(spec, 0.2, z, eps)
    expected_f, expected_quad = hutchinson.hutchinson_reference(spec, 0.2, z.contiguous(), eps.contiguous())
    torch.testing.assert_close(f, expected_f, **TOL[torch.float64])
    torch.testing.assert_close(quad, expected_quad, **TOL[torch.float64])


@pytest.mark.parametrize("activation, time_concat", [(name, "all") for name in ACTIVATIONS]
                         + [("tanh", "first"), ("softplus", "none")])
def test_gradcheck(activation, time_concat, device):
    """Gradients of (f, quad) for z, eps, t, every weight and bias (float64 finite differences)."""
    spec = _spec((2, 4, 3, 2), activation, time_concat, device=device)
    z, eps = _inputs(3, 2, torch.float64, device)
    t = torch.tensor(0.3, dtype=torch.float64, device=device)
    inputs = [x.clone().requires_grad_() for x in (z, eps, t, *spec.weights, *spec.biases)]

    def fused(z, eps, t, *params):
        return hutchinson.hutchinson_mlp(_with_params(spec, params), t, z, eps)

    assert torch.autograd.gradcheck(fused, inputs, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_match_reference(dtype, device):
    spec = _spec((3, 16, 16, 3), "softplus", dtype=dtype, device=device)
    z, eps = _inputs(40, 3, dtype, device)
    grad_f, grad_quad = _inputs(40, 3, dtype, device, seed=3)
    grad_quad = grad_quad[:, 0]
    grads = []
    for function in (hutchinson.hutchinson_mlp, hutchinson.hutchinson_reference):
        inputs = [x.clone().requires_grad_() for x in (z, eps, *spec.weights, *spec.biases)]
        t = torch.tensor(0.8, dtype=torch.float64, device=device, requires_grad=True)
        f, quad = function(_with_params(spec, inputs[2:]), t, inputs[0], inputs[1])
        grads.append(torch.autograd.grad((f * grad_f).sum() + (quad * grad_quad).sum(), [*inputs, t]))
    for fused, expected in zip(*grads):
        assert fused.shape == expected.shape and fused.dtype == expected.dtype
        torch.testing.assert_close(fused, expected, **TOL[dtype])


def test_cnf_training_step(device):
    """A few Euler steps of a CNF with Hutchinson log-density; loss and every parameter gradient
    agree between the fused kernel and the reference."""
    torch.manual_seed(0)
    network = torch.nn.ModuleList([torch.nn.Linear(3, 12), torch.nn.Linear(13, 12), torch.nn.Linear(13, 2)])
    network = network.to(device)

    def spec():
        return MLPSpec(tuple(layer.weight for layer in network), tuple(layer.bias for layer in network),
                       "tanh", "all")

    x, eps = _inputs(64, 2, torch.float32, device, seed=4)
    results = []
    for function in (hutchinson.hutchinson_mlp, hutchinson.hutchinson_reference):
        network.zero_grad()
        z, log_det, dt = x, torch.zeros(64, device=device), 0.25
        for step in range(4):
            f, quad = function(spec(), torch.tensor(step * dt, device=device), z, eps)
            z, log_det = z + dt * f, log_det + dt * quad
        loss = (0.5 * z.square().sum(1) - log_det).mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in network.parameters()]))
    (loss, grads), (expected_loss, expected_grads) = results
    torch.testing.assert_close(loss, expected_loss, **TOL[torch.float32])
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, **TOL[torch.float32])


def test_no_grad_path_skips_saving(device, monkeypatch):
    spec = _spec((2, 8, 2), "sigmoid", device=device)
    z, eps = _inputs(9, 2, torch.float64, device)
    calls = []
    monkeypatch.setattr(hutchinson.HutchinsonMLP, "apply", lambda *args: calls.append(args))
    f, quad = hutchinson.hutchinson_mlp(spec, 0.0, z, eps)
    assert not calls and not f.requires_grad
    torch.testing.assert_close(quad, hutchinson.hutchinson_reference(spec, 0.0, z, eps)[1], **TOL[torch.float64])


def test_supports(triton_backend, monkeypatch, device):
    spec = _spec((2, 8, 2), device=device)
    assert hutchinson.supports(spec, device)
    assert not hutchinson.supports(_spec((2, hutchinson.MAX_WIDTH + 1, 2), device=device), device)
    assert not hutchinson.supports(_with_params(spec, [p.half() for p in spec.weights + spec.biases]), device)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors need the interpreter; CUDA ones do not
    assert hutchinson.supports(spec, device) == (device.type == "cuda")


def test_bad_inputs_raise_clear_errors():
    spec = _spec((3, 5, 3))
    z, eps = _inputs(4, 3, torch.float64, "cpu")
    with pytest.raises(ValueError, match="maps 3 to 3 features; z has 2"):
        hutchinson.hutchinson_mlp(spec, 0.0, z[:, :2], eps[:, :2])
    with pytest.raises(ValueError, match="must both be"):
        hutchinson.hutchinson_mlp(spec, 0.0, z, eps[:2])
    with pytest.raises(ValueError, match="scalar time"):
        hutchinson.hutchinson_mlp(spec, torch.zeros(4), z, eps)
    with pytest.raises(ValueError, match="must be torch.float64"):
        hutchinson.hutchinson_mlp(spec, 0.0, z, eps.float())
    broken = _with_params(spec, [spec.weights[0], spec.weights[1][:, :3], *spec.biases])
    with pytest.raises(ValueError, match="layer 1: weight"):
        hutchinson.hutchinson_mlp(broken, 0.0, z, eps)
    flat = _with_params(spec, [spec.weights[0].reshape(-1), spec.weights[1], *spec.biases])
    with pytest.raises(ValueError, match="must be 2-D"):
        hutchinson.hutchinson_mlp(flat, 0.0, z, eps)
