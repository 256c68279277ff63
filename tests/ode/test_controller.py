"""The step-size controller (fastcnf/ode/control/reference.py) and its C++ twin fastcnf._C (csrc/): the
same error ratio, the same decisions and step sizes, one status vocabulary; the fused stage combiner
against torch.addmv; and the checked boundary in front of the C++ code."""

import math
import random

import pytest
import torch

from fastcnf.ode import native
from fastcnf.ode.control import Decision, ReferenceController, Status, StepRule
from fastcnf.ode.control import reference as controller
from fastcnf.ode.explicit.tableaus import ADAPTIVE_TABLEAUS, FIXED_TABLEAUS
from fastcnf.ode.native import HAS_EXT, CpuStageCombiner, NativeBoundaryError
from fastcnf.ode.norms import SegmentNorm

pytestmark = pytest.mark.skipif(not HAS_EXT, reason="the C++ extension fastcnf._C is not built")
ext = native._C  # the raw bindings: the C++ functions themselves, on padded strides the package never passes

DTYPES = [torch.float32, torch.float64]
# (segment sizes, skipped segments): one segment, a tuple state, empty segments, a seminorm.
LAYOUTS = [((37,), None), ((5, 1, 20), None), ((0, 8, 0, 3), None), ((6, 10, 4), (False, True, False)),
           ((1,), None), ((3, 9), (True, False))]
RELATIVE = {torch.float32: 2e-5, torch.float64: 1e-12}


def random_inputs(sizes, stages, dtype, generator, stage_stride_pad=3):
    """y0, y1 of N elements and an (S, N) stage view whose rows are ``N + pad`` apart in memory."""
    n = sum(sizes)
    y0 = torch.randn(n, dtype=dtype, generator=generator)
    y1 = y0 + 0.1 * torch.randn(n, dtype=dtype, generator=generator)
    storage = torch.randn(stages, n + stage_stride_pad, dtype=dtype, generator=generator)
    return y0, y1, storage[:, :n]


def python_ratio(y0, y1, stages, weights, dt, rtol, atol, norm):
    return controller.scaled_error_ratio(y0, y1, stages, torch.tensor(weights, dtype=y0.dtype), dt, rtol, atol, norm)


def cpp_ratio(y0, y1, stages, weights, dt, rtol, atol, norm):
    return ext.scaled_error_ratio(y0.data_ptr(), y1.data_ptr(), stages.data_ptr(), stages.stride(0),
                                  y0.dtype == torch.float64, list(weights), dt, rtol, atol, list(norm.ends),
                                  list(norm.skip))


def assert_same_ratio(ours, reference, dtype):
    if math.isfinite(reference):
        assert ours == pytest.approx(reference, rel=RELATIVE[dtype], abs=1e-30)
    else:
        assert not math.isfinite(ours), (ours, reference)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes, skip", LAYOUTS)
def test_scaled_error_ratio_matches_python(sizes, skip, dtype):
    generator = torch.Generator().manual_seed(sum(sizes) + len(sizes))
    norm = SegmentNorm.from_sizes(sizes, skip)
    for name, tableau in ADAPTIVE_TABLEAUS.items():
        y0, y1, stages = random_inputs(sizes, tableau.stages, dtype, generator)
        for dt, rtol, atol in [(0.1, 1e-3, 1e-6), (1e-4, 1e-7, 1e-9), (2.5, 0.0, 1e-3), (0.3, 1e-2, 0.0)]:
            args = (y0, y1, stages, tableau.b_error, dt, rtol, atol, norm)
            assert_same_ratio(cpp_ratio(*args), python_ratio(*args), dtype)


def test_error_ratio_is_the_rms_of_the_scaled_error():
    """A hand-computable case: error = dt * (k0 - k1) / 2 with tolerance atol."""
    y0 = torch.zeros(4, dtype=torch.float64)
    stages = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    norm = SegmentNorm.single(4)
    expected = math.sqrt(sum((0.5 * 0.2 * k / 1e-2) ** 2 for k in (1, 2, 3, 4)) / 4)
    args = (y0, y0, stages, (0.5, -0.5), 0.2, 0.0, 1e-2, norm)
    assert python_ratio(*args) == pytest.approx(expected, rel=1e-14)
    assert cpp_ratio(*args) == pytest.approx(expected, rel=1e-14)


