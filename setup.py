"""Build script: the Python package, the Triton kernels as fastcnf.kernels and the optional
C++ controller extension fastcnf._C (pybind11 only; no torch headers needed)."""

import warnings

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
except ImportError:  # pragma: no cover - pybind11 is a build requirement
    Pybind11Extension = None


class OptionalBuildExt(build_ext):
    """Build the C++ controller if a compiler is available; warn and go on otherwise."""

    def run(self):
        try:
            super().run()
        except Exception as error:  # noqa: BLE001 - any build failure falls back to Python
            warnings.warn(f"fastcnf: the C++ controller was not built ({error}); the pure-Python one is used.")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001
            warnings.warn(f"fastcnf: building {ext.name} failed ({error}); the pure-Python controller is used.")


ext_modules = []
if Pybind11Extension is not None:
    ext_modules.append(
        Pybind11Extension("fastcnf._C", ["csrc/bindings.cpp", "csrc/controller.cpp", "csrc/stage_combine.cpp"], cxx_std=17, extra_compile_args=["-O3", "-fopenmp-simd"])
    )

setup(
    packages=["fastcnf", "fastcnf.kernels"],
    package_dir={"fastcnf": "fastcnf", "fastcnf.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": OptionalBuildExt},
)
