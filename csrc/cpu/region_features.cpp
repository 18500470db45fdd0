// region_features (+ fused entropy): forward and backward on the CPU, one pass over the pixels each.
//
// Forward, per (image, chunk of pixels), tile by tile:
//   E[d,t] = z[d,t] (/ (||z_t|| + 1e-10) when normalize)       (D x tile, in a scratch buffer)
//   A[k,t] = assignment of pixel t (probs / sigmoid+L1 / softmax) (K x tile)
//   partial[k,d] += sum_t A[k,t] E[d,t];   entropy += sum H(A)
// then r~ = sum of partials in chunk order / P and r = r~ / (||r~|| + 1e-10).
// Backward recomputes E and A per tile (nothing of size N*K*P is saved) and writes dL/dz, dL/ds.
#include "common.h"

namespace ld_ext {
namespace cpu {
namespace {

struct RFShape {
  int64_t N, D, K, P;
};

// ---- per-tile building blocks (T = float or double) ------------------------------------------

// Load assignments into A (K x ts) and apply the mode. For sigmoid, sig keeps sigmoid(s) and U
// the per-pixel L1 sum (for backward). Padded lanes are left at 0.
template <typename T>
LD_INLINE void load_assignments(const T* __restrict s, int64_t P, int64_t K, int64_t p0, int64_t tn, int64_t ts,
                                int64_t mode, T* __restrict A, T* __restrict sig, T* __restrict U) {
  if (mode == kProbs) {
    for (int64_t k = 0; k < K; ++k) {
      const T* src = s + k * P + p0;
      T* dst = A + k * ts;
      for (int64_t t = 0; t < tn; ++t) dst[t] = src[t];
      for (int64_t t = tn; t < ts; ++t) dst[t] = T(0);
    }
    return;
  }
  if (mode == kSigmoid) {
    const T eps = static_cast<T>(kAssignEps);
    for (int64_t t = 0; t < ts; ++t) U[t] = T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T* src = s + k * P + p0;
      T* sg = sig + k * ts;
      for (int64_t t = 0; t < tn; ++t) sg[t] = T(1) / (T(1) + vexp<T>(-src[t]));
      for (int64_t t = tn; t < ts; ++t) sg[t] = T(0);
      for (int64_t t = 0; t < ts; ++t) U[t] += sg[t] + eps;
    }
    for (int64_t k = 0; k < K; ++k) {
      const T* sg = sig + k * ts;
      T* dst = A + k * ts;
      for (int64_t t = 0; t < tn; ++t) dst[t] = (sg[t] + eps) / U[t];
      for (int64_t t = tn; t < ts; ++t) dst[t] = T(0);
    }
    return;
  }
  // softmax over K: U keeps the row max first, then the sum
  T* mx = sig;  // scratch row (K rows available, use the first)
  for (int64_t t = 0; t < tn; ++t) mx[t] = s[p0 + t];
  for (int64_t k = 1; k < K; ++k) {
    const T* src = s + k * P + p0;
    for (int64_t t = 0; t < tn; ++t) mx[t] = src[t] > mx[t] ? src[t] : mx[t];
  }
  for (int64_t t = 0; t < tn; ++t) U[t] = T(0);
  for (int64_t k = 0; k < K; ++k) {
    const T* src = s + k * P + p0;
    T* dst = A + k * ts;
    for (int64_t t = 0; t < tn; ++t) {
      dst[t] = vexp<T>(src[t] - mx[t]);
      U[t] += dst[t];
    }
    for (int64_t t = tn; t < ts; ++t) dst[t] = T(0);
  }
  for (int64_t t = 0; t < tn; ++t) U[t] = T(1) / U[t];
  for (int64_t k = 0; k < K; ++k) {
    T* dst = A + k * ts;
    for (int64_t t = 0; t < tn; ++t) dst[t] *= U[t];
  }
}

// Scratch buffers of one task, sized for one tile.
template <typename T>
struct Scratch {
  std::vector<T> E, A, sig, m, inv, U, gE, gA;
  Scratch(int64_t D, int64_t K, int64_t ts, bool backward)
      : E(D * ts), A(K * ts), sig(K * ts), m(ts), inv(ts), U(ts) {
    if (backward) {
      gE.resize(D * ts);
      gA.resize(K * ts);
    }
  }
};

// ---- forward ---------------------------------------------------------------------------------

// One task: image n, pixels [c0, c1). Writes partial[K*D] (sums over the task's pixels, in acc
// precision) and the entropy sum.
template <typename T>
LD_INLINE void rf_forward_task_impl(const T* z, const T* s, const RFShape& sh, int64_t n, int64_t c0, int64_t c1,
                                    bool normalize, int64_t mode, bool entropy, double* partial, double* ent_sum) {
  const int64_t D = sh.D, K = sh.K, P = sh.P, ts = kTile;
  Scratch<T> w(D, K, ts, false);
  const T* zn = z + n * D * P;
  const T* sn = s + n * K * P;
  for (int64_t i = 0; i < K * D; ++i) partial[i] = 0.0;
  double ent = 0.0;
  for (int64_t p0 = c0; p0 < c1; p0 += ts) {
    const int64_t tn = std::min(ts, c1 - p0);
    load_embeddings<T>(zn, P, D, p0, tn, ts, normalize, w.E.data(), w.m.data(), w.inv.data());
    load_assignments<T>(sn, P, K, p0, tn, ts, mode, w.A.data(), w.sig.data(), w.U.data());
    // Padded lanes hold a = 0, whose entropy is exactly 0, so whole lane groups can be summed.
    const int64_t tl = round_up(tn, Lanes<T>::value);
    if (entropy) {
      for (int64_t k = 0; k < K; ++k) ent += static_cast<double>(entropy_sum_lanes<T>(w.A.data() + k * ts, tl));
    }
    tile_dot_block<T>(w.A.data(), K, w.E.data(), D, ts, tl, partial);
  }
  *ent_sum = ent;
}

LD_CLONES void rf_forward_task_f32(const float* z, const float* s, const RFShape& sh, int64_t n, int64_t c0,
                                   int64_t c1, bool normalize, int64_t mode, bool entropy, double* partial,
                                   double* ent_sum) {
  rf_forward_task_impl<float>(z, s, sh, n, c0, c1, normalize, mode, entropy, partial, ent_sum);
}
void rf_forward_task_f64(const double* z, const double* s, const RFShape& sh, int64_t n, int64_t c0, int64_t c1,
                         bool normalize, int64_t mode, bool entropy, double* partial, double* ent_sum) {
  rf_forward_task_impl<double>(z, s, sh, n, c0, c1, normalize, mode, entropy, partial, ent_sum);
}

template <typename T>
void rf_forward_task(const T* z, const T* s, const RFShape& sh, int64_t n, int64_t c0, int64_t c1, bool normalize,
                     int64_t mode, bool entropy, double* partial, double* ent_sum) {
  if constexpr (std::is_same_v<T, float>)
    rf_forward_task_f32(z, s, sh, n, c0, c1, normalize, mode, entropy, partial, ent_sum);
  else
    rf_forward_task_f64(z, s, sh, n, c0, c1, normalize, mode, entropy, partial, ent_sum);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> region_features_cpu(const at::Tensor& embeddings,
                                                                   const at::Tensor& assignments, bool normalize,
                                                                   int64_t mode, bool entropy) {
  checks::region_features("ld_ext::region_features", embeddings, assignments, mode);
  check_cpu_float(embeddings, "embeddings");
  check_cpu_float(assignments, "assignments");
  TORCH_CHECK(embeddings.scalar_type() == assignments.scalar_type(), "embeddings and assignments dtypes differ");
  TORCH_CHECK(embeddings.dim() >= 3 && embeddings.dim() == assignments.dim(), "bad ranks");
  TORCH_CHECK(mode >= 0 && mode <= 2, "mode must be 0, 1 or 2");
  const at::Tensor z = as_compute(embeddings), s = as_compute(assignments);
  const RFShape sh{z.size(0), z.size(1), s.size(1), pixels_of(z)};
  TORCH_CHECK(s.size(0) == sh.N && pixels_of(s) == sh.P, "embeddings and assignments shapes do not match");
  const int64_t nchunks = (sh.P + kChunk - 1) / kChunk;
  const int64_t ntasks = sh.N * nchunks;
  std::vector<double> partials(static_cast<size_t>(ntasks * sh.K * sh.D));
  std::vector<double> ent(static_cast<size_t>(ntasks), 0.0);

  at::Tensor feats = at::empty({sh.N, sh.K, sh.D}, z.options());
  at::Tensor rnorm = at::empty({sh.N, sh.K}, z.options());
  at::Tensor ent_out = at::zeros({}, z.options());

  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "region_features_cpu", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    at::parallel_for(0, ntasks, 1, [&](int64_t b, int64_t e) {
      for (int64_t task = b; task < e; ++task) {
        const int64_t n = task / nchunks, c = task % nchunks;
        const int64_t c0 = c * kChunk, c1 = std::min(sh.P, c0 + kChunk);
        rf_forward_task<scalar_t>(zp, sp, sh, n, c0, c1, normalize, mode, entropy,
                                  partials.data() + task * sh.K * sh.D, ent.data() + task);
      }
    });
    scalar_t* fp = feats.data_ptr<scalar_t>();
    scalar_t* np_ = rnorm.data_ptr<scalar_t>();
    const double invP = 1.0 / static_cast<double>(sh.P);
    std::vector<double> rt(sh.D);
    for (int64_t n = 0; n < sh.N; ++n) {
      for (int64_t k = 0; k < sh.K; ++k) {
        for (int64_t d = 0; d < sh.D; ++d) {
          double acc = 0.0;
          for (int64_t c = 0; c < nchunks; ++c) acc += partials[((n * nchunks + c) * sh.K + k) * sh.D + d];
          rt[d] = acc * invP;
        }
        const double nr = safe_norm(rt.data(), sh.D);
        np_[n * sh.K + k] = static_cast<scalar_t>(nr);
        for (int64_t d = 0; d < sh.D; ++d)
          fp[(n * sh.K + k) * sh.D + d] = static_cast<scalar_t>(rt[d] / (nr + kNormEps));
      }
    }
    if (entropy) {
      double tot = 0.0;
      for (int64_t t = 0; t < ntasks; ++t) tot += ent[t];
      ent_out.fill_(tot / (static_cast<double>(sh.N) * sh.K * sh.P));
    }
  });
  return {feats, rnorm, ent_out};
}

// ---- backward --------------------------------------------------------------------------------

template <typename T>
LD_INLINE void rf_backward_task_impl(const T* z, const T* s, const T* G, T cent, const RFShape& sh, int64_t n,
                                     int64_t c0, int64_t c1, bool normalize, int64_t mode, bool entropy, T* gz,
                                     T* gs) {
  const int64_t D = sh.D, K = sh.K, P = sh.P, ts = kTile;
  Scratch<T> w(D, K, ts, true);
  const T* zn = z + n * D * P;
  const T* sn = s + n * K * P;
  const T* Gn = G + n * K * D;  // (K, D), already divided by P
  T* gzn = gz + n * D * P;
  T* gsn = gs + n * K * P;
  std::vector<T> dotv(ts);
  T* E = w.E.data();
  T* A = w.A.data();
  T* gE = w.gE.data();
  T* gA = w.gA.data();
  for (int64_t p0 = c0; p0 < c1; p0 += ts) {
    const int64_t tn = std::min(ts, c1 - p0);
    load_embeddings<T>(zn, P, D, p0, tn, ts, normalize, E, w.m.data(), w.inv.data());
    load_assignments<T>(sn, P, K, p0, tn, ts, mode, A, w.sig.data(), w.U.data());
    // gE[d,t] = sum_k G[k,d] A[k,t];  gA[k,t] = sum_d G[k,d] E[d,t] (+ entropy term).
    // Padded lanes of A and E are zero, so whole lane groups can be combined.
    const int64_t tl = round_up(tn, Lanes<T>::value);
    tile_combine<T>(Gn, D, 1, A, K, D, ts, tl, gE);
    tile_combine<T>(Gn, 1, D, E, D, K, ts, tl, gA);
    if (entropy) {
      for (int64_t k = 0; k < K; ++k) {
        T* ga = gA + k * ts;
        const T* a = A + k * ts;
        for (int64_t t = 0; t < tn; ++t) ga[t] += cent * binary_entropy_grad<T>(a[t]);
      }
    }
    // through the assignment normalisation
    if (mode == kProbs) {
      for (int64_t k = 0; k < K; ++k) {
        const T* ga = gA + k * ts;
        T* dst = gsn + k * P + p0;
        for (int64_t t = 0; t < tn; ++t) dst[t] = ga[t];
      }
    } else {
      for (int64_t t = 0; t < tn; ++t) dotv[t] = T(0);
      for (int64_t k = 0; k < K; ++k) {
        const T* ga = gA + k * ts;
        const T* a = A + k * ts;
        for (int64_t t = 0; t < tn; ++t) dotv[t] += ga[t] * a[t];
      }
      if (mode == kSigmoid) {
        const T* U = w.U.data();
        for (int64_t k = 0; k < K; ++k) {
          const T* ga = gA + k * ts;
          const T* sg = w.sig.data() + k * ts;
          T* dst = gsn + k * P + p0;
          for (int64_t t = 0; t < tn; ++t) dst[t] = sg[t] * (T(1) - sg[t]) * (ga[t] - dotv[t]) / U[t];
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          const T* ga = gA + k * ts;
          const T* a = A + k * ts;
          T* dst = gsn + k * P + p0;
          for (int64_t t = 0; t < tn; ++t) dst[t] = a[t] * (ga[t] - dotv[t]);
        }
      }
    }
    // through the embedding normalisation
    store_embedding_grad<T>(gE, E, w.m.data(), w.inv.data(), P, D, p0, tn, ts, normalize, dotv.data(), gzn);
  }
}

LD_CLONES void rf_backward_task_f32(const float* z, const float* s, const float* G, float cent, const RFShape& sh,
                                    int64_t n, int64_t c0, int64_t c1, bool normalize, int64_t mode, bool entropy,
                                    float* gz, float* gs) {
  rf_backward_task_impl<float>(z, s, G, cent, sh, n, c0, c1, normalize, mode, entropy, gz, gs);
}
void rf_backward_task_f64(const double* z, const double* s, const double* G, double cent, const RFShape& sh,
                          int64_t n, int64_t c0, int64_t c1, bool normalize, int64_t mode, bool entropy, double* gz,
                          double* gs) {
  rf_backward_task_impl<double>(z, s, G, cent, sh, n, c0, c1, normalize, mode, entropy, gz, gs);
}

template <typename T>
void rf_backward_task(const T* z, const T* s, const T* G, T cent, const RFShape& sh, int64_t n, int64_t c0,
                      int64_t c1, bool normalize, int64_t mode, bool entropy, T* gz, T* gs) {
  if constexpr (std::is_same_v<T, float>)
    rf_backward_task_f32(z, s, G, cent, sh, n, c0, c1, normalize, mode, entropy, gz, gs);
  else
    rf_backward_task_f64(z, s, G, cent, sh, n, c0, c1, normalize, mode, entropy, gz, gs);
}

std::tuple<at::Tensor, at::Tensor> region_features_backward_cpu(const at::Tensor& grad_feats,
                                                                const at::Tensor& grad_entropy,
                                                                const at::Tensor& embeddings,
                                                                const at::Tensor& assignments, const at::Tensor& feats,
                                                                const at::Tensor& rnorm, bool normalize, int64_t mode,
                                                                bool entropy) {
  checks::region_features_backward("ld_ext::region_features_backward", grad_feats, grad_entropy, embeddings,
                                   assignments, feats, rnorm, mode);
  check_cpu_float(embeddings, "embeddings");
  check_cpu_float(assignments, "assignments");
  const at::Tensor z = as_compute(embeddings), s = as_compute(assignments);
  const auto ct = z.scalar_type();
  const RFShape sh{z.size(0), z.size(1), s.size(1), pixels_of(z)};
  // dL/dr~ from dL/dr (small, in double): g/(n+eps) - r (r.g)/n, divided by P.
  const at::Tensor g = grad_feats.to(at::kDouble).contiguous();
  const at::Tensor r = feats.to(at::kDouble).contiguous();
  const at::Tensor nr = rnorm.to(at::kDouble).contiguous();
  at::Tensor G = at::empty({sh.N, sh.K, sh.D}, g.options());
  {
    const double* gp = g.data_ptr<double>();
    const double* rp = r.data_ptr<double>();
    const double* np_ = nr.data_ptr<double>();
    double* Gp = G.data_ptr<double>();
    const double invP = 1.0 / static_cast<double>(sh.P);
    for (int64_t i = 0; i < sh.N * sh.K; ++i) {
      const double* gi = gp + i * sh.D;
      const double* ri = rp + i * sh.D;
      double rg = 0.0;
      for (int64_t d = 0; d < sh.D; ++d) rg += ri[d] * gi[d];
      const double nn = np_[i];
      const double c = nn > 0.0 ? rg / nn : 0.0;
      for (int64_t d = 0; d < sh.D; ++d) Gp[i * sh.D + d] = (gi[d] / (nn + kNormEps) - ri[d] * c) * invP;
    }
  }
  G = G.to(ct);
  const double cent =
      entropy ? grad_entropy.to(at::kDouble).item<double>() / (static_cast<double>(sh.N) * sh.K * sh.P) : 0.0;

  at::Tensor gz = at::empty({sh.N, sh.D, sh.P}, z.options());
  at::Tensor gs = at::empty({sh.N, sh.K, sh.P}, s.options());
  const int64_t nchunks = (sh.P + kChunk - 1) / kChunk;
  const int64_t ntasks = sh.N * nchunks;
  AT_DISPATCH_FLOATING_TYPES(ct, "region_features_backward_cpu", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* Gp = G.data_ptr<scalar_t>();
    scalar_t* gzp = gz.data_ptr<scalar_t>();
    scalar_t* gsp = gs.data_ptr<scalar_t>();
    at::parallel_for(0, ntasks, 1, [&](int64_t b, int64_t e) {
      for (int64_t task = b; task < e; ++task) {
        const int64_t n = task / nchunks, c = task % nchunks;
        const int64_t c0 = c * kChunk, c1 = std::min(sh.P, c0 + kChunk);
        rf_backward_task<scalar_t>(zp, sp, Gp, static_cast<scalar_t>(cent), sh, n, c0, c1, normalize, mode, entropy,
                                   gzp, gsp);
      }
    });
  });
  gz = gz.view(embeddings.sizes()).to(embeddings.scalar_type());
  gs = gs.view(assignments.sizes()).to(assignments.scalar_type());
  return {gz, gs};
}

}  // namespace


}  // namespace cpu
}  // namespace ld_ext

TORCH_LIBRARY_IMPL(ld_ext, CPU, m) {
  m.impl("region_features", &ld_ext::cpu::region_features_cpu);
  m.impl("region_features_backward", &ld_ext::cpu::region_features_backward_cpu);
}