def test_skipped_segments_do_not_count():
    y0 = torch.zeros(6, dtype=torch.float64)
    stages = torch.tensor([[1.0, 1.0, 1.0, 100.0, 100.0, 100.0]], dtype=torch.float64)
    with_all = SegmentNorm.from_sizes((3, 3))
    seminorm = SegmentNorm.from_sizes((3, 3), skip=(False, True))
    for ratio in (python_ratio, cpp_ratio):
        assert ratio(y0, y0, stages, (1.0,), 1.0, 0.0, 1.0, with_all) == pytest.approx(100.0)
        assert ratio(y0, y0, stages, (1.0,), 1.0, 0.0, 1.0, seminorm) == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["y0", "y1", "stages"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("sizes, skip", [((10,), None), ((4, 6), (True, False))])
def test_non_finite_inputs(where, bad, dtype, sizes, skip):
    """NaN/Inf in the counted part of the trial state or the stages makes the ratio non-finite in
    both (so the step is rejected); in a skipped segment it is ignored by both."""
    generator = torch.Generator().manual_seed(7)
    norm = SegmentNorm.from_sizes(sizes, skip)
    tableau = ADAPTIVE_TABLEAUS["dopri5"]
    for index in (0, sum(sizes) - 1):
        y0, y1, stages = random_inputs(sizes, tableau.stages, dtype, generator)
        target = {"y0": y0, "y1": y1, "stages": stages[2]}[where]
        target[index] = bad
        args = (y0, y1, stages, tableau.b_error, 0.1, 1e-3, 1e-6, norm)
        reference, ours = python_ratio(*args), cpp_ratio(*args)
        assert_same_ratio(ours, reference, dtype)
        if where == "y0" and math.isinf(bad):
            continue  # an infinite tolerance scales that error to zero: both stay finite
        counted = not (skip and index < sizes[0])
        assert math.isfinite(reference) != counted


def random_decisions(count, seed):
    """(ratio, dt, last_ratio, StepRule) with integral and PI rules, ratios around 1, 0, NaN and Inf."""
    rng = random.Random(seed)
    special_ratios = [0.0, 1.0, 1.0 - 1e-12, 1.0 + 1e-12, math.nan, math.inf, 1e-300, 1e300]
    for i in range(count):
        ratio = special_ratios[i % 16] if i % 16 < len(special_ratios) else 10 ** rng.uniform(-8, 4)
        if i % 7 == 3:
            ratio = rng.uniform(0.5, 1.5)
        dt = 10 ** rng.uniform(-6, 1)
        min_step = 0.0 if rng.random() < 0.5 else dt * rng.choice([0.1, 1.0, 2.0])
        max_step = math.inf if rng.random() < 0.5 else dt * rng.choice([0.5, 1.0, 10.0])
        min_step = min(min_step, max_step)
        pi = dict(controller="pi", pcoeff=rng.choice([0.0, 0.2, 0.4]), icoeff=rng.choice([0.3, 0.5, 1.0])) \
            if i % 2 else {}
        rule = StepRule(float(rng.choice([1, 2, 3, 4, 5, 8])), rng.uniform(0.5, 1.0), rng.uniform(1.0, 20.0),
                        rng.uniform(0.01, 1.0), min_step, max_step, **pi)
        yield ratio, dt, 10 ** rng.uniform(-6, 0), rule


def test_propose_step_matches_python():
    for ratio, dt, last_ratio, rule in random_decisions(5000, seed=0):
        ours = native.cpp_propose_step(ratio, dt, rule, last_ratio)
        reference = controller.propose_step(ratio, dt, rule, last_ratio)
        assert ours[0] == reference[0], (ratio, dt, rule)
        assert ours[2] == reference[2], (ratio, dt, rule)
        assert ours[1] == pytest.approx(reference[1], rel=1e-14), (ratio, dt, rule)
        assert ours[3] == reference[3] or (math.isnan(ours[3]) and math.isnan(reference[3])), (ratio, dt, rule)


def test_one_status_vocabulary():
    """The C++ header's status values are the Python enum's."""
    assert native.native_status_codes() == {status.name: int(status) for status in Status}


def test_propose_step_rules():
    """Accept iff ratio <= 1 (forced by min_step, refused above max_step); the next step follows
    factor = min(ifactor, max(safety / ratio^(1/order), dfactor or 1)); NaN rejects and shrinks, and
    fails the solve at min_step."""
    rule = StepRule(order=5.0, safety=0.9, ifactor=10.0, dfactor=0.2)
    at_min = StepRule(order=5.0, min_step=0.1)
    capped = StepRule(order=5.0, max_step=0.05)
    for propose in (controller.propose_step, native.cpp_propose_step):
        accept, dt_next, status, _ = propose(0.0, 0.1, rule)
        assert (accept, dt_next, status) == (True, pytest.approx(1.0), Status.OK)
        accept, dt_next, _, _ = propose(0.5, 0.1, rule)
        assert accept and dt_next == pytest.approx(0.1 * 0.9 / 0.5 ** 0.2)
        accept, dt_next, _, _ = propose(0.99, 0.1, rule)
        assert accept and dt_next == pytest.approx(0.1)  # shrink floor is 1 when accepted
        accept, dt_next, _, _ = propose(1e6, 0.1, rule)
        assert not accept and dt_next == pytest.approx(0.1 * rule.dfactor)
        accept, dt_next, status, _ = propose(math.nan, 0.1, rule)
        assert (accept, status) == (False, Status.NONFINITE) and dt_next == pytest.approx(0.02)
        accept, _, status, _ = propose(math.nan, 0.1, at_min)
        assert not accept and status == Status.FAILED_NONFINITE
        assert propose(5.0, 0.1, at_min)[0]
        assert not propose(0.5, 0.1, capped)[0]
        assert propose(0.5, 0.1, capped)[1] == 0.05


def test_pi_rule():
    """factor = safety * r^(-(icoeff + pcoeff)/order) * r_last^(pcoeff/order), clamped like the integral rule;
    accepted steps pass their ratio on (1 for r = 0), rejected ones keep the last accepted ratio; with
    pcoeff = 0 and icoeff = 1 it is the integral rule."""
    pi = StepRule(order=5.0, controller="pi", pcoeff=0.4, icoeff=0.3)
    for propose in (controller.propose_step, native.cpp_propose_step):
        accept, dt_next, status, last = propose(0.1, 0.1, pi, 0.25)
        assert accept and status == Status.OK and last == 0.1
        assert dt_next == pytest.approx(0.1 * 0.9 * 0.1 ** (-0.7 / 5) * 0.25 ** (0.4 / 5), rel=1e-15) != 0.1
        accept, dt_next, _, last = propose(0.5, 0.1, pi, 0.001)
        assert accept and last == 0.5 and dt_next == pytest.approx(0.1)  # the P part would shrink: floor 1
        accept, dt_next, _, last = propose(4.0, 0.1, pi, 0.25)
        assert not accept and last == 0.25
        assert dt_next == pytest.approx(0.1 * 0.9 * 4.0 ** (-0.7 / 5) * 0.25 ** (0.4 / 5), rel=1e-15)
        assert propose(0.0, 0.1, pi, 0.25)[1:] == (pytest.approx(1.0), Status.OK, 1.0)
        assert propose(math.nan, 0.1, pi, 0.25)[3] == 0.25
        integral_like = StepRule(order=5.0, controller="pi", pcoeff=0.0, icoeff=1.0)
        for ratio in (1e-9, 0.3, 0.999, 1.0, 1.7, 1e5):
            expected = propose(ratio, 0.1, StepRule(order=5.0))
            got = propose(ratio, 0.1, integral_like, 0.5)
            assert got[0] == expected[0] and got[1] == pytest.approx(expected[1], rel=1e-14)


def test_pi_options_are_checked():
    from fastcnf.errors import InvalidOptionError
    import fastcnf

    y0, t = torch.ones(2), torch.tensor([0.0, 1.0])
    for options, message in ((dict(controller="pid"), "option 'controller'"),
                             (dict(controller="pi", pcoeff=-0.1), "option 'pcoeff' must be a non-negative number"),
                             (dict(controller="pi", icoeff=0.0), "option 'icoeff'"),
                             (dict(pcoeff=0.2), "pass controller='pi' as well")):
        with pytest.raises(InvalidOptionError, match=message):
            fastcnf.odeint(lambda t, y: -y, y0, t, options=options)
    with pytest.warns(fastcnf.IgnoredOptionWarning, match="Option 'controller' is not used by method 'rk4'"):
        fastcnf.odeint(lambda t, y: -y, y0, t, method="rk4", options=dict(step_size=0.1, controller="pi"))


@pytest.mark.parametrize("controller_name", ["integral", "pi"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_step_controller_objects_agree(dtype, controller_name):
    from fastcnf.ode.control.cpp import CppController

    generator = torch.Generator().manual_seed(11)
    tableau = ADAPTIVE_TABLEAUS["tsit5"]
    sizes = (3, 9)
    norm = SegmentNorm.from_sizes(sizes)
    rule = StepRule(order=5.0, safety=0.9, ifactor=10.0, dfactor=0.2, min_step=0.0, max_step=1.0,
                    controller=controller_name)
    python = ReferenceController(rule, tableau.b_error, 1e-4, 1e-7, norm, dtype, torch.device("cpu"))
    cpp = CppController(rule, tableau.b_error, 1e-4, 1e-7, norm, dtype, sum(sizes))
    last_ratio = 1.0
    for trial in range(200):
        y0, y1, stages = random_inputs(sizes, tableau.stages, dtype, generator, stage_stride_pad=0)
        dt = 10 ** (-4 + 4 * trial / 200)
        reference = python.adapt(y0, y1, stages, dt, last_ratio)
        ours = Decision(*cpp.adapt(y0, y1, stages, dt, last_ratio))
        assert_same_ratio(ours.error_ratio, reference.error_ratio, dtype)
        if abs(reference.error_ratio - 1) > 1e-4:  # the decision may flip on rounding right at the threshold
            assert ours.accept == reference.accept and ours.status == reference.status
            assert ours.dt_next == pytest.approx(reference.dt_next, rel=RELATIVE[dtype])
            assert ours.last_ratio == pytest.approx(reference.last_ratio, rel=RELATIVE[dtype])
            last_ratio = reference.last_ratio


def test_step_controller_rejects_mismatched_segments():
    with pytest.raises(ValueError, match="segment_ends and segment_skip must have the same length"):
        rule = ext.StepRule(order=2.0, safety=0.9, ifactor=10.0, dfactor=0.2, min_step=0.0, max_step=math.inf,
                            pi=False, pcoeff=0.0, icoeff=1.0)
        ext.StepController(error_weights=[0.5, -0.5], rtol=1e-3, atol=1e-6, segment_ends=[3, 5], segment_skip=[False],
                           rule=rule, is_double=True)


# ---------------------------------------------------------------- stage combiner
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ADAPTIVE_TABLEAUS) + list(FIXED_TABLEAUS))
@pytest.mark.parametrize("n", [1, 7, 2048, 5000])
def test_stage_combiner_matches_addmv(name, n, dtype):
    """y0 + dt * a_i @ K[:i] for every stage row and y0 + dt * b @ K, on odd sizes (one element,
    a prime, exactly one cache block, several blocks with a remainder) and padded stage rows."""
    tableau = {**ADAPTIVE_TABLEAUS, **FIXED_TABLEAUS}[name]
    generator = torch.Generator().manual_seed(n)
    storage = torch.randn(tableau.stages, n + 5, dtype=dtype, generator=generator)
    stages = storage[:, :n]
    y0 = torch.randn(n, dtype=dtype, generator=generator)
    combiner = ext.CpuStageCombiner([list(row) for row in tableau.a], list(tableau.b), dtype == torch.float64)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-13)
    dt = 0.37
    for i in range(1, tableau.stages):
        out = torch.empty_like(y0)
        combiner.stage(i, out.data_ptr(), y0.data_ptr(), stages.data_ptr(), stages.stride(0), n, dt)
        expected = torch.addmv(y0, stages[:i].t(), torch.tensor(tableau.a[i], dtype=dtype), alpha=dt)
        torch.testing.assert_close(out, expected, **tolerance)
    out = torch.empty_like(y0)
    combiner.solution(out.data_ptr(), y0.data_ptr(), stages.data_ptr(), stages.stride(0), n, dt)
    torch.testing.assert_close(out, torch.addmv(y0, stages.t(), torch.tensor(tableau.b, dtype=dtype), alpha=dt),
                               **tolerance)


