// Fused Runge-Kutta stage combination on raw CPU buffers (see stage_combine.cpp).
#pragma once

#include <cstdint>
#include <vector>

namespace fastcnf {

// out = y0 + dt * sum_j weights[j] * stages[j], one pass over memory.
class CpuStageCombiner {
 public:
  // rows[i] are the weights of stage input i (a_i), solution is b.
  CpuStageCombiner(std::vector<std::vector<double>> rows, std::vector<double> solution, bool is_double);
  void stage(int64_t index, uintptr_t out, uintptr_t y0, uintptr_t stages, int64_t stage_stride, int64_t n,
             double dt) const;
  void solution(uintptr_t out, uintptr_t y0, uintptr_t stages, int64_t stage_stride, int64_t n, double dt) const;
  // The same with the stages as separate buffers (one pointer per stage, at least up to the last used one).
  void stage_from(int64_t index, uintptr_t out, uintptr_t y0, const std::vector<uintptr_t>& stages, int64_t n,
                  double dt) const;
  void solution_from(uintptr_t out, uintptr_t y0, const std::vector<uintptr_t>& stages, int64_t n, double dt) const;

 private:
  const std::vector<double>& row(int64_t index) const;
  void combine(const std::vector<double>& weights, uintptr_t out, uintptr_t y0, const std::vector<uintptr_t>& rows,
               int64_t n, double dt) const;
  std::vector<std::vector<double>> rows_;
  std::vector<double> solution_;
  bool is_double_;
};

}  // namespace fastcnf
