// Autocast for the forward ops of ld_ext, in one place (the pattern of torchvision's
// csrc/ops/autocast/*: disable autocast, cast the inputs, redispatch).
//
// Policy:
//  * CUDA: the kernels take float16/bfloat16 directly and accumulate in float32, so no input is
//    widened; only inputs of different floating dtypes are brought to their promoted type.
//  * CPU: the CPU kernels are float32/float64 only, so float16/bfloat16 inputs are computed in
//    float32. pixel_cluster_similarity's result is cast back to the embeddings' dtype (its
//    output dtype is the input's); the other ops return float32 for low-precision inputs anyway.
// The backward ops need no autocast kernel: they receive the dtypes the forward saw.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "checks.h"

#include <tuple>

namespace ld_ext {
namespace {

bool is_low_precision(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

template <c10::DispatchKey key>
at::ScalarType compute_type(at::ScalarType a, at::ScalarType b) {
  const at::ScalarType common = at::promote_types(a, b);
  if (key == c10::DispatchKey::AutocastCPU && is_low_precision(common)) return at::kFloat;
  return common;
}

at::Tensor cast_to(const at::Tensor& t, at::ScalarType st) { return t.scalar_type() == st ? t : t.to(st); }

template <c10::DispatchKey key>
std::tuple<at::Tensor, at::Tensor, at::Tensor> region_features_autocast(const at::Tensor& embeddings,
                                                                        const at::Tensor& assignments, bool normalize,
                                                                        int64_t mode, bool entropy) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ld_ext::region_features", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                             bool, int64_t, bool)>();
  const at::ScalarType st = compute_type<key>(embeddings.scalar_type(), assignments.scalar_type());
  return op.call(cast_to(embeddings, st), cast_to(assignments, st), normalize, mode, entropy);
}

template <c10::DispatchKey key>
at::Tensor region_discrimination_autocast(const at::Tensor& feats, const c10::Scalar& temperature) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ld_ext::region_discrimination", "")
                       .typed<at::Tensor(const at::Tensor&, const c10::Scalar&)>();
  const at::ScalarType st = compute_type<key>(feats.scalar_type(), feats.scalar_type());
  return op.call(cast_to(feats, st), temperature);
}

template <c10::DispatchKey key>
at::Tensor pixel_cluster_similarity_autocast(const at::Tensor& embeddings, const at::Tensor& prototypes,
                                             const c10::Scalar& temperature, bool normalize) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ld_ext::pixel_cluster_similarity", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::Scalar&, bool)>();
  const at::ScalarType st = compute_type<key>(embeddings.scalar_type(), prototypes.scalar_type());
  at::Tensor out = op.call(cast_to(embeddings, st), cast_to(prototypes, st), temperature, normalize);
  // The op's output dtype is the embeddings' dtype; on CPU it was computed in float32.
  if (key == c10::DispatchKey::AutocastCPU && is_low_precision(embeddings.scalar_type())) {
    return out.to(embeddings.scalar_type());
  }
  return out;
}

template <c10::DispatchKey key>
at::Tensor patch_discrimination_autocast(const at::Tensor& x, const c10::Scalar& temperature) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ld_ext::patch_discrimination", "")
                       .typed<at::Tensor(const at::Tensor&, const c10::Scalar&)>();
  const at::ScalarType st = compute_type<key>(x.scalar_type(), x.scalar_type());
  return op.call(cast_to(x, st), temperature);
}

}  // namespace

TORCH_LIBRARY_IMPL(ld_ext, AutocastCPU, m) {
  m.impl("region_features", &region_features_autocast<c10::DispatchKey::AutocastCPU>);
  m.impl("region_discrimination", &region_discrimination_autocast<c10::DispatchKey::AutocastCPU>);
  m.impl("pixel_cluster_similarity", &pixel_cluster_similarity_autocast<c10::DispatchKey::AutocastCPU>);
  m.impl("patch_discrimination", &patch_discrimination_autocast<c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(ld_ext, AutocastCUDA, m) {
  m.impl("region_features", &region_features_autocast<c10::DispatchKey::AutocastCUDA>);
  m.impl("region_discrimination", &region_discrimination_autocast<c10::DispatchKey::AutocastCUDA>);
  m.impl("pixel_cluster_similarity", &pixel_cluster_similarity_autocast<c10::DispatchKey::AutocastCUDA>);
  m.impl("patch_discrimination", &patch_discrimination_autocast<c10::DispatchKey::AutocastCUDA>);
}

}  // namespace ld_ext
