"""pytest set-up for the benchmark suites: collect ``bench_*.py``, pin torch's thread count, and
record the software versions next to pytest-benchmark's machine description.

Run (see bench/README.md)::

    python -m pytest bench/ --benchmark-enable --benchmark-json=bench/results/NAME.json
    python -m pytest bench/ -q --benchmark-disable    # smoke check: every case once

torch runs single-threaded unless ``--torch-threads N`` says otherwise: on a shared machine,
intra-op threads that wait for each other at every op make timings swing by 10-100x.
"""

import os

import pytest
import torch

import fastcnf
from fastcnf.ode.backend import HAS_EXT, HAS_TRITON, select_backend

from .libraries import LIBRARIES, library_version


def pytest_addoption(parser):
    parser.addoption("--torch-threads", type=int, default=1,
                     help="torch intra-op threads for the benchmarks (default 1; 0 keeps torch's default)")


def pytest_configure(config):
    threads = config.getoption("--torch-threads")
    if threads > 0:
        torch.set_num_threads(threads)


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_benchmark_update_machine_info(config, machine_info):
    """Add what the report's header needs besides the CPU: library versions, threads, backend, GPU."""
    machine_info["libraries"] = {library: library_version(library) for library in LIBRARIES}
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["fastcnf_backend_cpu"] = select_backend(torch.device("cpu"))
    machine_info["fastcnf_extension"] = HAS_EXT
    machine_info["triton"] = HAS_TRITON
    machine_info["fastcnf_backend_env"] = os.environ.get("FASTCNF_BACKEND", "auto")
    machine_info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    machine_info["fastcnf"] = fastcnf.__version__
