// CUDA kernels of ld_ext::pixel_cluster_similarity and its backward.
//
// S[n,k,p] = softmax_k(<proto_k, e[n,:,p]> / tau), prototypes (K, D) shared by all images or
// (N, K, D) per image, e = z or z / (||z|| + 1e-10) (normalize). docs/method.md section 7.
//
// Each block owns one image and a strided set of pixel chunks. A chunk of z is read once into
// shared memory (accumulation type) and normalised there; the prototypes of the image sit in
// shared memory for the whole block. Backward recomputes e and S (in fp32) per chunk, forms
// g_l = S (g - sum_j g_j S_j) / tau, g_e = proto^T g_l and accumulates the prototype gradient
// sum_p g_l[k,p] e[d,p] in shared memory; each block writes its partial (K, D) sum to a buffer
// that a second kernel adds up in a fixed order (no atomics: bitwise reproducible).
//
// As in region_features.cu, register-blocked kernels (pcs_*_rb_kernel) are the default where
// K x D allows (pcs_forward_plan / pcs_backward_plan); the general kernels below cover the rest.
#include "common.cuh"

namespace ld_ext {
namespace cuda {
namespace {

// E[j*ds + d] = z[d, p0 + j] (zeros past the end), then, when normalising, per-pixel norms in M
// and E /= (M + eps). Ends with a barrier.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_embeddings(const scalar_t* __restrict__ e_n, int64_t P, int64_t p0, int np,
                                                const Tile& tl, bool normalize, acc_t* E, acc_t* M) {
  const int cp = tl.cp;
  for (int i = threadIdx.x; i < tl.D * cp; i += blockDim.x) {
    const int d = i / cp;
    const int j = i - d * cp;
    E[j * tl.ds + d] = j < np ? static_cast<acc_t>(e_n[d * P + p0 + j]) : acc_t(0);
  }
  __syncthreads();
  if (!normalize) return;
  if (threadIdx.x < cp) {
    const int j = threadIdx.x;
    M[j] = dev_norm(E + j * tl.ds, tl.D, 1);
  }
  __syncthreads();
  const acc_t eps = static_cast<acc_t>(kNormEps);
  for (int i = threadIdx.x; i < tl.D * cp; i += blockDim.x) {
    const int d = i / cp;
    const int j = i - d * cp;
    E[j * tl.ds + d] = E[j * tl.ds + d] / (M[j] + eps);
  }
  __syncthreads();
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_prototypes(const scalar_t* __restrict__ proto, const Tile& tl, acc_t* Ps) {
  for (int i = threadIdx.x; i < tl.K * tl.D; i += blockDim.x) {
    const int k = i / tl.D;
    const int d = i - k * tl.D;
    Ps[k * tl.ds + d] = static_cast<acc_t>(proto[i]);
  }
}

// L[j*ks + k] = <proto_k, e_j> (unscaled) for every pixel j of the chunk (past-the-end pixels have
// e = 0), then the softmax statistics MX[j] = max_k L and SU[j] = sum_k exp((L - MX) itau), with
// itau = 1/tau. The temperature is applied to L - MX, never to L alone: 1/tau is finite for every
// accepted temperature, but <proto, e> / tau can overflow, and inf - inf is NaN. Ends with a barrier.
template <typename acc_t>
__device__ __forceinline__ void chunk_logits(const Tile& tl, acc_t itau, const acc_t* Ps, const acc_t* E, acc_t* L,
                                             acc_t* MX, acc_t* SU) {
  const int cp = tl.cp;
  for (int i = threadIdx.x; i < tl.K * cp; i += blockDim.x) {
    const int j = i / tl.K;
    const int k = i - j * tl.K;
    acc_t s = 0;
    for (int d = 0; d < tl.D; ++d) s += Ps[k * tl.ds + d] * E[j * tl.ds + d];
    L[j * tl.ks + k] = s;
  }
  __syncthreads();
  if (threadIdx.x < cp) {
    const acc_t* x = L + threadIdx.x * tl.ks;
    acc_t m = neg_inf<acc_t>();
    for (int k = 0; k < tl.K; ++k) m = dev_max(m, x[k]);
    acc_t su = 0;
    for (int k = 0; k < tl.K; ++k) su += dev_exp((x[k] - m) * itau);
    MX[threadIdx.x] = m;
    SU[threadIdx.x] = su;
  }
  __syncthreads();
}

// Grid: N * T blocks; block b: image n = b / T, chunks t, t + T, ...
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) pcs_forward_kernel(const scalar_t* __restrict__ emb,
                                                              const scalar_t* __restrict__ proto,
                                                              scalar_t* __restrict__ out, int64_t D, int64_t K,
                                                              int64_t P, int64_t T, int64_t nchunks, Tile tl,
                                                              bool per_image, bool normalize, acc_t itau) {
  LD_CUDA_DYNAMIC_SMEM(acc_t, sm);
  const int cp = tl.cp;
  acc_t* Ps = sm;                 // K * ds
  acc_t* E = Ps + tl.K * tl.ds;   // cp * ds
  acc_t* L = E + cp * tl.ds;      // cp * ks
  acc_t* M = L + cp * tl.ks;      // cp
  acc_t* MX = M + cp;             // cp
  acc_t* SU = MX + cp;            // cp

  const int64_t b = blockIdx.x;
  const int64_t n = b / T;
  const int64_t t = b - n * T;
  const scalar_t* e_n = emb + n * D * P;
  scalar_t* o_n = out + n * K * P;
  load_prototypes<scalar_t, acc_t>(per_image ? proto + n * K * D : proto, tl, Ps);

  for (int64_t c = t; c < nchunks; c += T) {
    const int64_t p0 = c * cp;
    const int np = static_cast<int>(min(static_cast<int64_t>(cp), P - p0));
    __syncthreads();
    load_embeddings<scalar_t, acc_t>(e_n, P, p0, np, tl, normalize, E, M);
    chunk_logits<acc_t>(tl, itau, Ps, E, L, MX, SU);
    for (int i = threadIdx.x; i < tl.K * cp; i += blockDim.x) {
      const int k = i / cp;
      const int j = i - k * cp;
      if (j >= np) continue;
      o_n[k * P + p0 + j] = static_cast<scalar_t>(dev_exp((L[j * tl.ks + k] - MX[j]) * itau) / SU[j]);
    }
  }
}

// Grid: N * T blocks as in forward. Writes grad_z for its pixels and its partial prototype
// gradient part[b * K*D + k*D + d]. S is recomputed from e and the prototypes (the saved output is
// not read).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) pcs_backward_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ emb, const scalar_t* __restrict__ proto,
    scalar_t* __restrict__ grad_emb, acc_t* __restrict__ part, int64_t D,
    int64_t K, int64_t P, int64_t T, int64_t nchunks, Tile tl, bool per_image, bool normalize, acc_t itau) {
  LD_CUDA_DYNAMIC_SMEM(acc_t, sm);
  const int cp = tl.cp;
  const int KD = tl.K * tl.D;
  acc_t* Ps = sm;                 // K * ds
  acc_t* accs = Ps + tl.K * tl.ds;  // K * D
  acc_t* E = accs + KD;           // cp * ds
  acc_t* GE = E + cp * tl.ds;     // cp * ds
  acc_t* GL = GE + cp * tl.ds;    // cp * ks
  acc_t* SS = GL + cp * tl.ks;    // cp * ks
  acc_t* M = SS + cp * tl.ks;     // cp
  acc_t* DT = M + cp;             // cp
  acc_t* DE = DT + cp;            // cp
  acc_t* MX = DE + cp;            // cp
  acc_t* SU = MX + cp;            // cp

  const int64_t b = blockIdx.x;
  const int64_t n = b / T;
  const int64_t t = b - n * T;
  const scalar_t* e_n = emb + n * D * P;
  const scalar_t* g_n = grad_out + n * K * P;
  scalar_t* ge_n = grad_emb + n * D * P;
  load_prototypes<scalar_t, acc_t>(per_image ? proto + n * K * D : proto, tl, Ps);
  for (int i = threadIdx.x; i < KD; i += blockDim.x) accs[i] = 0;

  for (int64_t c = t; c < nchunks; c += T) {
    const int64_t p0 = c * cp;
    const int np = static_cast<int>(min(static_cast<int64_t>(cp), P - p0));
    __syncthreads();
    for (int i = threadIdx.x; i < tl.K * cp; i += blockDim.x) {
      const int k = i / cp;
      const int j = i - k * cp;
      GL[j * tl.ks + k] = j < np ? static_cast<acc_t>(g_n[k * P + p0 + j]) : acc_t(0);
    }
    load_embeddings<scalar_t, acc_t>(e_n, P, p0, np, tl, normalize, E, M);  // ends with a barrier
    // Recompute S in the accumulation type from e and the prototypes (more accurate than the
    // saved output, which is rounded to the input dtype, and no extra pass over memory).
    chunk_logits<acc_t>(tl, itau, Ps, E, SS, MX, SU);
    for (int i = threadIdx.x; i < tl.K * cp; i += blockDim.x) {
      const int k = i / cp;
      const int j = i - k * cp;
      SS[j * tl.ks + k] = j < np ? dev_exp((SS[j * tl.ks + k] - MX[j]) * itau) / SU[j] : acc_t(0);
    }
    __syncthreads();
    if (threadIdx.x < cp) {
      const int j = threadIdx.x;
      acc_t s = 0;
      for (int k = 0; k < tl.K; ++k) s += GL[j * tl.ks + k] * SS[j * tl.ks + k];
      DT[j] = s;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < tl.K * cp; i += blockDim.x) {
      const int k = i / cp;
      const int j = i - k * cp;
      GL[j * tl.ks + k] = SS[j * tl.ks + k] * (GL[j * tl.ks + k] - DT[j]) * itau;
    }
    __syncthreads();
    // g_e[j,d] = sum_k g_l[j,k] proto[k,d]; prototype partials acc[k,d] += sum_j g_l[j,k] e[j,d].
    for (int i = threadIdx.x; i < tl.D * cp; i += blockDim.x) {
      const int j = i / tl.D;
      const int d = i - j * tl.D;
      acc_t s = 0;
      for (int k = 0; k < tl.K; ++k) s += GL[j * tl.ks + k] * Ps[k * tl.ds + d];
      GE[j * tl.ds + d] = s;
    }
    for (int i = threadIdx.x; i < KD; i += blockDim.x) {
      const int k = i / tl.D;
      const int d = i - k * tl.D;
      acc_t s = accs[i];
      for (int j = 0; j < np; ++j) s += GL[j * tl.ks + k] * E[j * tl.ds + d];
      accs[i] = s;
    }
    __syncthreads();
    if (normalize && threadIdx.x < cp) {
      const int j = threadIdx.x;
      acc_t s = 0;
      for (int d = 0; d < tl.D; ++d) s += E[j * tl.ds + d] * GE[j * tl.ds + d];
      DE[j] = s;
    }
    __syncthreads();
    store_grad_emb<scalar_t, acc_t>(ge_n, P, p0, np, tl, normalize, GE, E, M, DE);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < KD; i += blockDim.x) part[b * KD + i] = accs[i];
}

// ------------------------------------------------------------------ register-blocked fast path
// Used when the prototype gradient's 4x4 output blocks fit one per thread ((KP/4) * (DP/4) <= 256)
// and the tiles fit in shared memory; the kernels above are the general fallback. Channels are
// rows of pixels in shared memory (RBTile); the logits, g_e and the prototype gradient are 4x4
// register-blocked products fed by 16-byte shared-memory reads; per-pixel work (norms, softmax,
// the normalisation's backward) runs one thread per pixel with coalesced global stores.

// Registers per thread that stage the next chunk (StagedChunk): rows * cp <= kStage * kThreads.
constexpr int kStageFwd = 16;
constexpr int kStageBwd = 16;

// Prototypes of the image in the two register-block orders (padding entries 0):
// Pd[d*KP + 4*kb + r] = proto[kb + KQ r, d] and, when Pk is given, Pk[k*DP + 4*db + c] = proto[k, db + DQ c].
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void pcs_rb_prototypes(const scalar_t* __restrict__ pr, const RBTile& tl, acc_t* Pd,
                                                  acc_t* Pk) {
  for (int i = threadIdx.x; i < tl.KP * tl.DP; i += blockDim.x) {
    const int k = i / tl.DP;
    const int d = i - k * tl.DP;
    const acc_t v = (k < tl.K && d < tl.D) ? static_cast<acc_t>(pr[k * tl.D + d]) : acc_t(0);
    Pd[d * tl.KP + 4 * (k % tl.KQ) + k / tl.KQ] = v;
    if (Pk != nullptr) Pk[k * tl.DP + 4 * (d % tl.DQ) + d / tl.DQ] = v;
  }
}

// L[k*cs + j] = sum_d proto[k, d] Z[d, j] for all rows k < KP and pixels of the chunk, in 4x4
// register blocks (unit u: rows kb + KQ r, pixels 4q..4q+3), by threads tid, tid + blockDim, ...
template <typename acc_t>
__device__ __forceinline__ void pcs_rb_logits(const RBTile& tl, const acc_t* Pd, const acc_t* Z, acc_t* L) {
  const int nq = tl.cp / 4;
  for (int u = threadIdx.x; u < tl.KQ * nq; u += blockDim.x) {
    const int kb = u % tl.KQ, q = u / tl.KQ;
    product44_store(Pd + 4 * kb, tl.KP, Z + 4 * q, tl.cs, tl.D, L + kb * tl.cs + 4 * q, tl.KQ * tl.cs);
  }
}

// Per pixel j: im = 1/(||z_j|| + eps) (1 without normalize; M[j] = ||z_j||), unscaled logits
// l_k = L[k, j] im, and L[k, j] := S[k, j] = softmax_k(l / tau), the temperature applied to l - max l
// (itau = 1/tau; see chunk_logits). Returns im.
template <typename acc_t>
__device__ __forceinline__ acc_t pcs_rb_softmax(int j, const RBTile& tl, bool normalize, acc_t itau, const acc_t* Z,
                                                acc_t* L, acc_t* M) {
  const int cs = tl.cs;
  acc_t m = 0;
  const acc_t im = normalize ? column_inv_norm(Z, j, tl, &m) : acc_t(1);
  if (M != nullptr) M[j] = m;
  const acc_t scale = im;
  acc_t mx = neg_inf<acc_t>();
#pragma unroll 4
  for (int k = 0; k < tl.K; ++k) {
    const acc_t l = L[k * cs + j] * scale;
    L[k * cs + j] = l;
    mx = dev_max(mx, l);
  }
  acc_t su = 0;
#pragma unroll 4
  for (int k = 0; k < tl.K; ++k) {
    const acc_t x = dev_exp((L[k * cs + j] - mx) * itau);
    L[k * cs + j] = x;
    su += x;
  }
  const acc_t isu = acc_t(1) / su;
#pragma unroll 4
  for (int k = 0; k < tl.K; ++k) L[k * cs + j] = L[k * cs + j] * isu;
  return im;
}

template <typename scalar_t, typename acc_t, bool prefetch>
__global__ void __launch_bounds__(kThreads, 2) pcs_forward_rb_kernel(const scalar_t* __restrict__ emb,
                                                                 const scalar_t* __restrict__ proto,
                                                                 scalar_t* __restrict__ out, int64_t P, int64_t T,
                                                                 int64_t nchunks, RBTile tl, bool per_image,
                                                                 bool normalize, acc_t itau) {
  LD_CUDA_DYNAMIC_SMEM(acc_t, sm);
  const int cs = tl.cs, cp = tl.cp;
  acc_t* Z = sm;                  // DP * cs
  acc_t* L = Z + tl.DP * cs;      // KP * cs
  acc_t* Pd = L + tl.KP * cs;     // DP * KP

  const int64_t b = blockIdx.x;
  const int64_t n = b / T;
  const int64_t t = b - n * T;
  const scalar_t* e_n = emb + n * static_cast<int64_t>(tl.D) * P;
  scalar_t* o_n = out + n * static_cast<int64_t>(tl.K) * P;
  pcs_rb_prototypes<scalar_t, acc_t>(per_image ? proto + n * tl.K * tl.D : proto, tl, Pd, nullptr);

  StagedChunk<scalar_t, kStageFwd> st;
  staged_chunk_loop<prefetch>(
      t, T, nchunks, cp, P, [&](int64_t c) { st.load_chunk(c, e_n, tl.D, tl.DP, e_n, 0, 0, P, tl); },
      [&](int np) { st.template store<acc_t>(Z, tl.DP, Z, 0, 0, np, tl, kProbs, nullptr); },
      [&](int64_t p0, int np) {
        pcs_rb_logits<acc_t>(tl, Pd, Z, L);
        __syncthreads();
        const int j = threadIdx.x;
        if (j < np) {
          pcs_rb_softmax<acc_t>(j, tl, normalize, itau, Z, L, nullptr);
#pragma unroll 4
          for (int k = 0; k < tl.K; ++k) o_n[k * P + p0 + j] = static_cast<scalar_t>(L[k * cs + j]);
        }
      });
}

// Backward. Per chunk: load z and grad_out, logits, per pixel S and g_l = S (g - <g, S>) / tau
// (into G) and e = z im (into Z), then g_e = proto^T g_l (4x4 blocks into GE) while every thread
// adds its fixed 4x4 block of the prototype gradient sum_j g_l[k, j] e[d, j] in registers (pixel
// group g: quads g, g + Gn, ...), then per pixel the normalisation's backward and the stores.
template <typename scalar_t, typename acc_t, bool prefetch>
__global__ void __launch_bounds__(kThreads, 2) pcs_backward_rb_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ emb, const scalar_t* __restrict__ proto,
    scalar_t* __restrict__ grad_emb, acc_t* __restrict__ part, int64_t P, int64_t T, int64_t nchunks, RBTile tl,
    int region0, bool per_image, bool normalize, acc_t itau) {
  LD_CUDA_DYNAMIC_SMEM(acc_t, sm);
  const int cs = tl.cs, cp = tl.cp;
  const int D = tl.D, K = tl.K, DQ = tl.DQ, KQ = tl.KQ;
  acc_t* Z = sm;                  // DP * cs (z, then e)
  acc_t* GE = Z + tl.DP * cs;     // DP * cs
  acc_t* RED = sm;                // Gn * nob * 16 after the chunk loop (aliases Z and GE)
  acc_t* G = sm + region0;        // KP * cs (grad_out, then g_l)
  acc_t* L = G + tl.KP * cs;      // KP * cs (logits, then S)
  acc_t* Pd = L + tl.KP * cs;     // DP * KP
  acc_t* Pk = Pd + tl.DP * tl.KP; // KP * DP
  acc_t* M = Pk + tl.KP * tl.DP;  // cp

  const int tid = threadIdx.x;
  const int nob = KQ * DQ;
  const int Gn = max(1, static_cast<int>(blockDim.x) / nob);
  const int ob = tid % nob, g = tid / nob;
  const int kb = ob / DQ, db = ob - kb * DQ;
  const int nq = cp / 4;

  const int64_t b = blockIdx.x;
  const int64_t n = b / T;
  const int64_t t = b - n * T;
  const scalar_t* e_n = emb + n * static_cast<int64_t>(D) * P;
  const scalar_t* g_n = grad_out + n * static_cast<int64_t>(K) * P;
  scalar_t* ge_n = grad_emb + n * static_cast<int64_t>(D) * P;
  pcs_rb_prototypes<scalar_t, acc_t>(per_image ? proto + n * K * D : proto, tl, Pd, Pk);

  acc_t pacc[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) pacc[r][c] = 0;

  StagedChunk<scalar_t, kStageBwd> st;  // z and grad_out rows, as in the forward
  staged_chunk_loop<prefetch>(
      t, T, nchunks, cp, P, [&](int64_t c) { st.load_chunk(c, e_n, D, tl.DP, g_n, K, tl.KP, P, tl); },
      [&](int np) { st.template store<acc_t>(Z, tl.DP, G, K, tl.KP, np, tl, kProbs, nullptr); },
      [&](int64_t p0, int np) {
        pcs_rb_logits<acc_t>(tl, Pd, Z, L);
        __syncthreads();
        if (tid < cp) {
          const int j = tid;
          const acc_t im = pcs_rb_softmax<acc_t>(j, tl, normalize, itau, Z, L, M);
          acc_t dt = 0;
#pragma unroll 4
          for (int k = 0; k < K; ++k) dt += G[k * cs + j] * L[k * cs + j];
#pragma unroll 4
          for (int k = 0; k < K; ++k) G[k * cs + j] = L[k * cs + j] * (G[k * cs + j] - dt) * itau;
          if (normalize) {
#pragma unroll 4
            for (int d = 0; d < D; ++d) Z[d * cs + j] *= im;
          }
        }
        __syncthreads();
        // g_e[d, j] = sum_k proto[k, d] g_l[k, j]: unit u = rows db' + DQ c, pixels 4q'..4q'+3.
        for (int u = tid; u < DQ * nq; u += blockDim.x) {
          const int dbu = u % DQ, q = u / DQ;
          product44_store(Pk + 4 * dbu, tl.DP, G + 4 * q, cs, K, GE + dbu * cs + 4 * q, DQ * cs);
        }
        if (g < Gn) {
          for (int q = g; q < nq; q += Gn) {
            accumulate_quad44(pacc, G + kb * cs + 4 * q, KQ * cs, Z + db * cs + 4 * q, DQ * cs);
          }
        }
        __syncthreads();
        if (tid < np) {
          // dL/dz = (g_e - e (e . g_e) (m + eps) / m) / (m + eps) with normalize (0 projection when
          // m == 0), else g_e. Z holds e here.
          const int j = tid;
          if (normalize) {
            const acc_t m = M[j];
            const acc_t den = m + static_cast<acc_t>(kNormEps);
            acc_t de = 0;
#pragma unroll 4
            for (int d = 0; d < D; ++d) de += Z[d * cs + j] * GE[d * cs + j];
            // projection coefficient (e . g_e) (m + eps) / m, 0 when m == 0; then one reciprocal
            const acc_t c = m > acc_t(0) ? de * den / m : acc_t(0);
            const acc_t iden = acc_t(1) / den;
#pragma unroll 4
            for (int d = 0; d < D; ++d) {
              const acc_t v = GE[d * cs + j] - Z[d * cs + j] * c;
              ge_n[d * P + p0 + j] = static_cast<scalar_t>(v * iden);
            }
          } else {
#pragma unroll 4
            for (int d = 0; d < D; ++d) ge_n[d * P + p0 + j] = static_cast<scalar_t>(GE[d * cs + j]);
          }
        }
      });
  __syncthreads();
  reduce_groups44(pacc, RED, tl, Gn, part + b * K * D);
}


