// C++ twin of fastcnf/ode/control/reference.py (see controller.cpp).
#pragma once

#include <cstdint>
#include <tuple>
#include <vector>

namespace fastcnf {

// The status vocabulary of every step-size controller and solver loop; the values are those of
// fastcnf.ode.control.Status (the bindings export them and a test checks that they agree).
enum Status : int {
  STATUS_OK = 0,                // the trial step was judged; the solve goes on
  STATUS_NONFINITE = 1,         // NaN/Inf in the trial step: rejected, dt shrunk by dfactor
  STATUS_FAILED_NONFINITE = 2,  // NaN/Inf with dt already at min_step: the solve fails
  STATUS_FAILED_UNDERFLOW = 3,  // dt no longer advances t (set by the loops)
  STATUS_FAILED_MAX_STEPS = 4,  // max_num_steps reached before the next output time (set by the loops)
};

struct SegmentNorm {
  std::vector<int64_t> ends;  // exclusive end offsets, increasing
  std::vector<bool> skip;     // segments left out of the max (seminorm)
};

double scaled_error_ratio(uintptr_t y0, uintptr_t y1, uintptr_t stages, int64_t stage_stride, bool is_double,
                          const std::vector<double>& weights, double dt, double rtol, double atol,
                          const SegmentNorm& norm);

std::tuple<bool, double, int> propose_step(double error_ratio, double dt, double order, double safety,
                                           double ifactor, double dfactor, double min_step, double max_step);

class StepController {
 public:
  StepController(std::vector<double> error_weights, double rtol, double atol, std::vector<int64_t> segment_ends,
                 std::vector<bool> segment_skip, double order, double safety, double ifactor, double dfactor,
                 double min_step, double max_step, bool is_double);
  double error_ratio(uintptr_t y0, uintptr_t y1, uintptr_t stages, int64_t stage_stride, double dt) const;
  std::tuple<bool, double, double, int> step(uintptr_t y0, uintptr_t y1, uintptr_t stages, int64_t stage_stride,
                                             double dt) const;

 private:
  std::vector<double> weights_;
  double rtol_, atol_, order_, safety_, ifactor_, dfactor_, min_step_, max_step_;
  bool is_double_;
  SegmentNorm norm_;
};

}  // namespace fastcnf
