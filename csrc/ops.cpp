// Operator schemas of ld_ext, declared once. Device kernels are registered in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA) with TORCH_LIBRARY_IMPL; autograd and fake
// (meta) kernels are registered from Python in ld_ext/ops.py.
//
// Layout conventions shared by every kernel:
//   embeddings  (N, D, *spatial)  1-3 spatial dims, P = prod(spatial)
//   assignments (N, K, *spatial)
//   mode        0 = "probs" (used as given), 1 = "sigmoid" (logits -> sigmoid -> L1 with eps 1e-9),
//               2 = "softmax" (softmax over K)
#include <torch/extension.h>

#include "ld_ext.h"

TORCH_LIBRARY(ld_ext, m) {
  // feats (N,K,D): unit region features r; rnorm (N,K): ||r~|| before normalisation (saved for
  // backward); entropy (): mean binary entropy (log2) of the normalised assignment, or 0 when
  // `entropy` is false. Outputs are float32 for float16/bfloat16 inputs.
  m.def(
      "region_features(Tensor embeddings, Tensor assignments, bool normalize, int mode, "
      "bool entropy) -> (Tensor, Tensor, Tensor)");
  m.def(
      "region_features_backward(Tensor grad_feats, Tensor grad_entropy, Tensor embeddings, "
      "Tensor assignments, Tensor feats, Tensor rnorm, bool normalize, int mode, bool entropy) "
      "-> (Tensor, Tensor)");
  // Region discrimination loss on (N,K,D) features, cluster centres not detached. Returns a
  // 0-dim tensor (float32 for low-precision inputs).
  m.def("region_discrimination(Tensor feats, float temperature) -> Tensor");
  m.def("region_discrimination_backward(Tensor grad, Tensor feats, float temperature) -> Tensor");
  // softmax_k(<proto_k, e_p>/tau): prototypes (K,D) shared or (N,K,D) per image; output
  // (N, K, *spatial) in the embeddings' dtype.
  m.def(
      "pixel_cluster_similarity(Tensor embeddings, Tensor prototypes, float temperature, "
      "bool normalize) -> Tensor");
  m.def(
      "pixel_cluster_similarity_backward(Tensor grad_out, Tensor embeddings, Tensor prototypes, "
      "Tensor out, float temperature, bool normalize) -> (Tensor, Tensor)");
  // Invariant-and-spreading instance criterion on (M,D) rows, M even, rows i and (i+M/2)%M a
  // positive pair, with the stop-gradients of the published code. 0-dim result.
  m.def("patch_discrimination(Tensor x, float temperature) -> Tensor");
  m.def("patch_discrimination_backward(Tensor grad, Tensor x, float temperature) -> Tensor");
}

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "ld_ext compiled kernels (operators live under torch.ops.ld_ext)";
#ifdef LD_EXT_WITH_CUDA
  mod.attr("cuda_compiled") = true;
#else
  mod.attr("cuda_compiled") = false;
#endif
  mod.attr("cpu_isa") = ld_ext::cpu_isa();
  mod.attr("torch_version_built") =
      std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
      std::to_string(TORCH_VERSION_PATCH);
}
