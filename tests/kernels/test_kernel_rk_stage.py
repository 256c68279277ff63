"""The fused RK stage kernels against their torch references (fastcnf.kernels.rk_stage)."""

import math

import pytest
import torch

pytest.importorskip("triton")

from fastcnf.kernels import rk_stage  # noqa: E402

from fastcnf.ode.control.reference import scaled_error_ratio  # noqa: E402
from fastcnf.ode.explicit import tableaus  # noqa: E402
from fastcnf.ode.norms import SegmentNorm  # noqa: E402

SIZES = [1, 7, 1000, 4097]
# Stage sums are formed in the state dtype (a few roundings of O(1) numbers); the error ratio in
# float64 against a reference that works in the state dtype.
COMBINE_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-14, atol=1e-14)}
RATIO_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _stages(tableau, numel, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    y0 = torch.randn(numel, generator=generator, dtype=dtype)
    stages = torch.randn(tableau.stages, numel, generator=generator, dtype=dtype)
    return y0.to(device), stages.to(device)


def _reference_ratio(y0, y1, stages, tableau, dt, rtol, atol, norm):
    weights = torch.tensor(tableau.b_error, dtype=y0.dtype, device=y0.device)
    return scaled_error_ratio(y0, y1, stages, weights, dt, rtol, atol, norm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("numel", SIZES)
def test_stage_combine_matches_addmv(dtype, numel, device):
    y0, stages = _stages(tableaus.DOPRI5, numel, dtype, device)
    combiner = rk_stage.TritonStageCombiner(tableaus.DOPRI5.a, tableaus.DOPRI5.b, dtype, device)
    for i in range(1, tableaus.DOPRI5.stages):
        expected = rk_stage.stage_combine_reference(y0, stages, tableaus.DOPRI5.a[i], 0.173)
        torch.testing.assert_close(combiner.stage(i, y0, stages, 0.173), expected, **COMBINE_TOL[dtype])
    expected = rk_stage.stage_combine_reference(y0, stages, tableaus.DOPRI5.b, 0.173)
    torch.testing.assert_close(combiner.solution(y0, stages, 0.173), expected, **COMBINE_TOL[dtype])


def test_stage_combine_keeps_float64_step_size(device):
    """dt reaches the kernel as float64: 1/3 is not rounded to float32 on the way."""
    y0 = torch.zeros(5, dtype=torch.float64, device=device)
    stages = torch.ones(1, 5, dtype=torch.float64, device=device)
    out = rk_stage.stage_combine(y0, stages, [1.0], 1.0 / 3.0)
    assert out.tolist() == [1.0 / 3.0] * 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stage_combine_non_contiguous(dtype, device):
    numel = 1001
    y0_storage, stages_storage = _stages(tableaus.TSIT5, 2 * numel, dtype, device)
    y0 = y0_storage[::2]  # element stride 2
    stages = stages_storage.reshape(-1)[: 7 * 2 * numel].reshape(2 * numel, 7).t()[:, ::2]  # (7, N), strides (1, 14)
    assert not y0.is_contiguous() and not stages.is_contiguous()
    weights = tableaus.TSIT5.b
    expected = rk_stage.stage_combine_reference(y0.contiguous(), stages.contiguous(), weights, 0.05)
    torch.testing.assert_close(rk_stage.stage_combine(y0, stages, weights, 0.05), expected, **COMBINE_TOL[dtype])


def test_stage_combine_gradcheck(device):
    y0 = torch.randn(7, dtype=torch.float64, device=device, requires_grad=True)
    stages = torch.randn(4, 7, dtype=torch.float64, device=device, requires_grad=True)
    weights = [0.5, 0.0, -1.25]  # a zero weight and a stage (the last) outside the row
    assert torch.autograd.gradcheck(lambda y, k: rk_stage.stage_combine(y, k, weights, 0.3), (y0, stages))


@pytest.mark.parametrize("tableau", [tableaus.DOPRI5, tableaus.TSIT5, tableaus.BOSH3, tableaus.DOPRI8],
                         ids=lambda tableau: tableau.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("numel", SIZES)
def test_error_ratio_matches_controller(tableau, dtype, numel, device):
    y0, stages = _stages(tableau, numel, dtype, device)
    y1 = rk_stage.stage_combine_reference(y0, stages, tableau.b, 0.02)
    norm = SegmentNorm.single(numel)
    ratio = rk_stage.fused_error_ratio(y0, y1, stages, tableau.b_error, 0.02, 1e-4, 1e-6, norm)
    assert ratio.dim() == 0 and ratio.dtype == torch.float64 and ratio.device == y0.device
    expected = _reference_ratio(y0, y1, stages, tableau, 0.02, 1e-4, 1e-6, norm)
    assert 0.01 < expected < 1e4  # a ratio of the size a controller sees, not 0 or inf
    assert float(ratio) == pytest.approx(expected, rel=RATIO_RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_error_ratio_segments_with_skips(dtype, device):
    """Max over segments of the RMS norm: a skipped segment with the largest error does not count;
    an empty segment and a single-element one do."""
    sizes, skip = [3, 1500, 0, 4097, 1], [False, True, False, False, False]
    numel = sum(sizes)
    y0, stages = _stages(tableaus.DOPRI5, numel, dtype, device, seed=1)
    stages[:, 3:1503] *= 1e3  # the skipped segment dominates when it counts
    y1 = rk_stage.stage_combine_reference(y0, stages, tableaus.DOPRI5.b, 0.1)
    for segment_skip in (skip, [False] * len(sizes)):
        norm = SegmentNorm.from_sizes(sizes, segment_skip)
        ratio = rk_stage.fused_error_ratio(y0, y1, stages, tableaus.DOPRI5.b_error, 0.1, 1e-3, 1e-5, norm)
        expected = _reference_ratio(y0, y1, stages, tableaus.DOPRI5, 0.1, 1e-3, 1e-5, norm)
        assert float(ratio) == pytest.approx(expected, rel=RATIO_RTOL[dtype])
    assert float(rk_stage.fused_error_ratio(y0, y1, stages, tableaus.DOPRI5.b_error, 0.1, 1e-3, 1e-5,
                                            SegmentNorm.from_sizes(sizes, [True] * len(sizes)))) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_error_ratio_per_element_tolerances_and_strides(dtype, device):
    numel = 2049
    y0_storage, stages = _stages(tableaus.DOPRI5, 2 * numel, dtype, device, seed=2)
    y0 = y0_storage[1::2]
    stages = stages[:, ::2]
    y1 = rk_stage.stage_combine_reference(y0, stages, tableaus.DOPRI5.b, 0.05)
    y1 = torch.stack([y1, y1], dim=1)[:, 0]  # element stride 2
    rtol = torch.linspace(1e-5, 1e-3, numel, dtype=torch.float64, device=device)
    atol = torch.full((numel,), 1e-6, dtype=dtype, device=device)
    norm = SegmentNorm.from_sizes([1000, numel - 1000])
    for r, a in ((rtol, 1e-6), (1e-4, atol), (rtol, atol)):
        ratio = rk_stage.fused_error_ratio(y0, y1, stages, tableaus.DOPRI5.b_error, 0.05, r, a, norm)
        expected = _reference_ratio(y0.contiguous(), y1.contiguous(), stages.contiguous(), tableaus.DOPRI5, 0.05, r,
                                    a, norm)
        assert float(ratio) == pytest.approx(expected, rel=RATIO_RTOL[dtype])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_error_ratio_non_finite_is_nan(bad, device):
    """Like the C++ controller: NaN or Inf in the new state or in a stage gives a NaN ratio."""
    y0, stages = _stages(tableaus.DOPRI5, 1500, torch.float64, device)
    y1 = rk_stage.stage_combine_reference(y0, stages, tableaus.DOPRI5.b, 0.1)
    plan = rk_stage.ErrorRatio(tableaus.DOPRI5.b_error, SegmentNorm.single(1500), 1500, 1e-3, 1e-6, device)
    assert math.isfinite(plan.value(y0, y1, stages, 0.1))
    y1_bad = y1.clone()
    y1_bad[1100] = bad
    assert math.isnan(plan.value(y0, y1_bad, stages, 0.1))
    stages_bad = stages.clone()
    stages_bad[2, 7] = bad
    assert math.isnan(plan.value(y0, y1, stages_bad, 0.1))


def test_error_ratio_is_deterministic(device):
    y0, stages = _stages(tableaus.DOPRI5, 4097, torch.float32, device)
    y1 = rk_stage.stage_combine_reference(y0, stages, tableaus.DOPRI5.b, 0.1)
    plan = rk_stage.ErrorRatio(tableaus.DOPRI5.b_error, SegmentNorm.single(4097), 4097, 1e-3, 1e-6, device)
    values = {plan.value(y0, y1, stages, 0.1) for _ in range(3)}
    assert len(values) == 1


def test_bad_inputs_raise_clear_errors(device):
    y0, stages = _stages(tableaus.DOPRI5, 10, torch.float64, device)
    with pytest.raises(ValueError, match="flat"):
        rk_stage.stage_combine(y0.reshape(2, 5), stages, [1.0], 0.1)
    with pytest.raises(ValueError, match="stages must be"):
        rk_stage.stage_combine(y0, stages[:2], [1.0, 1.0, 1.0], 0.1)
    with pytest.raises(ValueError, match="stages must be"):
        rk_stage.stage_combine(y0, stages.float(), [1.0], 0.1)
    with pytest.raises(TypeError, match="float32 and float64"):
        rk_stage.stage_combine(y0.half(), stages.half(), [1.0], 0.1)
    with pytest.raises(ValueError, match="end at the state size"):
        rk_stage.ErrorRatio(tableaus.DOPRI5.b_error, SegmentNorm.single(9), 10, 1e-3, 1e-6, device)
    with pytest.raises(TypeError, match="segment norm"):
        rk_stage.fused_error_ratio(y0, y0, stages, tableaus.DOPRI5.b_error, 0.1, 1e-3, 1e-6, torch.linalg.norm)
    with pytest.raises(ValueError, match="rtol has 3 elements"):
        rk_stage.ErrorRatio(tableaus.DOPRI5.b_error, SegmentNorm.single(10), 10, torch.ones(3), 1e-6, device)


# ---------------------------------------------------------------- dt on the device, the step decision
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_device_step_size_gives_the_float_results(dtype, device):
    """The device loop hands dt as a 0-dim tensor: the kernels read it and give the same bits."""
    tableau = tableaus.DOPRI5
    y0, stages = _stages(tableau, 1001, dtype, device, seed=4)
    dt = torch.tensor(0.0371, dtype=torch.float64, device=device)
    combiner = rk_stage.TritonStageCombiner(tableau.a, tableau.b, dtype, device)
    for i in range(1, tableau.stages):
        torch.testing.assert_close(combiner.stage(i, y0, stages, dt), combiner.stage(i, y0, stages, 0.0371),
                                   rtol=0, atol=0)
    y1 = combiner.solution(y0, stages, dt)
    ratio = rk_stage.ErrorRatio(tableau.b_error, SegmentNorm.single(1001), 1001, 1e-4, 1e-6, device)
    assert float(ratio(y0, y1, stages, dt)) == float(ratio(y0, y1, stages, 0.0371))
    y0_grad = y0.clone().requires_grad_()
    rk_stage.stage_combine(y0_grad, stages, tableau.a[3], dt).sum().backward()
    assert torch.equal(y0_grad.grad, torch.ones_like(y0))


def test_error_ratio_references_agree(device):
    """The kernel file's own torch reference and the solver's reference controller are the same rule."""
    tableau = tableaus.TSIT5
    norm = SegmentNorm.from_sizes([10, 0, 23], [False, False, True])
    y0, stages = _stages(tableau, 33, torch.float64, device, seed=5)
    y1 = rk_stage.stage_combine_reference(y0, stages, tableau.b, 0.2)
    ours = rk_stage.error_ratio_reference(y0, y1, stages, tableau.b_error, 0.2, 1e-3, 1e-6, norm)
    assert ours == pytest.approx(_reference_ratio(y0, y1, stages, tableau, 0.2, 1e-3, 1e-6, norm), rel=1e-13)
    y1[4] = math.nan
    assert math.isnan(rk_stage.error_ratio_reference(y0, y1, stages, tableau.b_error, 0.2, 1e-3, 1e-6, norm))


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_step_decision_on_the_device_equals_the_reference_rule(device):
    """``ErrorRatio.decide`` applies the step-size rule in the kernel: the same accept/reject, next step
    and status as ``fastcnf.ode.control.reference.propose_step`` for ratios around 1, 0, NaN and Inf."""
    from fastcnf.ode.control import Status, StepRule, propose_step

    codes = (int(Status.OK), int(Status.NONFINITE), int(Status.FAILED_NONFINITE))
    y0 = torch.zeros(1, dtype=torch.float64, device=device)
    stages = torch.zeros(2, 1, dtype=torch.float64, device=device)
    kernel = rk_stage.ErrorRatio((1.0, -1.0), SegmentNorm.single(1), 1, 0.0, 1.0, device)
    rules = [StepRule(order=5.0), StepRule(order=3.0, safety=0.8, ifactor=5.0, dfactor=0.1, min_step=0.01,
                                          max_step=0.4),
             StepRule(order=5.0, controller="pi"), StepRule(order=4.0, controller="pi", pcoeff=0.2, icoeff=0.5,
                                                            min_step=0.01)]
    ratios = [0.0, 1e-300, 0.3, 0.99, 1.0, 1.0 + 1e-9, 2.5, 1e6, math.nan, math.inf]
    for rule in rules:
        for ratio in ratios:
            for dt, last_ratio in ((0.01, 1.0), (0.1, 0.02), (0.5, 0.7)):
                stages[0, 0] = ratio / dt if math.isfinite(ratio) else ratio  # error = dt * (k0 - k1), atol = 1
                last = torch.tensor(last_ratio, dtype=torch.float64, device=device) if dt == 0.1 else last_ratio
                accept, dt_next, got_ratio, status, got_last = kernel.decide(y0, y0, stages, torch.tensor(
                    dt, dtype=torch.float64, device=device), rule, codes, last)
                expected = propose_step(float(got_ratio), dt, rule, last_ratio)
                assert (bool(accept), int(status)) == (expected[0], int(expected[2])), (rule, ratio, dt)
                assert float(dt_next) == pytest.approx(expected[1], rel=1e-13), (rule, ratio, dt)
                assert float(got_last) == pytest.approx(expected[3], rel=1e-15), (rule, ratio, dt)
