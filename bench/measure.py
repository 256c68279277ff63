"""Measuring one workload through one library: evaluations, accuracy, peak memory, time.

``run_benchmark(benchmark, workload, library)`` is what a benchmark test calls. Outside the
timed loop it runs the case once with counting (NFE forward/backward, accepted/rejected steps)
and checks the answer, profiles one run for peak memory, and (inference workloads) times bare
calls of the dynamics; then pytest-benchmark times the plain solve. Everything lands in
``benchmark.extra_info``; the group is the workload name, so ``bench/report.py`` can pair
libraries.

Peak memory is the high-water mark of tensor memory allocated during one run, above what was
allocated before it: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the allocation events
of ``torch.profiler`` (``profile_memory=True``) summed in time order. CPU tensors come from
torch's allocator, which ``tracemalloc`` does not see, and process RSS mixes in the allocator's
caching and Python's own objects.
"""

import time

import pytest
import torch

import fastcnf

from .libraries import AdaptiveCountingFunc, CountingFunc, UnsupportedCase, make_solve
from .workloads import final_state

__all__ = ["Case", "run_benchmark", "count_evaluations", "peak_memory_bytes", "bare_call_seconds",
           "max_abs_deviation"]

_BARE_CALL_CACHE = {}
_REFERENCE_CACHE = {}


class Case:
    """A workload bound to a library and a device: its problem, its solve and one run."""

    def __init__(self, workload, library, device):
        self.workload, self.library, self.device = workload, library, torch.device(device)
        self.problem = workload.build(self.device)
        if workload.backprop:
            for tensor in self.problem.inputs:
                tensor.requires_grad_(True)
        self.solve = make_solve(library, self.problem.func, self.problem, workload.solver)

    def run(self, solve=None, before_backward=None):
        """One solve (under no_grad unless backprop) and, in backprop mode, the gradient of the loss."""
        solve = solve or self.solve
        with torch.set_grad_enabled(self.workload.backprop):
            final = final_state(solve())
            if self.workload.backprop:
                loss = self.problem.loss(final)
                if before_backward is not None:
                    before_backward()
                torch.autograd.grad(loss, self.problem.inputs)
        return final


def count_evaluations(case):
    """NFE of the forward solve and of the backward pass, accepted and rejected steps, final state.

    fastcnf counts itself (``fastcnf.track()``); torchdiffeq's function calls are counted by a
    wrapper and its steps through its step callbacks; torchode reports its own statistics.
    """
    if case.library == "fastcnf":
        with fastcnf.track() as stats:
            final = case.run()
        return dict(nfe_forward=stats.nfe_forward, nfe_backward=stats.nfe_backward,
                    steps_accepted=stats.steps_accepted, steps_rejected=stats.steps_rejected), final

    config = case.workload.solver
    counter = (AdaptiveCountingFunc if config.adaptive else CountingFunc)(case.problem.func)
    solve = make_solve(case.library, counter, case.problem, config)
    final = case.run(solve, before_backward=lambda: setattr(counter, "phase", "backward"))
    if case.library == "torchode":
        steps = int(solve.last_stats["n_steps"].sum())
        accepted = int(solve.last_stats["n_accepted"].sum())
    else:
        steps, accepted = counter.steps, counter.steps - getattr(counter, "rejected", 0)
    return dict(nfe_forward=counter.calls["forward"], nfe_backward=counter.calls["backward"],
                steps_accepted=accepted, steps_rejected=steps - accepted), final


def max_abs_deviation(final, reference):
    """Largest absolute difference between two states (tensors or tuples of tensors)."""
    finals = final if isinstance(final, tuple) else (final,)
    references = reference if isinstance(reference, tuple) else (reference,)
    return max(float((a.detach() - b.detach()).abs().max()) for a, b in zip(finals, references))


def reference_state(case):
    """The exact final state if the problem has one, else torchdiffeq's (cached per workload)."""
    if case.problem.reference is not None:
        return case.problem.reference
    key = (case.workload.name, case.device)
    if key not in _REFERENCE_CACHE:
        reference_case = Case(case.workload, "torchdiffeq", case.device)
        _REFERENCE_CACHE[key] = reference_case.run()
    return _REFERENCE_CACHE[key]


def peak_memory_bytes(run, device):
    """Peak tensor memory (bytes) allocated by ``run()`` above what was live before; see the module doc."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        run()
    events = sorted((event.start_ns(), event.nbytes()) for event in profile.profiler.kineto_results.events()
                    if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def memory_method(device):
    if torch.device(device).type == "cuda":
        return "torch.cuda.max_memory_allocated"
    return "torch.profiler allocation events (CPU)"


def bare_call_seconds(case, min_batch_seconds=0.02, repeats=7):
    """Median seconds of one call ``func(t0, y0)`` under no_grad (cached per workload and device)."""
    key = (case.workload.name, case.device)
    if key in _BARE_CALL_CACHE:
        return _BARE_CALL_CACHE[key]
    func, y0 = case.problem.func, case.problem.y0
    t0 = case.problem.t[0]
    synchronize = torch.cuda.synchronize if case.device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        calls = 1
        while True:
            elapsed = _time_calls(func, t0, y0, calls, synchronize)
            if elapsed >= min_batch_seconds:
                break
            calls *= 2
        per_call = sorted(_time_calls(func, t0, y0, calls, synchronize) / calls for _ in range(repeats))
    _BARE_CALL_CACHE[key] = per_call[repeats // 2]
    return _BARE_CALL_CACHE[key]


def _time_calls(func, t0, y0, calls, synchronize):
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        func(t0, y0)
    synchronize()
    return time.perf_counter() - start


def run_benchmark(benchmark, workload, library, device="cpu"):
    """Measure ``workload`` through ``library`` (see the module doc); skips unsupported cases."""
    benchmark.group = workload.name
    try:
        case = Case(workload, library, device)
    except UnsupportedCase as reason:
        pytest.skip(str(reason))
    counts, final = count_evaluations(case)
    deviation = max_abs_deviation(final, reference_state(case))
    info = dict(workload=workload.name, library=library, solver=workload.solver.describe(), mode=workload.mode,
                state=workload.state, device=str(case.device), max_abs_deviation=deviation, **counts)
    if not benchmark.disabled:
        info.update(peak_memory_bytes=peak_memory_bytes(case.run, case.device), memory_method=memory_method(device))
        if not workload.backprop:
            info["bare_call_s"] = bare_call_seconds(case)
        case.run()  # warm-up of the solve that is timed (the counting run used a wrapped func)
    benchmark.extra_info.update(info)
    if deviation > workload.accuracy:
        raise AssertionError(f"{library} on {workload.name!r}: final state deviates by {deviation:.3g} from the "
                             f"reference (allowed {workload.accuracy:g}); not timing a wrong answer.")
    if case.device.type == "cuda":
        benchmark(lambda: (case.run(), torch.cuda.synchronize(case.device)))
    else:
        benchmark(case.run)
