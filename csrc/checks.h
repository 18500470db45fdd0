// Argument checks of every ld_ext operator, forward and backward, in one place.
//
// The operators under torch.ops.ld_ext are public: they can be called directly, without the checks of
// the Python layer. Each device kernel (csrc/cpu/*.cpp, csrc/cuda/*.cu) calls the check of its
// operator first, and the fake (meta) kernels in ld_ext/ops.py call the same functions through
// ld_ext._C, so a bad call is refused the same way on every device:
//   * ValueError for shapes, sizes, devices and values (mode, temperature),
//   * TypeError for dtypes,
// each message naming the operator and the argument (by its name in the schema, csrc/ops.cpp).
// Sizes are read as SymInts, so that the checks also run on fake tensors with symbolic shapes
// (torch.compile with dynamic shapes), where a comparison becomes a guard.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Scalar.h>
#include <c10/util/Exception.h>

#include <cfloat>
#include <cmath>

#include "ld_ext.h"

namespace ld_ext {
namespace checks {

// Outputs (and so the incoming gradients) of region_features, region_discrimination and
// patch_discrimination are float32 for float16/bfloat16 inputs.
inline at::ScalarType out_type(at::ScalarType t) { return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t; }

// Smallest accepted temperature: 1/temperature must be finite in float32 (the kernels scale by
// 1/temperature in the compute precision).
constexpr double kMinTemperature = 1.0 / static_cast<double>(FLT_MAX);

inline void float_tensor(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.defined(), op, ": ", name, " must be a tensor, got an undefined tensor");
  const at::ScalarType st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
                   " must be a floating-point tensor (float32, float64, float16 or bfloat16), got ", st);
}

inline void same_device(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                        const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on the same device as ", ref_name, " (",
                    ref.device(), "), got ", t.device());
}

inline void dtype_is(const char* op, const at::Tensor& t, const char* name, at::ScalarType expected,
                     const char* because) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, op, ": ", name, " must have dtype ", expected, " (", because,
                   "), got ", t.scalar_type());
}

inline void nonempty(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.sym_numel() != 0, op, ": ", name, " must not be empty, got shape ", t.sym_sizes());
}

// t.shape == expected (elementwise, so that symbolic sizes give guards).
inline void shape_is(const char* op, const at::Tensor& t, const char* name, c10::SymIntArrayRef expected,
                     const char* what) {
  bool ok = t.dim() == static_cast<int64_t>(expected.size());
  for (size_t i = 0; ok && i < expected.size(); ++i) ok = t.sym_size(static_cast<int64_t>(i)) == expected[i];
  TORCH_CHECK_VALUE(ok, op, ": ", name, " must have shape ", expected, " (", what, "), got ", t.sym_sizes());
}

inline void scalar_grad(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.sym_numel() == 1, op, ": ", name, " must hold one element (the gradient of a scalar), got shape ",
                    t.sym_sizes());
}

// The temperature of an operator call (schema `Scalar temperature`) as a double: bool and complex
// values are refused with TypeError instead of being read as numbers.
inline double temperature_arg(const char* op, const c10::Scalar& t) {
  TORCH_CHECK_TYPE(!t.isBoolean() && !t.isComplex(), op, ": temperature must be a real number, got ",
                   t.isBoolean() ? "bool" : "complex");
  return t.toDouble();
}

inline void temperature(const char* op, double t) {
  TORCH_CHECK_VALUE(std::isfinite(t) && t > 0.0, op, ": temperature must be a finite number > 0, got ", t);
  TORCH_CHECK_VALUE(t >= kMinTemperature, op, ": temperature must be >= ", kMinTemperature,
                    " (1/temperature must be finite in float32), got ", t);
}

// (N, C, *spatial) with 1-3 spatial dims, not empty.
inline void pixel_tensor(const char* op, const at::Tensor& t, const char* name, const char* channels) {
  float_tensor(op, t, name);
  TORCH_CHECK_VALUE(t.dim() >= 3 && t.dim() <= 5, op, ": ", name, " must have shape (N, ", channels,
                    ", *spatial) with 1, 2 or 3 spatial dims, got shape ", t.sym_sizes());
  nonempty(op, t, name);
}

// ---- region_features --------------------------------------------------------------------------

inline void region_features(const char* op, const at::Tensor& embeddings, const at::Tensor& assignments,
                            int64_t mode) {
  pixel_tensor(op, embeddings, "embeddings", "D");
  pixel_tensor(op, assignments, "assignments", "K");
  same_device(op, embeddings, "embeddings", assignments, "assignments");
  dtype_is(op, assignments, "assignments", embeddings.scalar_type(), "the dtype of embeddings");
  TORCH_CHECK_VALUE(assignments.dim() == embeddings.dim(), op,
                    ": assignments must have as many dims as embeddings (N, K, *spatial), got shapes ",
                    embeddings.sym_sizes(), " and ", assignments.sym_sizes());
  TORCH_CHECK_VALUE(assignments.sym_size(0) == embeddings.sym_size(0), op,
                    ": assignments must have the batch size N of embeddings, got shapes ", embeddings.sym_sizes(),
                    " and ", assignments.sym_sizes());
  for (int64_t i = 2; i < embeddings.dim(); ++i) {
    TORCH_CHECK_VALUE(assignments.sym_size(i) == embeddings.sym_size(i), op,
                      ": assignments must have the spatial size of embeddings, got shapes ", embeddings.sym_sizes(),
                      " and ", assignments.sym_sizes());
  }
  TORCH_CHECK_VALUE(mode == kProbs || mode == kSigmoid || mode == kSoftmax, op,
                    ": mode must be 0 (probs), 1 (sigmoid) or 2 (softmax), got ", mode);
}