def test_stage_combiner_rejects_a_bad_stage_index():
    combiner = ext.CpuStageCombiner([[], [0.5]], [0.0, 1.0], True)
    buffer = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(IndexError, match="stage index"):
        combiner.stage(2, buffer.data_ptr(), buffer.data_ptr(), buffer.data_ptr(), 2, 2, 0.1)


# ---------------------------------------------------------------- the checked boundary
@pytest.mark.parametrize("dtype", DTYPES)
def test_checked_combiner_matches_addmv_and_allocates_its_results(dtype):
    tableau = ADAPTIVE_TABLEAUS["dopri5"]
    n = 37
    generator = torch.Generator().manual_seed(3)
    stages = torch.randn(tableau.stages, n, dtype=dtype, generator=generator)
    y0 = torch.randn(n, dtype=dtype, generator=generator)
    combiner = CpuStageCombiner(tableau.a, tableau.b, dtype, n, shape=(n,))
    bound = combiner.bind(stages).start(y0)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-13)
    for i in range(1, tableau.stages):
        expected = torch.addmv(y0, stages[:i].t(), torch.tensor(tableau.a[i], dtype=dtype), alpha=0.3)
        torch.testing.assert_close(bound.stage_input(i, 0.3), expected, **tolerance)
    separate = combiner.separate(y0)
    for row in stages:
        separate.append(row.double())  # converted to the state dtype when it is adopted
    torch.testing.assert_close(separate.solution(0.3), bound.solution(0.3), rtol=0, atol=0)


