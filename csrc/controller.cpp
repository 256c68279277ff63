// C++ twin of fastcnf/ode/control/reference.py: scaled error ratio fused with the Runge-Kutta error
// estimate, and the accept/reject + next-step-size rule. Function for function the same math
// as the Python reference; tests/test_controller.py checks that both agree.
//
// Tensors cross the boundary as raw data pointers (Python ints from Tensor.data_ptr()), so the
// extension needs only pybind11 at build time and no torch headers. fastcnf/ode/native.py is the
// only caller: it checks dtype, device, contiguity and size of every tensor before its pointer
// crosses (y0, y1 of N elements, stages of S rows with a row stride of `stage_stride` elements).

#include "controller.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

namespace fastcnf {
namespace {

constexpr int64_t kBlock = 1024;

// error[0:count] += w * row[0:count], in double (separate function: restrict holds for the vectorizer)
template <typename T>
inline void accumulate(double* __restrict__ error, const T* __restrict__ row, double w, int64_t count) {
  for (int64_t i = 0; i < count; ++i) error[i] += w * static_cast<double>(row[i]);
}

// sum over a block of (error * dt / tol)^2, tol = atol + rtol * max(|y0|, |y1|). `poison` collects
// y1 - y1, which is NaN exactly when y1 is NaN or Inf (std::max would hide a NaN in y1).
template <typename T>
inline void block_sum_squares(const double* __restrict__ error, const T* __restrict__ y0, const T* __restrict__ y1,
                              int64_t count, double dt, double rtol, double atol, double& sum_sq, double& poison) {
  double sum = 0.0, bad = 0.0;
#pragma omp simd reduction(+ : sum, bad)
  for (int64_t i = 0; i < count; ++i) {
    const double a0 = std::abs(static_cast<double>(y0[i]));
    const double a1 = std::abs(static_cast<double>(y1[i]));
    const double scaled = error[i] * dt / (atol + rtol * (a0 < a1 ? a1 : a0));  // std::max: NaN in y0 stays
    sum += scaled * scaled;
    bad += a1 - a1;
  }
  sum_sq += sum;
  poison += bad;
}

// max over non-skipped segments of sqrt(mean((dt * sum_j w_j k_j[n] / tol_n)^2)),
// tol_n = atol + rtol * max(|y0_n|, |y1_n|). NaN if any counted term is not finite.
// Works block by block: the error estimate of a block is formed row by row in a local buffer.
template <typename T>
double scaled_error_ratio_impl(const T* y0, const T* y1, const T* stages, int64_t stage_stride,
                               const std::vector<double>& weights, double dt, double rtol, double atol,
                               const SegmentNorm& norm) {
  std::vector<const T*> rows;  // stages with a non-zero error weight
  std::vector<double> used_weights;
  for (size_t j = 0; j < weights.size(); ++j) {
    if (weights[j] != 0.0) {
      rows.push_back(stages + static_cast<int64_t>(j) * stage_stride);
      used_weights.push_back(weights[j]);
    }
  }
  double error[kBlock];
  double result = 0.0;
  bool finite = true;
  int64_t start = 0;
  for (size_t s = 0; s < norm.ends.size(); ++s) {
    const int64_t end = norm.ends[s];
    if (!norm.skip[s] && end > start) {
      double sum_sq = 0.0, poison = 0.0;
      for (int64_t block = start; block < end; block += kBlock) {
        const int64_t count = std::min(kBlock, end - block);
        std::fill(error, error + count, 0.0);
        for (size_t u = 0; u < rows.size(); ++u) accumulate(error, rows[u] + block, used_weights[u], count);
        block_sum_squares(error, y0 + block, y1 + block, count, dt, rtol, atol, sum_sq, poison);
      }
      const double rms = std::sqrt(sum_sq / static_cast<double>(end - start));
      if (!std::isfinite(rms) || !std::isfinite(poison)) finite = false;
      result = std::max(result, rms);
    }
    start = end;
  }
  return finite ? result : std::numeric_limits<double>::quiet_NaN();
}

double clamp(double value, double low, double high) { return std::min(std::max(value, low), high); }

}  // namespace

double scaled_error_ratio(uintptr_t y0, uintptr_t y1, uintptr_t stages, int64_t stage_stride, bool is_double,
                          const std::vector<double>& weights, double dt, double rtol, double atol,
                          const SegmentNorm& norm) {
  if (is_double) {
    return scaled_error_ratio_impl(reinterpret_cast<const double*>(y0), reinterpret_cast<const double*>(y1),
                                   reinterpret_cast<const double*>(stages), stage_stride, weights, dt, rtol, atol,
                                   norm);
  }
  return scaled_error_ratio_impl(reinterpret_cast<const float*>(y0), reinterpret_cast<const float*>(y1),
                                 reinterpret_cast<const float*>(stages), stage_stride, weights, dt, rtol, atol, norm);
}

// Same rule as reference.propose_step: returns (accept, dt_next, status, last_ratio).
std::tuple<bool, double, int, double> propose_step(double error_ratio, double dt, const StepRule& rule,
                                                   double last_ratio) {
  if (!std::isfinite(error_ratio)) {
    const bool stuck = dt <= rule.min_step;  // cannot shrink any further: the solve fails
    return {false, clamp(dt * rule.dfactor, rule.min_step, rule.max_step),
            stuck ? STATUS_FAILED_NONFINITE : STATUS_NONFINITE, last_ratio};
  }
  bool accept = error_ratio <= 1.0;
  if (dt > rule.max_step) accept = false;
  if (dt <= rule.min_step) accept = true;
  double dt_next;
  if (error_ratio == 0.0) {
    dt_next = dt * rule.ifactor;
  } else {
    const double shrink = error_ratio < 1.0 ? 1.0 : rule.dfactor;
    const double proposal =
        rule.pi ? rule.safety * std::pow(error_ratio, -(rule.icoeff + rule.pcoeff) / rule.order) *
                      std::pow(last_ratio, rule.pcoeff / rule.order)
                : rule.safety / std::pow(error_ratio, 1.0 / rule.order);
    dt_next = dt * std::min(rule.ifactor, std::max(proposal, shrink));
  }
  if (accept) last_ratio = error_ratio > 0.0 ? error_ratio : 1.0;
  return {accept, clamp(dt_next, rule.min_step, rule.max_step), STATUS_OK, last_ratio};
}

StepController::StepController(std::vector<double> error_weights, double rtol, double atol,
                               std::vector<int64_t> segment_ends, std::vector<bool> segment_skip, StepRule rule,
                               bool is_double)
    : weights_(std::move(error_weights)), rtol_(rtol), atol_(atol), rule_(rule), is_double_(is_double) {
  if (segment_ends.size() != segment_skip.size()) {
    throw std::invalid_argument("segment_ends and segment_skip must have the same length");
  }
  norm_.ends = std::move(segment_ends);
  norm_.skip = std::move(segment_skip);
}

double StepController::error_ratio(uintptr_t y0, uintptr_t y1, uintptr_t stages, int64_t stage_stride,
                                   double dt) const {
  return scaled_error_ratio(y0, y1, stages, stage_stride, is_double_, weights_, dt, rtol_, atol_, norm_);
}

// Returns (accept, dt_next, error_ratio, status, last_ratio).
std::tuple<bool, double, double, int, double> StepController::step(uintptr_t y0, uintptr_t y1, uintptr_t stages,
                                                                   int64_t stage_stride, double dt,
                                                                   double last_ratio) const {
  const double ratio = error_ratio(y0, y1, stages, stage_stride, dt);
  auto [accept, dt_next, status, last] = propose_step(ratio, dt, rule_, last_ratio);
  return {accept, dt_next, ratio, status, last};
}

}  // namespace fastcnf
