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

// The step-size rule of fastcnf.ode.control.StepRule (integral, or PI when `pi`).
struct StepRule {
  double order, safety, ifactor, dfactor, min_step, max_step;
  bool pi;
  double pcoeff, icoeff;
};

// (accept, dt_next, status, last_ratio): last_ratio is the error ratio of the last accepted step after this
// decision (the PI rule reads the one before it).
std::tuple<bool, double, int, double> propose_step(double error_ratio, double dt, const StepRule& rule,
                                                   double last_ratio);

class StepController {
 public:
  StepController(std::vector<double> error_weights, double rtol, double atol, std::vector<int64_t> segment_ends,
                 std::vector<bool> segment_skip, StepRule rule, bool is_double);
  double error_ratio(uintptr_t y0, uintptr_t y1, uintptr_t stages, int64_t stage_stride, double dt) const;
  // (accept, dt_next, error_ratio, status, last_ratio)
  std::tuple<bool, double, double, int, double> step(uintptr_t y0, uintptr_t y1, uintptr_t stages,
                                                     int64_t stage_stride, double dt, double last_ratio) const;

 private:
  std::vector<double> weights_;
  double rtol_, atol_;
  StepRule rule_;
  bool is_double_;
  SegmentNorm norm_;
};

}  // namespace fastcnf
