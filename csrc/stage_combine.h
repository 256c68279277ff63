// Fused Runge-Kutta stage combination on raw CPU buffers (see stage_combine.cpp).
#pragma once

#include <cstdint>
#include <vector>

namespace fastcnf {

// out = y0 + dt * sum_j weights[j] * stages[j], one pass over memory.
class StageCombiner {
 public:
  // rows[i] are the weights of stage input i (a_i), solution is b.
  StageCombiner(std::vector<std::vector<double>> rows, std::vector<double> solution, bool is_double);
  void stage(int64_t index, uintptr_t out, uintptr_t y0, uintptr_t stages, int64_t stage_stride, int64_t n,
             double dt) const;
  void solution(uintptr_t out, uintptr_t y0, uintptr_t stages, int64_t stage_stride, int64_t n, double dt) const;

 private:
  void combine(const std::vector<double>& weights, uintptr_t out, uintptr_t y0, uintptr_t stages,
               int64_t stage_stride, int64_t n, double dt) const;
  std::vector<std::vector<double>> rows_;
  std::vector<double> solution_;
  bool is_double_;
};

}  // namespace fastcnf
