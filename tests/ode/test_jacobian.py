"""Dense and per-row Jacobians of the dynamics against torch.autograd.functional.jacobian."""

import pytest
import torch

from fastcnf.errors import InvalidOptionError
from fastcnf.ode.dynamics import Dynamics, Perturb, StateLayout
from fastcnf.ode.implicit.jacobian import DynamicsJacobian, RowBlocks

F64 = torch.float64


def _tuple_rows_problem():
    """A (4, 3) state and a (4, 1) state; row b of the output depends on row b only."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 4, generator=generator, dtype=F64)

    def func(t, state):
        z, w = state
        joined = torch.cat([z, w], dim=1)
        out = torch.tanh(joined @ weight) * (1 + t)
        return out[:, :3], out[:, 3:] * w

    state = (torch.randn(4, 3, generator=generator, dtype=F64), torch.randn(4, 1, generator=generator, dtype=F64))
    return func, state


def _dynamics(func, state):
    layout = StateLayout(state)
    dtype = state[0].dtype if isinstance(state, tuple) else state.dtype
    return Dynamics(func, layout, False, dtype, torch.device("cpu")), layout


def _reference(func, state, t):
    dynamics, layout = _dynamics(func, state)
    flat = layout.flatten(state)
    return torch.autograd.functional.jacobian(lambda y: dynamics(t, y), flat), dynamics, flat


@pytest.mark.parametrize("method", ["jacfwd", "jacrev", "finite_difference", "auto"])
def test_dense_jacobian(method):
    func, state = _tuple_rows_problem()
    expected, dynamics, flat = _reference(func, state, 0.3)
    jacobian = DynamicsJacobian(dynamics, method)(0.3, flat, dynamics(0.3, flat), Perturb.NONE)
    tolerance = 1e-6 if method in ("finite_difference", "auto") else 1e-14
    torch.testing.assert_close(jacobian, expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("method", ["jacfwd", "jacrev", "finite_difference"])
def test_row_blocks_are_the_diagonal_blocks_of_the_dense_jacobian(method):
    func, state = _tuple_rows_problem()
    expected, dynamics, flat = _reference(func, state, 0.3)
    rows = RowBlocks(dynamics.layout, flat.device)
    blocks = DynamicsJacobian(dynamics, method, rows)(0.3, flat, dynamics(0.3, flat), Perturb.NONE)
    assert blocks.shape == (4, 4, 4)
    index = rows.index  # (B, D) flat positions of each row
    for b in range(4):
        block = expected[index[b]][:, index[b]]
        tolerance = 1e-6 if method == "finite_difference" else 1e-14
        torch.testing.assert_close(blocks[b], block, rtol=0, atol=tolerance)
    # The problem really is block diagonal: everything off the blocks is zero.
    mask = torch.zeros_like(expected, dtype=torch.bool)
    for b in range(4):
        mask[index[b][:, None], index[b][None, :]] = True
    assert float(expected[~mask].abs().max()) == 0.0


def test_row_blocks_round_trip_and_layout():
    func, state = _tuple_rows_problem()
    layout = StateLayout(state)
    rows = RowBlocks(layout, torch.device("cpu"))
    flat = layout.flatten(state)
    as_rows = rows.to_rows(flat)
    torch.testing.assert_close(as_rows, torch.cat(state, dim=1), rtol=0, atol=0)
    torch.testing.assert_close(rows.from_rows(as_rows), flat, rtol=0, atol=0)
    single = RowBlocks(StateLayout(torch.zeros(5, 2, 3)), torch.device("cpu"))
    assert (single.count, single.width, single.index) == (5, 6, None)


def test_row_blocks_need_a_shared_leading_dimension():
    with pytest.raises(InvalidOptionError, match="leading"):
        RowBlocks(StateLayout((torch.zeros(3, 2), torch.zeros(2, 2))), torch.device("cpu"))


def test_auto_uses_finite_differences_for_few_columns_and_jacfwd_otherwise():
    small, _ = _dynamics(lambda t, y: y, torch.zeros(16))
    large, _ = _dynamics(lambda t, y: y, torch.zeros(17))
    assert DynamicsJacobian(small, "auto").method == "finite_difference"
    assert DynamicsJacobian(large, "auto").method == "jacfwd"


def test_finite_difference_steps_follow_small_entries_in_float32():
    """d(y^2)/dy at y = (1, 3e-5, 0): a step of sqrt(eps) would swamp the small entry."""
    y = torch.tensor([1.0, 3e-5, 0.0])
    dynamics, _ = _dynamics(lambda t, y: y ** 2, y)
    jacobian = DynamicsJacobian(dynamics, "finite_difference")(0.0, y, y ** 2, Perturb.NONE)
    assert jacobian.dtype == torch.float32
    torch.testing.assert_close(jacobian.diagonal(), 2 * y, rtol=1e-3, atol=1e-6)
    assert float((jacobian - torch.diag(jacobian.diagonal())).abs().max()) == 0.0


def test_jacfwd_keeps_the_state_dtype():
    """torch.func promotes float * 0-dim float32 tensor to float64; the Jacobian must not."""
    y = torch.tensor([1.0, 2.0])
    dynamics, _ = _dynamics(lambda t, y: torch.stack([-0.04 * y[0], 0.5 * y[1]]), y)
    jacobian = DynamicsJacobian(dynamics, "jacfwd")(0.0, y, dynamics(0.0, y), Perturb.NONE)
    assert jacobian.dtype == torch.float32
    torch.testing.assert_close(jacobian, torch.diag(torch.tensor([-0.04, 0.5])), rtol=0, atol=1e-7)