inline void region_features_backward(const char* op, const at::Tensor& grad_feats, const at::Tensor& grad_entropy,
                                     const at::Tensor& embeddings, const at::Tensor& assignments,
                                     const at::Tensor& feats, const at::Tensor& rnorm, int64_t mode) {
  region_features(op, embeddings, assignments, mode);
  const at::ScalarType ot = out_type(embeddings.scalar_type());
  const char* because = "the dtype of region_features' outputs";
  const std::pair<const at::Tensor*, const char*> saved[] = {
      {&grad_feats, "grad_feats"}, {&grad_entropy, "grad_entropy"}, {&feats, "feats"}, {&rnorm, "rnorm"}};
  for (const auto& s : saved) {
    float_tensor(op, *s.first, s.second);
    same_device(op, embeddings, "embeddings", *s.first, s.second);
    dtype_is(op, *s.first, s.second, ot, because);
  }
  const c10::SymInt N = embeddings.sym_size(0), D = embeddings.sym_size(1), K = assignments.sym_size(1);
  const c10::SymInt nkd[] = {N, K, D};
  const c10::SymInt nk[] = {N, K};
  shape_is(op, feats, "feats", nkd, "(N, K, D) from embeddings and assignments");
  shape_is(op, grad_feats, "grad_feats", nkd, "(N, K, D), the shape of feats");
  shape_is(op, rnorm, "rnorm", nk, "(N, K) from embeddings and assignments");
  scalar_grad(op, grad_entropy, "grad_entropy");
}

// ---- region_discrimination --------------------------------------------------------------------

inline void region_discrimination(const char* op, const at::Tensor& feats, double temp) {
  float_tensor(op, feats, "feats");
  TORCH_CHECK_VALUE(feats.dim() == 3, op, ": feats must have shape (N, K, D), got shape ", feats.sym_sizes());
  nonempty(op, feats, "feats");
  temperature(op, temp);
}

inline void region_discrimination_backward(const char* op, const at::Tensor& grad, const at::Tensor& feats,
                                           double temp) {
  region_discrimination(op, feats, temp);
  float_tensor(op, grad, "grad");
  same_device(op, feats, "feats", grad, "grad");
  dtype_is(op, grad, "grad", out_type(feats.scalar_type()), "the dtype of region_discrimination's output");
  scalar_grad(op, grad, "grad");
}

// ---- pixel_cluster_similarity -----------------------------------------------------------------

inline void pixel_cluster_similarity(const char* op, const at::Tensor& embeddings, const at::Tensor& prototypes,
                                     double temp) {
  pixel_tensor(op, embeddings, "embeddings", "D");
  float_tensor(op, prototypes, "prototypes");
  same_device(op, embeddings, "embeddings", prototypes, "prototypes");
  dtype_is(op, prototypes, "prototypes", embeddings.scalar_type(), "the dtype of embeddings");
  const c10::SymInt& D = embeddings.sym_size(1);
  if (prototypes.dim() == 2) {
    TORCH_CHECK_VALUE(prototypes.sym_size(1) == D, op, ": prototypes must have shape (K, D) with D = ", D,
                      " (embeddings' dim 1), got shape ", prototypes.sym_sizes());
  } else {
    TORCH_CHECK_VALUE(prototypes.dim() == 3 && prototypes.sym_size(0) == embeddings.sym_size(0) &&
                          prototypes.sym_size(2) == D,
                      op, ": prototypes must have shape (K, D) or (N, K, D) with N = ", embeddings.sym_size(0),
                      " and D = ", D, " from embeddings, got shape ", prototypes.sym_sizes());
  }
  nonempty(op, prototypes, "prototypes");
  temperature(op, temp);
}

inline void pixel_cluster_similarity_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& embeddings,
                                              const at::Tensor& prototypes, const at::Tensor& out, double temp) {
  pixel_cluster_similarity(op, embeddings, prototypes, temp);
  std::vector<c10::SymInt> shape(embeddings.sym_sizes().begin(), embeddings.sym_sizes().end());
  shape[1] = prototypes.sym_size(-2);
  const std::pair<const at::Tensor*, const char*> saved[] = {{&grad_out, "grad_out"}, {&out, "out"}};
  for (const auto& s : saved) {
    float_tensor(op, *s.first, s.second);
    same_device(op, embeddings, "embeddings", *s.first, s.second);
    dtype_is(op, *s.first, s.second, embeddings.scalar_type(), "the dtype of embeddings");
    shape_is(op, *s.first, s.second, shape, "(N, K, *spatial) from embeddings and prototypes");
  }
}

// ---- patch_discrimination ---------------------------------------------------------------------

inline void patch_discrimination(const char* op, const at::Tensor& x, double temp) {
  float_tensor(op, x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must have shape (M, D), got shape ", x.sym_sizes());
  nonempty(op, x, "x");
  TORCH_CHECK_VALUE(x.sym_size(0) % 2 == 0, op,
                    ": x must have an even number of rows M >= 2 (row i pairs with i + M/2), got shape ",
                    x.sym_sizes());
  temperature(op, temp);
}

inline void patch_discrimination_backward(const char* op, const at::Tensor& grad, const at::Tensor& x, double temp) {
  patch_discrimination(op, x, temp);
  float_tensor(op, grad, "grad");
  same_device(op, x, "x", grad, "grad");
  dtype_is(op, grad, "grad", out_type(x.scalar_type()), "the dtype of patch_discrimination's output");
  scalar_grad(op, grad, "grad");
}

}  // namespace checks
}  // namespace ld_ext
