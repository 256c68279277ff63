"""Build script: the Python package, the Triton kernels as fastcnf.kernels and the optional
C++ controller extension fastcnf._C (pybind11 only; no torch headers needed).

Without a compiler the build warns and the package runs on the Python reference controller;
``FASTCNF_REQUIRE_EXTENSION=1`` (set by CI) makes a failed extension build an error.
"""

import os
import warnings

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
except ImportError:  # pragma: no cover - pybind11 is a build requirement
    Pybind11Extension = None

REQUIRE_EXTENSION = os.environ.get("FASTCNF_REQUIRE_EXTENSION", "0") == "1"


def _fallback(message):
    if REQUIRE_EXTENSION:
        raise RuntimeError(f"{message} (FASTCNF_REQUIRE_EXTENSION=1)")
    warnings.warn(f"{message}; the pure-Python controller is used.")


class OptionalBuildExt(build_ext):
    """Build the C++ controller if a compiler is available; warn and go on otherwise."""

    def run(self):
        try:
            super().run()
        except Exception as error:  # noqa: BLE001 - any build failure falls back to Python
            _fallback(f"fastcnf: the C++ controller was not built ({error})")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001
            _fallback(f"fastcnf: building {ext.name} failed ({error})")


ext_modules = []
if Pybind11Extension is not None:
    ext_modules.append(
        Pybind11Extension("fastcnf._C", ["csrc/bindings.cpp", "csrc/controller.cpp", "csrc/stage_combine.cpp"],
                          cxx_std=17, extra_compile_args=["-O3", "-fopenmp-simd"])
    )
elif REQUIRE_EXTENSION:
    raise RuntimeError("FASTCNF_REQUIRE_EXTENSION=1 but pybind11 is not installed in the build environment.")

setup(
    packages=find_packages(include=["fastcnf", "fastcnf.*"]) + ["fastcnf.kernels"],
    package_dir={"fastcnf.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": OptionalBuildExt},
)
