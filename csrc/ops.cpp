// Operator schemas of ld_ext, declared once. Device kernels are registered in
// csrc/cpu/<op>.cpp (CPU) and csrc/cuda/<op>.cu (CUDA) with TORCH_LIBRARY_IMPL; autograd and fake
// (meta) kernels are registered from Python in ld_ext/ops.py. Every kernel, fake ones included,
// first runs its operator's argument checks from csrc/checks.h.
//
// Layout conventions shared by every kernel:
//   embeddings  (N, D, *spatial)  1-3 spatial dims, P = prod(spatial)
//   assignments (N, K, *spatial)
//   mode        0 = "probs" (used as given), 1 = "sigmoid" (logits -> sigmoid -> L1 with eps 1e-9),
//               2 = "softmax" (softmax over K)
#include <torch/extension.h>

#include "checks.h"
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
  // `temperature` is a Scalar rather than a float: torch converts a bool given for a float argument
  // to 1.0 silently, while a Scalar keeps its type, so every kernel refuses bool and complex
  // temperatures (checks::temperature_arg) before anything else.
  // Region discrimination loss on (N,K,D) features, cluster centres not detached. Returns a
  // 0-dim tensor (float32 for low-precision inputs).
  m.def("region_discrimination(Tensor feats, Scalar temperature) -> Tensor");
  m.def("region_discrimination_backward(Tensor grad, Tensor feats, Scalar temperature) -> Tensor");
  // softmax_k(<proto_k, e_p>/tau): prototypes (K,D) shared or (N,K,D) per image; output
  // (N, K, *spatial) in the embeddings' dtype.
  m.def(
      "pixel_cluster_similarity(Tensor embeddings, Tensor prototypes, Scalar temperature, "
      "bool normalize) -> Tensor");
  m.def(
      "pixel_cluster_similarity_backward(Tensor grad_out, Tensor embeddings, Tensor prototypes, "
      "Tensor out, Scalar temperature, bool normalize) -> (Tensor, Tensor)");
  // Invariant-and-spreading instance criterion on (M,D) rows, M even, rows i and (i+M/2)%M a
  // positive pair, with the stop-gradients of the published code. 0-dim result.
  m.def("patch_discrimination(Tensor x, Scalar temperature) -> Tensor");
  m.def("patch_discrimination_backward(Tensor grad, Tensor x, Scalar temperature) -> Tensor");
}

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "ld_ext compiled kernels (operators live under torch.ops.ld_ext)";
#ifdef LD_EXT_WITH_CUDA
  mod.attr("cuda_compiled") = true;
#else
  mod.attr("cuda_compiled") = false;
#endif
  mod.attr("cpu_isa") = ld_ext::cpu_isa();
  // The argument checks of csrc/checks.h for the fake (meta) kernels in ld_ext/ops.py, with the
  // operators' signatures; each raises ValueError/TypeError naming the argument, or returns None.
  mod.def("check_region_features", [](const at::Tensor& embeddings, const at::Tensor& assignments, bool,
                                      int64_t mode, bool) {
    ld_ext::checks::region_features("ld_ext::region_features", embeddings, assignments, mode);
  });
  mod.def("check_region_features_backward",
          [](const at::Tensor& grad_feats, const at::Tensor& grad_entropy, const at::Tensor& embeddings,
             const at::Tensor& assignments, const at::Tensor& feats, const at::Tensor& rnorm, bool, int64_t mode,
             bool) {
            ld_ext::checks::region_features_backward("ld_ext::region_features_backward", grad_feats, grad_entropy,
                                             embeddings, assignments, feats, rnorm, mode);
          });
  mod.def("check_region_discrimination", [](const at::Tensor& feats, double temperature) {
    ld_ext::checks::region_discrimination("ld_ext::region_discrimination", feats, temperature);
  });
  mod.def("check_region_discrimination_backward", [](const at::Tensor& grad, const at::Tensor& feats,
                                                     double temperature) {
    ld_ext::checks::region_discrimination_backward("ld_ext::region_discrimination_backward", grad, feats, temperature);
  });
  mod.def("check_pixel_cluster_similarity", [](const at::Tensor& embeddings, const at::Tensor& prototypes,
                                               double temperature, bool) {
    ld_ext::checks::pixel_cluster_similarity("ld_ext::pixel_cluster_similarity", embeddings, prototypes, temperature);
  });
  mod.def("check_pixel_cluster_similarity_backward",
          [](const at::Tensor& grad_out, const at::Tensor& embeddings, const at::Tensor& prototypes,
             const at::Tensor& out, double temperature, bool) {
            ld_ext::checks::pixel_cluster_similarity_backward("ld_ext::pixel_cluster_similarity_backward", grad_out,
                                                      embeddings, prototypes, out, temperature);
          });
  mod.def("check_patch_discrimination", [](const at::Tensor& x, double temperature) {
    ld_ext::checks::patch_discrimination("ld_ext::patch_discrimination", x, temperature);
  });
  mod.def("check_patch_discrimination_backward", [](const at::Tensor& grad, const at::Tensor& x,
                                                    double temperature) {
    ld_ext::checks::patch_discrimination_backward("ld_ext::patch_discrimination_backward", grad, x, temperature);
  });
  mod.attr("min_temperature") = ld_ext::checks::kMinTemperature;
  mod.attr("torch_version_built") =
      std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
      std::to_string(TORCH_VERSION_PATCH);
}
