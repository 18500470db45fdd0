#pragma once
#include <string>

namespace ld_ext {
// Which instruction set the CPU kernels dispatch to at run time on this machine (cpu/isa.cpp).
std::string cpu_isa();

enum AssignmentMode : int64_t { kProbs = 0, kSigmoid = 1, kSoftmax = 2 };

constexpr double kNormEps = 1e-10;    // e = z / (||z|| + 1e-10), r = r~ / (||r~|| + 1e-10)
constexpr double kAssignEps = 1e-9;   // a = (s + 1e-9) / sum_k (s + 1e-9)
constexpr double kEntropyEps = 1e-30; // -a log2(a + 1e-30) - (1-a) log2(1-a + 1e-30)
constexpr double kSoftmaxEps = 1e-10; // patch discrimination: P = pos / (Z + 1e-10)
// log(kSoftmaxEps): patch discrimination shifts its exponentials by max(max_j s_ij, this), so that
// the 1e-10 term, exp(log 1e-10 - shift) <= 1, never overflows when every logit is very negative.
constexpr double kLogSoftmaxEps = -23.025850929940456840;
}  // namespace ld_ext