BAD_TENSORS = {
    "dtype": (lambda y: y.double(), "got a contiguous cpu torch.float64"),
    "contiguity": (lambda y: torch.stack([y, y], -1)[..., 0], "got a non-contiguous"),
    "size": (lambda y: y[..., :-1], "got a contiguous cpu torch.float32 tensor of 6 elements"),
    "device": (lambda y: y.to("meta"), "got a contiguous meta torch.float32"),
}


@pytest.mark.parametrize("what", list(BAD_TENSORS))
def test_the_boundary_refuses_what_cpp_would_misread(what):
    """dtype, contiguity, size and device of every tensor are checked before its pointer crosses."""
    make_bad, message = BAD_TENSORS[what]
    tableau = ADAPTIVE_TABLEAUS["bosh3"]
    y0 = torch.randn(7, dtype=torch.float32)
    stages = torch.randn(tableau.stages, 7, dtype=torch.float32)
    combiner = CpuStageCombiner(tableau.a, tableau.b, torch.float32, 7)
    with pytest.raises(NativeBoundaryError, match=message):
        combiner.bind(stages).start(make_bad(y0))
    if what != "size":
        with pytest.raises(NativeBoundaryError):
            combiner.bind(make_bad(stages))
    if what in ("size", "device"):
        with pytest.raises(NativeBoundaryError, match=message):
            combiner.separate(y0).append(make_bad(y0))
    else:  # a stage of the wrong dtype or layout is converted when it is adopted, never misread
        adopted = combiner.separate(y0).append(make_bad(y0))
        assert adopted.dtype == torch.float32 and adopted.is_contiguous() and torch.equal(adopted, y0)
    from fastcnf.ode.control.cpp import CppController

    cpp = CppController(StepRule(order=3.0), tableau.b_error, 1e-3, 1e-6, SegmentNorm.single(7), torch.float32, 7)
    with pytest.raises(NativeBoundaryError, match=message):
        cpp.adapt(y0, make_bad(y0), stages, 0.1)
    if what != "size":
        with pytest.raises(NativeBoundaryError):
            cpp.adapt(y0, y0, make_bad(stages), 0.1)


def test_a_float64_or_float16_or_integer_derivative_of_a_float32_state_is_torchdiffeqs():
    """The C++ path once read float64 bytes as float32 (a false NaN/Inf error) and past the end of a
    float16 buffer; the dynamics' result is now cast to the state dtype, as torchdiffeq's stage buffer does."""
    import torchdiffeq

    import fastcnf

    t = torch.linspace(0, 1, 5)
    for cast in (torch.Tensor.double, torch.Tensor.half, lambda y: (-2.7 * y).long() * -1):
        def func(time, y):
            return cast(-y) if cast is not None else -y
        for method, options in (("dopri5", None), ("rk4", dict(step_size=0.1)), ("euler", dict(step_size=0.1))):
            ours = fastcnf.odeint(func, torch.ones(3), t, method=method, options=options)
            theirs = torchdiffeq.odeint(func, torch.ones(3), t, method=method, options=options)
            assert ours.dtype == theirs.dtype == torch.float32
            torch.testing.assert_close(ours, theirs, rtol=2e-4, atol=2e-4)
