// Fused Runge-Kutta stage combination: out = y0 + dt * sum_j w_j k_j over raw CPU buffers.
//
// torch.addmv with a transposed (S, N) stage slice runs a tall-skinny gemv that is several
// times slower than memory speed for large N; this loop reads each input once, in cache-sized
// blocks, and skips zero weights. Used by the CPU solver outside autograd; the torch addmv it
// replaces stays as the reference (tests compare both).

#include "stage_combine.h"

#include <algorithm>
#include <stdexcept>

namespace fastcnf {
namespace {

constexpr int64_t kBlock = 2048;

template <typename T>
void combine_impl(const std::vector<double>& weights, T* __restrict__ out, const T* __restrict__ y0,
                  const T* __restrict__ stages, int64_t stage_stride,
                  int64_t n, double dt) {
  std::vector<T> scaled;
  std::vector<int64_t> used;
  for (int64_t j = 0; j < static_cast<int64_t>(weights.size()); ++j) {
    if (weights[j] != 0.0) {
      used.push_back(j);
      scaled.push_back(static_cast<T>(weights[j] * dt));
    }
  }
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    for (int64_t i = start; i < end; ++i) out[i] = y0[i];
    for (size_t u = 0; u < used.size(); ++u) {
      const T w = scaled[u];
      const T* row = stages + used[u] * stage_stride;
      for (int64_t i = start; i < end; ++i) out[i] += w * row[i];
    }
  }
}

}  // namespace

StageCombiner::StageCombiner(std::vector<std::vector<double>> rows, std::vector<double> solution, bool is_double)
    : rows_(std::move(rows)), solution_(std::move(solution)), is_double_(is_double) {}

void StageCombiner::combine(const std::vector<double>& weights, uintptr_t out, uintptr_t y0, uintptr_t stages,
                            int64_t stage_stride, int64_t n, double dt) const {
  if (is_double_) {
    combine_impl(weights, reinterpret_cast<double*>(out), reinterpret_cast<const double*>(y0),
                 reinterpret_cast<const double*>(stages), stage_stride, n, dt);
  } else {
    combine_impl(weights, reinterpret_cast<float*>(out), reinterpret_cast<const float*>(y0),
                 reinterpret_cast<const float*>(stages), stage_stride, n, dt);
  }
}

void StageCombiner::stage(int64_t index, uintptr_t out, uintptr_t y0, uintptr_t stages, int64_t stage_stride,
                          int64_t n, double dt) const {
  if (index < 0 || index >= static_cast<int64_t>(rows_.size())) throw std::out_of_range("stage index");
  combine(rows_[index], out, y0, stages, stage_stride, n, dt);
}

void StageCombiner::solution(uintptr_t out, uintptr_t y0, uintptr_t stages, int64_t stage_stride, int64_t n,
                             double dt) const {
  combine(solution_, out, y0, stages, stage_stride, n, dt);
}

}  // namespace fastcnf
