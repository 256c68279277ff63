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

// out[start:end] += w * row[start:end]: a separate function so that the restrict qualifiers hold
// for the vectorizer (inside one loop nest it must assume the weights may alias the output).
template <typename T>
inline void scaled_add(T* __restrict__ out, const T* __restrict__ row, T w, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] += w * row[i];
}

template <typename T>
void combine_impl(const std::vector<double>& weights, T* out, const T* y0, const T* stages, int64_t stage_stride,
                  int64_t n, double dt) {
  std::vector<T> scaled;
  std::vector<const T*> rows;
  for (size_t j = 0; j < weights.size(); ++j) {
    if (weights[j] != 0.0) {
      rows.push_back(stages + static_cast<int64_t>(j) * stage_stride);
      scaled.push_back(static_cast<T>(weights[j] * dt));
    }
  }
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t count = std::min(n, start + kBlock) - start;
    std::copy(y0 + start, y0 + start + count, out + start);
    for (size_t u = 0; u < rows.size(); ++u) scaled_add(out + start, rows[u] + start, scaled[u], count);
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