// Plans of the register-blocked kernels (tile.cp == 0: use the general kernels). The backward's
// prototype-gradient blocks must fit one per thread. LD_EXT_CUDA_RB_FWD_CP / LD_EXT_CUDA_RB_BWD_CP
// cap the chunk (tuning knob; 0 forces the general kernels).
RBPlan pcs_forward_plan(int64_t D, int64_t K, size_t elem, int device) {
  const int max_cp = env_cap("LD_EXT_CUDA_RB_FWD_CP", 128);
  const int64_t DP = (D + 3) / 4 * 4, KP = (K + 3) / 4 * 4;
  return rb_search(D, K, max_cp, DP, kStageFwd, device, [&](int cp) {
    return std::make_pair(int64_t{0}, static_cast<size_t>((DP + KP) * (cp + 4) + DP * KP) * elem);
  });
}

RBPlan pcs_backward_plan(int64_t D, int64_t K, size_t elem, int device) {
  const int max_cp = env_cap("LD_EXT_CUDA_RB_BWD_CP", 64);
  const int64_t DP = (D + 3) / 4 * 4, KP = (K + 3) / 4 * 4;
  const int64_t nob = (DP / 4) * (KP / 4);
  if (nob > kThreads) return rb_none();
  const int64_t Gn = std::max<int64_t>(1, kThreads / nob);
  return rb_search(D, K, max_cp, DP + KP, kStageBwd, device, [&](int cp) {
    const int64_t region0 = std::max<int64_t>(2 * DP * (cp + 4), Gn * nob * 16);
    return std::make_pair(region0, static_cast<size_t>(region0 + 2 * KP * (cp + 4) + 2 * DP * KP + cp) * elem);
  });
}

