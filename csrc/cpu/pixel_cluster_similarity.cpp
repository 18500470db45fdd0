// pixel_cluster_similarity: S[n,k,p] = softmax_k(<proto_k, e_p> / tau), forward and backward on the
// CPU, one pass over the pixels each. Prototypes are (K, D) shared or (N, K, D) per image.
// Backward reads the saved output S and recomputes e; prototype gradients are reduced per
// (image, chunk) and then added in a fixed order.
#include "common.h"

namespace ld_ext {
namespace cpu {
namespace {

struct PCSShape {
  int64_t N, D, K, P;
  bool shared;
};

// exp(x) of a scaled, shifted logit x = (l - max l) / tau <= 0; 0 below e^-87 for float (fast_exp
// alone flushes up to e^-87 ~ 1.6e-38 there, which the backward's S / tau would turn into O(1)
// gradients at the smallest temperatures), the C library for double.
template <typename T>
LD_INLINE T pcs_exp(T x) {
  return vexp<T>(x);
}
template <>
LD_INLINE float pcs_exp<float>(float x) {
  return fast_exp(x) * static_cast<float>(!(x < -87.0f));  // a product, not a branch (keeps a NaN)
}

// Logits are formed unscaled and the temperature applied to l - max l: 1/tau is finite (>= the
// smallest accepted temperature) but <proto, e> / tau alone can overflow, and inf - inf is NaN.
template <typename T>
LD_INLINE void pcs_forward_task_impl(const T* z, const T* proto, T* out, const PCSShape& sh, int64_t n, int64_t c0,
                                     int64_t c1, T inv_tau, bool normalize) {
  const int64_t D = sh.D, K = sh.K, P = sh.P, ts = kTile;
  std::vector<T> E(D * ts), L(K * ts), m(ts), inv(ts), mx(ts), sum(ts);
  const T* zn = z + n * D * P;
  const T* pr = proto + (sh.shared ? 0 : n * K * D);
  T* on = out + n * K * P;
  for (int64_t p0 = c0; p0 < c1; p0 += ts) {
    const int64_t tn = std::min(ts, c1 - p0);
    load_embeddings<T>(zn, P, D, p0, tn, ts, normalize, E.data(), m.data(), inv.data());
    tile_combine<T>(pr, 1, D, E.data(), D, K, ts, round_up(tn, Lanes<T>::value), L.data());
    for (int64_t t = 0; t < tn; ++t) mx[t] = L[t];
    for (int64_t k = 1; k < K; ++k) {
      const T* l = L.data() + k * ts;
      for (int64_t t = 0; t < tn; ++t) mx[t] = l[t] > mx[t] ? l[t] : mx[t];
    }
    for (int64_t t = 0; t < tn; ++t) sum[t] = T(0);
    for (int64_t k = 0; k < K; ++k) {
      T* l = L.data() + k * ts;
      for (int64_t t = 0; t < tn; ++t) {
        l[t] = pcs_exp<T>((l[t] - mx[t]) * inv_tau);
        sum[t] += l[t];
      }
    }
    for (int64_t t = 0; t < tn; ++t) sum[t] = T(1) / sum[t];
    for (int64_t k = 0; k < K; ++k) {
      const T* l = L.data() + k * ts;
      T* dst = on + k * P + p0;
      for (int64_t t = 0; t < tn; ++t) dst[t] = l[t] * sum[t];
    }
  }
}

LD_CLONES void pcs_forward_task(const float* z, const float* proto, float* out, const PCSShape& sh, int64_t n,
                                int64_t c0, int64_t c1, float inv_tau, bool normalize) {
  pcs_forward_task_impl<float>(z, proto, out, sh, n, c0, c1, inv_tau, normalize);
}
void pcs_forward_task(const double* z, const double* proto, double* out, const PCSShape& sh, int64_t n, int64_t c0,
                      int64_t c1, double inv_tau, bool normalize) {
  pcs_forward_task_impl<double>(z, proto, out, sh, n, c0, c1, inv_tau, normalize);
}

// Backward of one task. partial (K*D, double) receives sum_t gL[k,t] e[d,t] over the task's pixels.
template <typename T>
LD_INLINE void pcs_backward_task_impl(const T* go, const T* z, const T* proto, const T* out, T* gz, double* partial,
                                      const PCSShape& sh, int64_t n, int64_t c0, int64_t c1, T inv_tau,
                                      bool normalize) {
  const int64_t D = sh.D, K = sh.K, P = sh.P, ts = kTile;
  std::vector<T> E(D * ts), GL(K * ts), GE(D * ts), m(ts), inv(ts), dotv(ts);
  const T* zn = z + n * D * P;
  const T* pr = proto + (sh.shared ? 0 : n * K * D);
  const T* on = out + n * K * P;
  const T* gon = go + n * K * P;
  T* gzn = gz + n * D * P;
  for (int64_t i = 0; i < K * D; ++i) partial[i] = 0.0;
  for (int64_t p0 = c0; p0 < c1; p0 += ts) {
    const int64_t tn = std::min(ts, c1 - p0);
    load_embeddings<T>(zn, P, D, p0, tn, ts, normalize, E.data(), m.data(), inv.data());
    // gL[k,t] = S (g - sum_j g_j S_j) / tau  (zero on padded lanes)
    for (int64_t t = 0; t < tn; ++t) dotv[t] = T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T* sk = on + k * P + p0;
      const T* gk = gon + k * P + p0;
      for (int64_t t = 0; t < tn; ++t) dotv[t] += gk[t] * sk[t];
    }
    for (int64_t k = 0; k < K; ++k) {
      const T* sk = on + k * P + p0;
      const T* gk = gon + k * P + p0;
      T* gl = GL.data() + k * ts;
      for (int64_t t = 0; t < tn; ++t) gl[t] = sk[t] * (gk[t] - dotv[t]) * inv_tau;
      for (int64_t t = tn; t < ts; ++t) gl[t] = T(0);
    }
    // prototype gradient partials, and gE[d,t] = sum_k proto[k,d] gL[k,t]
    const int64_t tl = round_up(tn, Lanes<T>::value);
    tile_dot_block<T>(GL.data(), K, E.data(), D, ts, tl, partial);
    tile_combine<T>(pr, D, 1, GL.data(), K, D, ts, tl, GE.data());
    store_embedding_grad<T>(GE.data(), E.data(), m.data(), inv.data(), P, D, p0, tn, ts, normalize, dotv.data(), gzn);
  }
}

LD_CLONES void pcs_backward_task(const float* go, const float* z, const float* proto, const float* out, float* gz,
                                 double* partial, const PCSShape& sh, int64_t n, int64_t c0, int64_t c1,
                                 float inv_tau, bool normalize) {
  pcs_backward_task_impl<float>(go, z, proto, out, gz, partial, sh, n, c0, c1, inv_tau, normalize);
}
void pcs_backward_task(const double* go, const double* z, const double* proto, const double* out, double* gz,
                       double* partial, const PCSShape& sh, int64_t n, int64_t c0, int64_t c1, double inv_tau,
                       bool normalize) {
  pcs_backward_task_impl<double>(go, z, proto, out, gz, partial, sh, n, c0, c1, inv_tau, normalize);
}

PCSShape shape_of(const at::Tensor& z, const at::Tensor& proto) {
  const bool shared = proto.dim() == 2;
  PCSShape sh{z.size(0), z.size(1), proto.size(shared ? 0 : 1), pixels_of(z), shared};
  TORCH_CHECK(proto.size(proto.dim() - 1) == sh.D, "prototypes and embeddings disagree on D");
  TORCH_CHECK(shared || proto.size(0) == sh.N, "prototypes and embeddings disagree on N");
  return sh;
}

at::Tensor pixel_cluster_similarity_cpu(const at::Tensor& embeddings, const at::Tensor& prototypes,
                                        double temperature, bool normalize) {
  checks::pixel_cluster_similarity("ld_ext::pixel_cluster_similarity", embeddings, prototypes, temperature);
  check_cpu_float(embeddings, "embeddings");
  check_cpu_float(prototypes, "prototypes");
  const at::Tensor z = as_compute(embeddings);
  const at::Tensor pr = as_compute(prototypes).to(z.scalar_type());
  const PCSShape sh = shape_of(z, pr);
  std::vector<int64_t> osz{sh.N, sh.K};
  for (int64_t i = 2; i < embeddings.dim(); ++i) osz.push_back(embeddings.size(i));
  at::Tensor out = at::empty(osz, z.options());
  const int64_t nchunks = (sh.P + kChunk - 1) / kChunk;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "pixel_cluster_similarity_cpu", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* pp = pr.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t inv_tau = static_cast<scalar_t>(1.0 / temperature);
    at::parallel_for(0, sh.N * nchunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t task = b; task < e; ++task) {
        const int64_t n = task / nchunks, c = task % nchunks;
        const int64_t c0 = c * kChunk, c1 = std::min(sh.P, c0 + kChunk);
        pcs_forward_task(zp, pp, op, sh, n, c0, c1, inv_tau, normalize);
      }
    });
  });
  return out.to(embeddings.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> pixel_cluster_similarity_backward_cpu(const at::Tensor& grad_out,
                                                                         const at::Tensor& embeddings,
                                                                         const at::Tensor& prototypes,
                                                                         const at::Tensor& out, double temperature,
                                                                         bool normalize) {
  checks::pixel_cluster_similarity_backward("ld_ext::pixel_cluster_similarity_backward", grad_out, embeddings,
                                            prototypes, out, temperature);
  check_cpu_float(embeddings, "embeddings");
  const at::Tensor z = as_compute(embeddings);
  const auto ct = z.scalar_type();
  const at::Tensor pr = as_compute(prototypes).to(ct);
  const at::Tensor go = grad_out.contiguous().to(ct);
  // float16/bfloat16 inputs: the saved output is rounded to the input dtype, and S (g - <g, S>)
  // amplifies that rounding where one S_k is near 1; recompute S in the compute type instead (as
  // the CUDA backward does for every dtype).
  const at::Tensor so = out.scalar_type() == ct ? out.contiguous()
                                                : pixel_cluster_similarity_cpu(z, pr, temperature, normalize);
  const PCSShape sh = shape_of(z, pr);
  const int64_t nchunks = (sh.P + kChunk - 1) / kChunk;
  const int64_t ntasks = sh.N * nchunks;
  at::Tensor gz = at::empty({sh.N, sh.D, sh.P}, z.options());
  std::vector<double> partials(static_cast<size_t>(ntasks * sh.K * sh.D));
  AT_DISPATCH_FLOATING_TYPES(ct, "pixel_cluster_similarity_backward_cpu", [&] {
    const scalar_t* gop = go.data_ptr<scalar_t>();
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* pp = pr.data_ptr<scalar_t>();
    const scalar_t* sp = so.data_ptr<scalar_t>();
    scalar_t* gzp = gz.data_ptr<scalar_t>();
    const scalar_t inv_tau = static_cast<scalar_t>(1.0 / temperature);
    at::parallel_for(0, ntasks, 1, [&](int64_t b, int64_t e) {
      for (int64_t task = b; task < e; ++task) {
        const int64_t n = task / nchunks, c = task % nchunks;
        const int64_t c0 = c * kChunk, c1 = std::min(sh.P, c0 + kChunk);
        double* part = partials.data() + task * sh.K * sh.D;
        pcs_backward_task(gop, zp, pp, sp, gzp, part, sh, n, c0, c1, inv_tau, normalize);
      }
    });
  });
  // prototype gradient: fixed-order sum of the partials (over chunks, and over images if shared)
  at::Tensor gp = at::zeros(pr.sizes(), pr.options().dtype(at::kDouble));
  double* gpp = gp.data_ptr<double>();
  const int64_t KD = sh.K * sh.D;
  for (int64_t task = 0; task < ntasks; ++task) {
    const int64_t n = task / nchunks;
    double* dst = gpp + (sh.shared ? 0 : n * KD);
    const double* src = partials.data() + task * KD;
    for (int64_t i = 0; i < KD; ++i) dst[i] += src[i];
  }
  return {gz.view(embeddings.sizes()).to(embeddings.scalar_type()), gp.to(prototypes.scalar_type())};
}

}  // namespace


}  // namespace cpu
}  // namespace ld_ext

TORCH_LIBRARY_IMPL(ld_ext, CPU, m) {
  m.impl("pixel_cluster_similarity", [](const at::Tensor& e, const at::Tensor& p, const c10::Scalar& t, bool normalize) {
    return ld_ext::cpu::pixel_cluster_similarity_cpu(e, p, ld_ext::checks::temperature_arg("ld_ext::pixel_cluster_similarity", t), normalize);
  });
  m.impl("pixel_cluster_similarity_backward", [](const at::Tensor& g, const at::Tensor& e, const at::Tensor& p, const at::Tensor& out, const c10::Scalar& t, bool normalize) {
    return ld_ext::cpu::pixel_cluster_similarity_backward_cpu(g, e, p, out, ld_ext::checks::temperature_arg("ld_ext::pixel_cluster_similarity_backward", t), normalize);
  });
}
