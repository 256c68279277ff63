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

// out[start:end] = y0[start:end] + out[start:end].
template <typename T>
inline void add_state(T* __restrict__ out, const T* __restrict__ y0, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = y0[i] + out[i];
}

// out = y0 + dt * sum_j weights[j] * rows[j] over the non-zero weights, block by block. The increment
// is summed first (in `out`) and added to y0 once, as torchdiffeq does: adding each stage to y0 in
// turn would round at the scale of y once per stage, which drifts a float32 state over many steps.
template <typename T>
void combine_impl(const std::vector<double>& weights, T* out, const T* y0, const std::vector<const T*>& rows,
                  int64_t n, double dt) {
  std::vector<T> scaled;
  std::vector<const T*> used;
  for (size_t j = 0; j < weights.size(); ++j) {
    if (weights[j] != 0.0) {
      used.push_back(rows.at(j));
      scaled.push_back(static_cast<T>(weights[j] * dt));
    }
  }
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t count = std::min(n, start + kBlock) - start;
    std::fill(out + start, out + start + count, T(0));
    for (size_t u = 0; u < used.size(); ++u) scaled_add(out + start, used[u] + start, scaled[u], count);
    add_state(out + start, y0 + start, count);
  }
}

template <typename T>
void combine_typed(const std::vector<double>& weights, uintptr_t out, uintptr_t y0,
                   const std::vector<uintptr_t>& rows, int64_t n, double dt) {
  std::vector<const T*> typed;
  for (uintptr_t row : rows) typed.push_back(reinterpret_cast<const T*>(row));
  combine_impl(weights, reinterpret_cast<T*>(out), reinterpret_cast<const T*>(y0), typed, n, dt);
}

std::vector<uintptr_t> strided_rows(uintptr_t stages, int64_t stage_stride, size_t count, bool is_double) {
  const int64_t bytes = stage_stride * static_cast<int64_t>(is_double ? sizeof(double) : sizeof(float));
  std::vector<uintptr_t> rows;
  for (size_t j = 0; j < count; ++j) rows.push_back(stages + static_cast<uintptr_t>(j * bytes));
  return rows;
}

}  // namespace

CpuStageCombiner::CpuStageCombiner(std::vector<std::vector<double>> rows, std::vector<double> solution, bool is_double)
    : rows_(std::move(rows)), solution_(std::move(solution)), is_double_(is_double) {}

void CpuStageCombiner::combine(const std::vector<double>& weights, uintptr_t out, uintptr_t y0,
                            const std::vector<uintptr_t>& rows, int64_t n, double dt) const {
  if (rows.size() < weights.size()) throw std::invalid_argument("fewer stage pointers than weights");
  if (is_double_) {
    combine_typed<double>(weights, out, y0, rows, n, dt);
  } else {
    combine_typed<float>(weights, out, y0, rows, n, dt);
  }
}

const std::vector<double>& CpuStageCombiner::row(int64_t index) const {
  if (index < 0 || index >= static_cast<int64_t>(rows_.size())) throw std::out_of_range("stage index");
  return rows_[index];
}

void CpuStageCombiner::stage(int64_t index, uintptr_t out, uintptr_t y0, uintptr_t stages, int64_t stage_stride,
                          int64_t n, double dt) const {
  const auto& weights = row(index);
  combine(weights, out, y0, strided_rows(stages, stage_stride, weights.size(), is_double_), n, dt);
}

void CpuStageCombiner::solution(uintptr_t out, uintptr_t y0, uintptr_t stages, int64_t stage_stride, int64_t n,
                             double dt) const {
  combine(solution_, out, y0, strided_rows(stages, stage_stride, solution_.size(), is_double_), n, dt);
}

void CpuStageCombiner::stage_from(int64_t index, uintptr_t out, uintptr_t y0, const std::vector<uintptr_t>& stages,
                               int64_t n, double dt) const {
  combine(row(index), out, y0, stages, n, dt);
}

void CpuStageCombiner::solution_from(uintptr_t out, uintptr_t y0, const std::vector<uintptr_t>& stages, int64_t n,
                                  double dt) const {
  combine(solution_, out, y0, stages, n, dt);
}

}  // namespace fastcnf
