"""bench/report.py on a small synthetic pytest-benchmark JSON: pairing, ratios, overhead, section replacement."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
REPORT = ROOT / "bench" / "report.py"


def _load_report_module():
    spec = importlib.util.spec_from_file_location("bench_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load_report_module()


def _bench(group, library, median, minimum, **info):
    info = dict(library=library, workload=group, solver="dopri5 rtol=1e-06 atol=1e-06", **info)
    return dict(name=f"test[{group}-{library}]", group=group, params=dict(library=library),
                stats=dict(median=median, min=minimum), extra_info=info)


def _results():
    counts = dict(nfe_forward=10, nfe_backward=0, steps_accepted=2, steps_rejected=0)
    return dict(
        machine_info=dict(cpu=dict(brand_raw="Test CPU", count=2), torch="2.13.0", torch_threads=1,
                          libraries=dict(fastcnf="0.1.0", torchdiffeq="0.2.5", torchode="1.0.1"),
                          fastcnf_backend_cpu="cpp", python_version="3.11.7", system="Linux", release="6"),
        commit_info=dict(id="0123456789abcdef", dirty=False),
        datetime="2026-01-01T00:00:00",
        benchmarks=[
            _bench("probe inference", "fastcnf", 1e-3, 0.9e-3, bare_call_s=1e-5, peak_memory_bytes=1024,
                   memory_method="torch.profiler allocation events (CPU)", **counts),
            _bench("probe inference", "torchdiffeq", 4e-3, 3.6e-3, bare_call_s=1e-5, peak_memory_bytes=4096,
                   memory_method="torch.profiler allocation events (CPU)", **counts),
            _bench("probe inference", "torchode", 2e-3, 2e-3, bare_call_s=1e-5, peak_memory_bytes=2048,
                   memory_method="torch.profiler allocation events (CPU)", **counts),
            _bench("cnf backprop", "fastcnf", 0.3, 0.3, peak_memory_bytes=3 * 2 ** 20,
                   **dict(counts, nfe_backward=7)),
            _bench("cnf backprop", "torchdiffeq", 0.2, 0.2, peak_memory_bytes=2 * 2 ** 20,
                   **dict(counts, nfe_backward=7)),
        ],
    )


@pytest.fixture
def results_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_results()))
    return path


def _table_row(text, heading, workload):
    """Cells of ``workload``'s row in the table under ``### heading``."""
    block = text.split(f"### {heading}")[1].split("###")[0]
    row = next(line for line in block.splitlines() if line.startswith(f"| {workload} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_time_ratios_pair_libraries_by_workload(results_file):
    runs, workloads = report.load_results([results_file])
    text = report.render_section("Foundation (CPU)", runs, workloads)
    # workload, solver, fastcnf, torchdiffeq, ratio, ratio of minima, torchode, ratio, ratio of minima
    assert _table_row(text, "Time", "probe inference")[2:] == ["1.00 ms", "4.00 ms", "0.25", "0.25", "2.00 ms",
                                                               "0.50", "0.45"]
    assert _table_row(text, "Time", "cnf backprop")[2:] == ["300.00 ms", "200.00 ms", "1.50", "1.50", "—", "—",
                                                            "—"]
    assert "Test CPU, 2 cores (torch threads 1)" in text and "torch 2.13.0" in text


def test_per_step_overhead_subtracts_bare_calls(results_file):
    text = report.render_section("S", *report.load_results([results_file]))
    # fastcnf (1e-3 - 10 * 1e-5) / 2 = 450 us; torchdiffeq (4e-3 - 1e-4) / 2 = 1.95 ms; torchode 950 us
    assert _table_row(text, "Per-step solver overhead", "probe inference")[1:] == [
        "10.0 µs", "450.0 µs", "1.95 ms", "0.23", "950.0 µs", "0.47"]
    assert "cnf backprop" not in text.split("### Per-step solver overhead")[1].split("###")[0]


def test_counts_memory_and_summary(results_file):
    text = report.render_section("S", *report.load_results([results_file]))
    assert _table_row(text, "Function evaluations and steps", "cnf backprop")[1:] == [
        "10 / 7", "10 / 7", "—", "2 / 0", "2 / 0", "—"]
    assert _table_row(text, "Peak memory", "cnf backprop")[1:] == ["3.0 MiB", "2.0 MiB", "1.50", "—", "—"]
    assert "geometric mean 0.61 over 2 workloads (range 0.25 to 1.50)" in text
    assert "slower than torchdiffeq on 1 of 2 workloads: cnf backprop (1.50)" in text
    assert "on 1 of 1 workloads; worst 0.23" in text


def test_cli_replaces_only_its_section(results_file, tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Title\n\nIntro.\n\n## Foundation (CPU)\n\nstale numbers\n\n## Adjoint (GPU)\n\nkept\n")
    command = [sys.executable, str(REPORT), str(results_file), "--out", str(out), "--section", "Foundation (CPU)"]
    subprocess.run(command, check=True, capture_output=True)
    first = out.read_text()
    assert "stale numbers" not in first
    assert first.startswith("# Title\n\nIntro.\n\n## Foundation (CPU)\n")
    assert first.endswith("\n## Adjoint (GPU)\n\nkept\n")
    assert "| probe inference |" in first
    subprocess.run(command, check=True, capture_output=True)
    assert out.read_text() == first


def test_cli_appends_a_new_section_and_creates_the_file(results_file, tmp_path):
    out = tmp_path / "new.md"
    subprocess.run([sys.executable, str(REPORT), str(results_file), "--out", str(out), "--section", "A"], check=True)
    subprocess.run([sys.executable, str(REPORT), str(results_file), "--out", str(out), "--section", "B"], check=True)
    text = out.read_text()
    assert text.startswith("# fastcnf benchmarks\n")
    assert text.index("## A\n") < text.index("## B\n")


def test_rejects_json_not_from_the_harness(tmp_path):
    data = _results()
    del data["benchmarks"][0]["extra_info"]["library"]
    path = tmp_path / "foreign.json"
    path.write_text(json.dumps(data))
    result = subprocess.run([sys.executable, str(REPORT), str(path)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "has no extra_info['library']" in result.stderr
