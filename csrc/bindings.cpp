// Python bindings of the fastcnf C++ extension (module fastcnf._C): the step-size controller
// (twin of fastcnf/ode/control/reference.py) and the fused stage combination used by the CPU
// solver. Only fastcnf/ode/native.py calls them, after checking every tensor it passes.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "controller.h"
#include "stage_combine.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastcnf C++ step-size controller and fused Runge-Kutta stage combination";
  py::dict status;
  status["OK"] = static_cast<int>(fastcnf::STATUS_OK);
  status["NONFINITE"] = static_cast<int>(fastcnf::STATUS_NONFINITE);
  status["FAILED_NONFINITE"] = static_cast<int>(fastcnf::STATUS_FAILED_NONFINITE);
  status["FAILED_UNDERFLOW"] = static_cast<int>(fastcnf::STATUS_FAILED_UNDERFLOW);
  status["FAILED_MAX_STEPS"] = static_cast<int>(fastcnf::STATUS_FAILED_MAX_STEPS);
  m.attr("STATUS") = status;
  m.def(
      "scaled_error_ratio",
      [](uintptr_t y0, uintptr_t y1, uintptr_t stages, int64_t stage_stride, bool is_double,
         const std::vector<double>& weights, double dt, double rtol, double atol, std::vector<int64_t> segment_ends,
         std::vector<bool> segment_skip) {
        fastcnf::SegmentNorm norm{std::move(segment_ends), std::move(segment_skip)};
        return fastcnf::scaled_error_ratio(y0, y1, stages, stage_stride, is_double, weights, dt, rtol, atol, norm);
      },
      py::arg("y0"), py::arg("y1"), py::arg("stages"), py::arg("stage_stride"), py::arg("is_double"),
      py::arg("weights"), py::arg("dt"), py::arg("rtol"), py::arg("atol"), py::arg("segment_ends"),
      py::arg("segment_skip"));
  py::class_<fastcnf::StepRule>(m, "StepRule")
      .def(py::init([](double order, double safety, double ifactor, double dfactor, double min_step, double max_step,
                       bool pi, double pcoeff, double icoeff) {
             return fastcnf::StepRule{order, safety, ifactor, dfactor, min_step, max_step, pi, pcoeff, icoeff};
           }),
           py::arg("order"), py::arg("safety"), py::arg("ifactor"), py::arg("dfactor"), py::arg("min_step"),
           py::arg("max_step"), py::arg("pi"), py::arg("pcoeff"), py::arg("icoeff"));
  m.def("propose_step", &fastcnf::propose_step, py::arg("error_ratio"), py::arg("dt"), py::arg("rule"),
        py::arg("last_ratio"));
  py::class_<fastcnf::StepController>(m, "StepController")
      .def(py::init<std::vector<double>, double, double, std::vector<int64_t>, std::vector<bool>, fastcnf::StepRule,
                    bool>(),
           py::arg("error_weights"), py::arg("rtol"), py::arg("atol"), py::arg("segment_ends"),
           py::arg("segment_skip"), py::arg("rule"), py::arg("is_double"))
      .def("error_ratio", &fastcnf::StepController::error_ratio)
      .def("step", &fastcnf::StepController::step);
  py::class_<fastcnf::CpuStageCombiner>(m, "CpuStageCombiner")
      .def(py::init<std::vector<std::vector<double>>, std::vector<double>, bool>(), py::arg("rows"),
           py::arg("solution"), py::arg("is_double"))
      .def("stage", &fastcnf::CpuStageCombiner::stage)
      .def("solution", &fastcnf::CpuStageCombiner::solution)
      .def("stage_from", &fastcnf::CpuStageCombiner::stage_from)
      .def("solution_from", &fastcnf::CpuStageCombiner::solution_from);
}