constexpr const char* kOp = "ld_ext::pixel_cluster_similarity (CUDA)";
constexpr const char* kOpB = "ld_ext::pixel_cluster_similarity_backward (CUDA)";

void check_inputs(const at::Tensor& e, const at::Tensor& proto, const char* op) {
  check_cuda_tensor(e, op, "embeddings");
  check_cuda_tensor(proto, op, "prototypes");
}

at::Tensor pixel_cluster_similarity_cuda(const at::Tensor& embeddings, const at::Tensor& prototypes,
                                         double temperature, bool normalize) {
  checks::pixel_cluster_similarity(kOp, embeddings, prototypes, temperature);
  check_inputs(embeddings, prototypes, kOp);
  const OpDevice dev(embeddings);
  const at::Tensor e = embeddings.contiguous();
  const at::Tensor pr = prototypes.contiguous();
  const bool per_image = pr.dim() == 3;
  const int64_t N = e.size(0), D = e.size(1), K = pr.size(-2);
  const int64_t P = e.numel() / (N * D);
  std::vector<int64_t> shape = e.sizes().vec();
  shape[1] = K;
  at::Tensor out = at::empty(shape, e.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "ld_ext_pcs_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const acc_t itau = static_cast<acc_t>(1.0 / temperature);  // finite: temperature >= 1/FLT_MAX
    const RBPlan rb = pcs_forward_plan(D, K, sizeof(acc_t), dev.device);
    if (rb.tile.cp > 0) {
      const int64_t nchunks = ceil_div(P, rb.tile.cp);
      auto kernel = env_prefetch() ? pcs_forward_rb_kernel<scalar_t, acc_t, true>
                                   : pcs_forward_rb_kernel<scalar_t, acc_t, false>;
      const int64_t T = wave_tiles(kernel, rb.bytes, N, nchunks, dev.device);
      launch(kernel, N * T, kThreads, rb.bytes, dev.stream, e.data_ptr<scalar_t>(), pr.data_ptr<scalar_t>(),
             out.data_ptr<scalar_t>(), P, T, nchunks, rb.tile, per_image, normalize, itau);
      return;
    }
    const TilePlan plan =
        plan_tile(K * (D + 1), (D + 1) + (K + 1) + 3, sizeof(acc_t), dev.device, kOp, "K * D (prototypes)");
    const Tile tl = make_tile(plan.pixels, D, K);
    const int64_t nchunks = ceil_div(P, tl.cp);
    auto kernel = pcs_forward_kernel<scalar_t, acc_t>;
    const int64_t T = wave_tiles(kernel, plan.bytes, N, nchunks, dev.device);
    launch(kernel, N * T, kThreads, plan.bytes, dev.stream, e.data_ptr<scalar_t>(), pr.data_ptr<scalar_t>(),
           out.data_ptr<scalar_t>(), D, K, P, T, nchunks, tl, per_image, normalize, itau);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> pixel_cluster_similarity_backward_cuda(const at::Tensor& grad_out,
                                                                          const at::Tensor& embeddings,
                                                                          const at::Tensor& prototypes,
                                                                          const at::Tensor& out, double temperature,
                                                                          bool normalize) {
  checks::pixel_cluster_similarity_backward(kOpB, grad_out, embeddings, prototypes, out, temperature);
  check_inputs(embeddings, prototypes, kOpB);
  const OpDevice dev(embeddings);
  const at::Tensor e = embeddings.contiguous();
  const at::Tensor pr = prototypes.contiguous();
  const bool per_image = pr.dim() == 3;
  const int64_t N = e.size(0), D = e.size(1), K = pr.size(-2);
  const int64_t P = e.numel() / (N * D);
  TORCH_CHECK(grad_out.numel() == N * K * P && out.numel() == N * K * P, kOpB,
              ": grad_out and out must have N * K * P elements");
  const at::Tensor g = grad_out.to(e.device(), e.scalar_type()).contiguous();
  at::Tensor grad_e = at::empty(e.sizes(), e.options());
  at::Tensor grad_p;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "ld_ext_pcs_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const acc_t itau = static_cast<acc_t>(1.0 / temperature);  // finite: temperature >= 1/FLT_MAX
    const TilePlan plan = plan_tile(K * (D + 1) + K * D, 2 * (D + 1) + 2 * (K + 1) + 5, sizeof(acc_t), dev.device,
                                    kOpB, "K * D (prototypes)");
    const Tile tl = make_tile(plan.pixels, D, K);
    const auto acc_opts = e.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const RBPlan rb = pcs_backward_plan(D, K, sizeof(acc_t), dev.device);
    int64_t T = 0;
    at::Tensor part;
    if (rb.tile.cp > 0) {
      const int64_t nchunks = ceil_div(P, rb.tile.cp);
      auto kernel = env_prefetch() ? pcs_backward_rb_kernel<scalar_t, acc_t, true>
                                   : pcs_backward_rb_kernel<scalar_t, acc_t, false>;
      T = wave_tiles(kernel, rb.bytes, N, nchunks, dev.device);
      part = at::empty({N * T * K * D}, acc_opts);
      launch(kernel, N * T, kThreads, rb.bytes, dev.stream, g.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(),
             pr.data_ptr<scalar_t>(), grad_e.data_ptr<scalar_t>(), part.data_ptr<acc_t>(), P, T, nchunks, rb.tile,
             rb.region0, per_image, normalize, itau);
    } else {
      const int64_t nchunks = ceil_div(P, tl.cp);
      auto kernel = pcs_backward_kernel<scalar_t, acc_t>;
      T = wave_tiles(kernel, plan.bytes, N, nchunks, dev.device);
      part = at::empty({N * T * K * D}, acc_opts);
      launch(kernel, N * T, kThreads, plan.bytes, dev.stream, g.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(),
             pr.data_ptr<scalar_t>(), grad_e.data_ptr<scalar_t>(), part.data_ptr<acc_t>(), D, K, P, T, nchunks, tl,
             per_image, normalize, itau);
    }
    at::Tensor gp = at::empty(pr.sizes(), acc_opts);
    if (per_image) {
      launch_reduce_partials<acc_t>(part.data_ptr<acc_t>(), gp.data_ptr<acc_t>(), N, T, K * D, dev.stream);
    } else {
      launch_reduce_partials<acc_t>(part.data_ptr<acc_t>(), gp.data_ptr<acc_t>(), 1, N * T, K * D, dev.stream);
    }
    grad_p = gp.to(pr.scalar_type());
  });
  return {grad_e, grad_p};
}

}  // namespace

TORCH_LIBRARY_IMPL(ld_ext, LD_CUDA_DISPATCH_KEY, m) {
  m.impl("pixel_cluster_similarity", [](const at::Tensor& e, const at::Tensor& p, const c10::Scalar& t, bool normalize) {
    return pixel_cluster_similarity_cuda(e, p, ld_ext::checks::temperature_arg("ld_ext::pixel_cluster_similarity", t), normalize);
  });
  m.impl("pixel_cluster_similarity_backward", [](const at::Tensor& g, const at::Tensor& e, const at::Tensor& p, const at::Tensor& out, const c10::Scalar& t, bool normalize) {
    return pixel_cluster_similarity_backward_cuda(g, e, p, out, ld_ext::checks::temperature_arg("ld_ext::pixel_cluster_similarity_backward", t), normalize);
  });
}

}  // namespace cuda
}  // namespace ld_ext
