// CUDA kernels of ld_ext::region_features and ld_ext::region_features_backward.
//
// Forward, for image n: r~[k,d] = (1/P) sum_p a[k,p] e[d,p]; feats = r~ / (||r~|| + 1e-10);
// rnorm = ||r~||; entropy = mean_{n,k,p} h(a[k,p]) (binary entropy, log2). e is z or z/(||z||+eps)
// (normalize); a is s, sigmoid-L1 of s or softmax of s (mode). See docs/method.md sections 2-4.
//
// Layout of the work: each block owns one image n and a fixed, strided set of pixel chunks
// ("tiles" of up to 128 pixels). A chunk of e and s is read once from global memory into shared
// memory (as the accumulation type), normalised there, and multiplied into the block's K x D
// partial sums, which also live in shared memory. Each block writes its partial sums to a
// buffer (N, T, K, D); a second kernel adds the T partials of each (n, k, d) in a fixed order and
// normalises the rows. No atomics: the same input gives bitwise the same output on a given device.
// Nothing of size N*K*D*P is ever formed; backward recomputes e and a per chunk from the inputs.
//
// Two implementations of that plan: the register-blocked kernels (rf_*_rb_kernel, the default
// where K x D allows, see rb_forward_plan) and the general kernels (any K x D that fits in shared
// memory). They compute the same function; tests/test_cuda.py checks that they agree.
#include "common.cuh"

namespace ld_ext {
namespace cuda {
namespace {

constexpr double kLn2 = 0.69314718055994530942;

// Phase 1 of every chunk: raw loads, coalesced along the pixels. E[j*ds + d] = z[d, p0 + j];
// A[j*ks + k] = s[k, p0 + j] (sigmoid mode: sigmoid(s) + 1e-9, with sigmoid(s) also kept in SG
// when SG is given). Pixels past the end (j >= np) are loaded as zeros.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_chunk(const scalar_t* __restrict__ e_n, const scalar_t* __restrict__ s_n,
                                           int64_t P, int64_t p0, int np, const Tile& tl,
                                           int mode, acc_t* E, acc_t* A, acc_t* SG) {
  const int cp = tl.cp;
  for (int i = threadIdx.x; i < tl.D * cp; i += blockDim.x) {
    const int d = i / cp;
    const int j = i - d * cp;
    E[j * tl.ds + d] = j < np ? static_cast<acc_t>(e_n[d * P + p0 + j]) : acc_t(0);
  }
  for (int i = threadIdx.x; i < tl.K * cp; i += blockDim.x) {
    const int k = i / cp;
    const int j = i - k * cp;
    acc_t v = j < np ? static_cast<acc_t>(s_n[k * P + p0 + j]) : acc_t(0);
    if (mode == kSigmoid) {
      const acc_t sg = dev_sigmoid(v);
      if (SG != nullptr) SG[j * tl.ks + k] = sg;
      v = sg + static_cast<acc_t>(kAssignEps);
    }
    A[j * tl.ks + k] = v;
  }
}

// Phase 2: per-pixel scalars, one thread per pixel. M = ||z||; for sigmoid U = sum_k u; for
// softmax MX = max_k s and U = sum_k exp(s - MX).
template <typename acc_t>
__device__ __forceinline__ void pixel_scalars(const Tile& tl, bool normalize, int mode,
                                              const acc_t* E, const acc_t* A, acc_t* M, acc_t* U, acc_t* MX) {
  const int j = threadIdx.x;
  if (j >= tl.cp) return;
  if (normalize) {
    M[j] = dev_norm(E + j * tl.ds, tl.D, 1);
  }
  if (mode == kSigmoid) {
    acc_t u = 0;
    for (int k = 0; k < tl.K; ++k) u += A[j * tl.ks + k];
    U[j] = u;
  } else if (mode == kSoftmax) {
    softmax_stats<acc_t>(A + j * tl.ks, tl.K, MX + j, U + j);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t binary_entropy(acc_t a) {
  const acc_t eps = static_cast<acc_t>(kEntropyEps);
  return -a * dev_log2(a + eps) - (acc_t(1) - a) * dev_log2(acc_t(1) - a + eps);
}

template <typename acc_t>
__device__ __forceinline__ acc_t binary_entropy_grad(acc_t a) {
  const acc_t eps = static_cast<acc_t>(kEntropyEps);
  const acc_t ln2 = static_cast<acc_t>(kLn2);
  const acc_t b = acc_t(1) - a;
  return -dev_log2(a + eps) - a / ((a + eps) * ln2) + dev_log2(b + eps) + b / ((b + eps) * ln2);
}

// Phase 3: element-wise normalisation of the chunk (all threads). Returns this thread's share of
// the chunk's entropy sum when `entropy` is set.
template <typename acc_t>
__device__ __forceinline__ acc_t normalize_chunk(int np, const Tile& tl, bool normalize,
                                                 int mode, bool entropy, acc_t* E, acc_t* A, const acc_t* M,
                                                 const acc_t* U, const acc_t* MX) {
  const int cp = tl.cp;
  const acc_t eps = static_cast<acc_t>(kNormEps);
  if (normalize) {
    for (int i = threadIdx.x; i < tl.D * cp; i += blockDim.x) {
      const int d = i / cp;
      const int j = i - d * cp;
      E[j * tl.ds + d] = E[j * tl.ds + d] / (M[j] + eps);
    }
  }
  acc_t h = 0;
  for (int i = threadIdx.x; i < tl.K * cp; i += blockDim.x) {
    const int k = i / cp;
    const int j = i - k * cp;
    acc_t a = A[j * tl.ks + k];
    if (mode == kSigmoid) {
      a = a / U[j];
    } else if (mode == kSoftmax) {
      a = dev_exp(a - MX[j]) / U[j];
    }
    if (j >= np) a = 0;
    A[j * tl.ks + k] = a;
    if (entropy && j < np) h += binary_entropy(a);
  }
  return h;
}

// ------------------------------------------------------------------------------------ forward

// Grid: N * T blocks; block b handles image n = b / T and chunks c = t, t + T, ... (t = b % T).
// part[b * K*D + k*D + d] = sum over its pixels of a[k,p] e[d,p]; ent_part[b] = sum of h(a).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) rf_forward_partial_kernel(
    const scalar_t* __restrict__ emb, const scalar_t* __restrict__ asg, acc_t* __restrict__ part,
    acc_t* __restrict__ ent_part, int64_t D, int64_t K, int64_t P, int64_t T, int64_t nchunks, Tile tl,
    bool normalize, int mode, bool entropy) {
  LD_CUDA_DYNAMIC_SMEM(acc_t, sm);
  const int KD = tl.K * tl.D;
  const int cp = tl.cp;
  acc_t* accs = sm;
  acc_t* E = accs + KD;
  acc_t* A = E + cp * tl.ds;
  acc_t* M = A + cp * tl.ks;
  acc_t* U = M + cp;
  acc_t* MX = U + cp;
  acc_t* red = MX + cp;

  const int64_t b = blockIdx.x;
  const int64_t n = b / T;
  const int64_t t = b - n * T;
  const scalar_t* e_n = emb + n * D * P;
  const scalar_t* s_n = asg + n * K * P;

  for (int i = threadIdx.x; i < KD; i += blockDim.x) accs[i] = 0;
  acc_t h = 0;

  for (int64_t c = t; c < nchunks; c += T) {
    const int64_t p0 = c * cp;
    const int np = static_cast<int>(min(static_cast<int64_t>(cp), P - p0));
    __syncthreads();  // the previous chunk is fully consumed
    load_chunk<scalar_t, acc_t>(e_n, s_n, P, p0, np, tl, mode, E, A, nullptr);
    __syncthreads();
    pixel_scalars<acc_t>(tl, normalize, mode, E, A, M, U, MX);
    __syncthreads();
    h += normalize_chunk<acc_t>(np, tl, normalize, mode, entropy, E, A, M, U, MX);
    __syncthreads();
    // Each (k, d) partial sum belongs to one thread: d runs fastest across the warp, so E is read
    // at consecutive addresses and A is a broadcast.
    for (int i = threadIdx.x; i < KD; i += blockDim.x) {
      const int k = i / tl.D;
      const int d = i - k * tl.D;
      acc_t s = accs[i];
      for (int j = 0; j < np; ++j) s += A[j * tl.ks + k] * E[j * tl.ds + d];
      accs[i] = s;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < KD; i += blockDim.x) part[b * KD + i] = accs[i];
  if (entropy) {
    h = block_sum(h, red);
    if (threadIdx.x == 0) ent_part[b] = h;
  }
}

// One block per (n, k): adds the T partials of each d in order, divides by P, normalises the row.
// feats/rnorm are of the accumulation type (the op's output type for every input dtype).
template <typename acc_t>
__global__ void __launch_bounds__(kSmallThreads) rf_forward_finalize_kernel(const acc_t* __restrict__ part,
                                                                           acc_t* __restrict__ feats,
                                                                           acc_t* __restrict__ rnorm, int64_t K,
                                                                           int64_t D, int64_t T, int64_t P) {
  __shared__ acc_t buf[kSmallThreads];
  const int64_t nk = blockIdx.x;
  const int64_t n = nk / K;
  const int64_t k = nk - n * K;
  const int64_t KD = K * D;
  const acc_t* base = part + n * T * KD + k * D;
  acc_t sq = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t s = 0;
    for (int64_t t = 0; t < T; ++t) s += base[t * KD + d];
    const acc_t r = s / static_cast<acc_t>(P);
    feats[nk * D + d] = r;
    sq += r * r;
  }
  const acc_t nrm = dev_sqrt(block_sum(sq, buf));
  const acc_t den = nrm + static_cast<acc_t>(kNormEps);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) feats[nk * D + d] = feats[nk * D + d] / den;
  if (threadIdx.x == 0) rnorm[nk] = nrm;
}

// ------------------------------------------------------------------------------------ backward

// One block per (n, k): G = dL/dr~ / P with dL/dr~ = g/(n+eps) - r~ (r~.g) / (n (n+eps)^2),
// r~ = feats (n + eps); the second term is 0 when n == 0.
template <typename acc_t>
__global__ void __launch_bounds__(kSmallThreads) rf_backward_prep_kernel(const acc_t* __restrict__ grad_feats,
                                                                        const acc_t* __restrict__ feats,
                                                                        const acc_t* __restrict__ rnorm,
                                                                        acc_t* __restrict__ G, int64_t D,
                                                                        int64_t P) {
  __shared__ acc_t buf[kSmallThreads];
  const int64_t nk = blockIdx.x;
  const acc_t nrm = rnorm[nk];
  const acc_t den = nrm + static_cast<acc_t>(kNormEps);
  acc_t dot = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) dot += feats[nk * D + d] * den * grad_feats[nk * D + d];
  dot = block_sum(dot, buf);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const acc_t rt = feats[nk * D + d] * den;
    acc_t v = grad_feats[nk * D + d] / den;
    if (nrm > acc_t(0)) v -= rt * dot / (nrm * den * den);
    G[nk * D + d] = v / static_cast<acc_t>(P);
  }
}

// Grid: N * T blocks, block b handles image n = b / T and chunks t, t + T, ... Per chunk it
// recomputes e and a, forms g_a = G e (+ entropy term) and g_e = G^T a, takes them back through
// the two normalisations and writes grad_z and grad_s for its pixels (no reduction across blocks).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) rf_backward_kernel(
    const scalar_t* __restrict__ emb, const scalar_t* __restrict__ asg, const acc_t* __restrict__ Gg,
    const acc_t* __restrict__ grad_ent, scalar_t* __restrict__ grad_emb, scalar_t* __restrict__ grad_asg,
    int64_t D, int64_t K, int64_t P, int64_t T, int64_t nchunks, Tile tl, bool normalize, int mode, bool entropy,
    acc_t ent_scale) {
  LD_CUDA_DYNAMIC_SMEM(acc_t, sm);
  const int cp = tl.cp;
  acc_t* Gs = sm;                 // K * ds
  acc_t* E = Gs + K * tl.ds;      // cp * ds
  acc_t* GE = E + cp * tl.ds;     // cp * ds
  acc_t* A = GE + cp * tl.ds;     // cp * ks
  acc_t* GA = A + cp * tl.ks;     // cp * ks
  acc_t* SG = GA + cp * tl.ks;    // cp * ks
  acc_t* M = SG + cp * tl.ks;     // cp
  acc_t* U = M + cp;              // cp
  acc_t* MX = U + cp;             // cp
  acc_t* DA = MX + cp;            // cp
  acc_t* DE = DA + cp;            // cp

  const int64_t b = blockIdx.x;
  const int64_t n = b / T;
  const int64_t t = b - n * T;
  const scalar_t* e_n = emb + n * D * P;
  const scalar_t* s_n = asg + n * K * P;
  scalar_t* ge_n = grad_emb + n * D * P;
  scalar_t* gs_n = grad_asg + n * K * P;

  for (int i = threadIdx.x; i < tl.K * tl.D; i += blockDim.x) {
    const int k = i / tl.D;
    const int d = i - k * tl.D;
    Gs[k * tl.ds + d] = Gg[n * K * D + i];
  }
  const acc_t gent = entropy ? grad_ent[0] * ent_scale : acc_t(0);

  for (int64_t c = t; c < nchunks; c += T) {
    const int64_t p0 = c * cp;
    const int np = static_cast<int>(min(static_cast<int64_t>(cp), P - p0));
    __syncthreads();
    load_chunk<scalar_t, acc_t>(e_n, s_n, P, p0, np, tl, mode, E, A, SG);
    __syncthreads();
    pixel_scalars<acc_t>(tl, normalize, mode, E, A, M, U, MX);
    __syncthreads();
    normalize_chunk<acc_t>(np, tl, normalize, mode, false, E, A, M, U, MX);
    __syncthreads();
    // g_a[j,k] = sum_d G[k,d] e[d,j] (+ entropy), k fastest; g_e[j,d] = sum_k G[k,d] a[k,j], d fastest.
    for (int i = threadIdx.x; i < tl.K * cp; i += blockDim.x) {
      const int j = i / tl.K;
      const int k = i - j * tl.K;
      acc_t s = 0;
      for (int d = 0; d < tl.D; ++d) s += Gs[k * tl.ds + d] * E[j * tl.ds + d];
      if (entropy && j < np) s += gent * binary_entropy_grad(A[j * tl.ks + k]);
      GA[j * tl.ks + k] = s;
    }
    for (int i = threadIdx.x; i < tl.D * cp; i += blockDim.x) {
      const int j = i / tl.D;
      const int d = i - j * tl.D;
      acc_t s = 0;
      for (int k = 0; k < tl.K; ++k) s += Gs[k * tl.ds + d] * A[j * tl.ks + k];
      GE[j * tl.ds + d] = s;
    }
    __syncthreads();
    if (threadIdx.x < cp) {
      const int j = threadIdx.x;
      if (mode != kProbs) {
        acc_t s = 0;
        for (int k = 0; k < tl.K; ++k) s += GA[j * tl.ks + k] * A[j * tl.ks + k];
        DA[j] = s;
      }
      if (normalize) {
        acc_t s = 0;
        for (int d = 0; d < tl.D; ++d) s += E[j * tl.ds + d] * GE[j * tl.ds + d];
        DE[j] = s;
      }
    }
    __syncthreads();
    store_grad_emb<scalar_t, acc_t>(ge_n, P, p0, np, tl, normalize, GE, E, M, DE);
    for (int i = threadIdx.x; i < tl.K * cp; i += blockDim.x) {
      const int k = i / cp;
      const int j = i - k * cp;
      if (j >= np) continue;
      const acc_t g = GA[j * tl.ks + k];
      acc_t v;
      if (mode == kSigmoid) {
        const acc_t sg = SG[j * tl.ks + k];
        v = sg * (acc_t(1) - sg) * (g - DA[j]) / U[j];
      } else if (mode == kSoftmax) {
        v = A[j * tl.ks + k] * (g - DA[j]);
      } else {
        v = g;
      }
      gs_n[k * P + p0 + j] = static_cast<scalar_t>(v);
    }
  }
}

// ------------------------------------------------------------------ register-blocked fast path
// Used when the 4x4 output blocks of the K x D product fit one per thread ((KP/4) * (DP/4) <= 256)
// and the tiles fit in shared memory; the kernels above are the general fallback. Same math, same
// determinism (fixed per-thread order, groups reduced in a fixed order, no atomics). Tiles hold
// channels as rows of pixels (coalesced global loads, conflict-free per-pixel loops); products
// read 4 pixels x 4 rows per pair of 16-byte loads and do 16 FMAs with them.

// Registers per thread that stage the next chunk (StagedChunk): (DP + KP) * cp <= kStage * kThreads.
// The forward holds z and s rows of 128 pixels for D = 32, K = 16.
constexpr int kStageFwd = 24;
constexpr int kStageBwd = 16;

// Per-pixel part shared by forward and backward (thread j < cp): the norm of z (M[j], and
// IM[j] = 1/(m + eps), 1 without normalize) and the assignment normalisation of column j in place
// (A[k*cs + j] = a[k, j]; 0 for pixels >= np); U[j] = sum_k (sigmoid(s) + 1e-9) in sigmoid mode.
// With `entropy`, returns sum_k h(a[k, j]).
template <typename acc_t>
__device__ __forceinline__ acc_t rb_pixel_prep(int j, int np, const RBTile& tl, bool normalize, int mode,
                                               bool entropy, const acc_t* E, acc_t* A, acc_t* M, acc_t* IM,
                                               acc_t* U) {
  const int cs = tl.cs;
  acc_t m = 0;
  const acc_t im = normalize ? column_inv_norm(E, j, tl, &m) : acc_t(1);
  if (M != nullptr) M[j] = m;
  IM[j] = im;
  acc_t u = 1, mx = 0;
  if (mode == kSigmoid) {
    u = 0;
#pragma unroll 4
    for (int k = 0; k < tl.K; ++k) u += A[k * cs + j];
  } else if (mode == kSoftmax) {
    mx = neg_inf<acc_t>();
#pragma unroll 4
    for (int k = 0; k < tl.K; ++k) mx = dev_max(mx, A[k * cs + j]);
    u = 0;
#pragma unroll 4
    for (int k = 0; k < tl.K; ++k) u += dev_exp(A[k * cs + j] - mx);
  }
  if (U != nullptr) U[j] = u;
  const acc_t iu = acc_t(1) / u;  // one division per pixel, then products
  acc_t h = 0;
#pragma unroll 4
  for (int k = 0; k < tl.K; ++k) {
    acc_t a = A[k * cs + j];
    if (mode == kSigmoid) {
      a = a * iu;
    } else if (mode == kSoftmax) {
      a = dev_exp(a - mx) * iu;
    }
    if (j >= np) a = 0;
    if (entropy && j < np) h += binary_entropy(a);
    A[k * cs + j] = a;
  }
  return h;
}

// Forward. Grid: N * T blocks, block b: image n = b / T, chunks t, t + T, ... (t = b % T).
// Thread tid: output block ob = tid % nob (rows k = kb + KQ r, columns d = db + DQ c), pixel
// group g = tid / nob < G (pixel quads g, g + G, ...). part as in rf_forward_partial_kernel.
template <typename scalar_t, typename acc_t, bool prefetch>
__global__ void __launch_bounds__(kThreads, 2) rf_forward_rb_kernel(
    const scalar_t* __restrict__ emb, const scalar_t* __restrict__ asg, acc_t* __restrict__ part,
    acc_t* __restrict__ ent_part, int64_t P, int64_t T, int64_t nchunks, RBTile tl, int region0, bool normalize,
    int mode, bool entropy) {
  LD_CUDA_DYNAMIC_SMEM(acc_t, sm);
  const int cs = tl.cs, cp = tl.cp;
  acc_t* E = sm;                  // DP * cs
  acc_t* A = E + tl.DP * cs;      // KP * cs
  acc_t* RED = sm;                // G * nob * 16, after the chunk loop (aliases E and A)
  acc_t* IM = sm + region0;       // cp
  acc_t* U = IM + cp;             // cp
  acc_t* red = U + cp;            // kThreads

  const int D = tl.D, K = tl.K;
  const int nob = tl.KQ * tl.DQ;
  const int G = max(1, static_cast<int>(blockDim.x) / nob);
  const int tid = threadIdx.x;
  const int ob = tid % nob, g = tid / nob;
  const int kb = ob / tl.DQ, db = ob - kb * tl.DQ;
  const int nq = cp / 4;

  const int64_t b = blockIdx.x;
  const int64_t n = b / T;
  const int64_t t = b - n * T;
  const scalar_t* e_n = emb + n * static_cast<int64_t>(D) * P;
  const scalar_t* s_n = asg + n * static_cast<int64_t>(K) * P;

  acc_t acc[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[r][c] = 0;
  acc_t h = 0;

  StagedChunk<scalar_t, kStageFwd> st;
  staged_chunk_loop<prefetch>(
      t, T, nchunks, cp, P, [&](int64_t c) { st.load_chunk(c, e_n, D, tl.DP, s_n, K, tl.KP, P, tl); },
      [&](int np) { st.template store<acc_t>(E, tl.DP, A, K, tl.KP, np, tl, mode, nullptr); },
      [&](int64_t /*p0*/, int np) {
        if (tid < cp) {
          h += rb_pixel_prep<acc_t>(tid, np, tl, normalize, mode, entropy, E, A, nullptr, IM, U);
          // Fold 1/(||z|| + eps) into the assignments: sum_j a[k,j] (z[d,j] im_j).
          if (normalize) {
            const acc_t im = IM[tid];
#pragma unroll 4
            for (int k = 0; k < K; ++k) A[k * cs + tid] *= im;
          }
        }
        __syncthreads();
        if (g < G) {
          for (int q = g; q < nq; q += G) {
            accumulate_quad44(acc, A + kb * cs + 4 * q, tl.KQ * cs, E + db * cs + 4 * q, tl.DQ * cs);
          }
        }
      });
  __syncthreads();
  reduce_groups44(acc, RED, tl, G, part + b * K * D);
  if (entropy) {
    h = block_sum(h, red);
    if (tid == 0) ent_part[b] = h;
  }
}

// Backward. Grid as the forward. Per chunk: load, per-pixel prep, then the two products
// GA[k, j] = sum_d G[k, d] z[d, j] (4 rows k x 4 pixels per unit) and GE[d, j] = sum_k G[k, d] a[k, j]
// (4 rows d x 4 pixels), then per pixel (threads j < cp: assignments, cp <= tid < 2 cp: embeddings)
// the two normalisations' backward and the coalesced stores.
template <typename scalar_t, typename acc_t, bool prefetch>
__global__ void __launch_bounds__(kThreads, 2) rf_backward_rb_kernel(
    const scalar_t* __restrict__ emb, const scalar_t* __restrict__ asg, const acc_t* __restrict__ Gg,
    const acc_t* __restrict__ grad_ent, scalar_t* __restrict__ grad_emb, scalar_t* __restrict__ grad_asg,
    int64_t P, int64_t T, int64_t nchunks, RBTile tl, bool normalize, int mode, bool entropy, acc_t ent_scale) {
  LD_CUDA_DYNAMIC_SMEM(acc_t, sm);
  const int cs = tl.cs, cp = tl.cp;
  const int D = tl.D, K = tl.K, DP = tl.DP, KP = tl.KP, DQ = tl.DQ, KQ = tl.KQ;
  acc_t* Z = sm;                  // DP * cs
  acc_t* GE = Z + DP * cs;        // DP * cs
  acc_t* A = GE + DP * cs;        // KP * cs
  acc_t* GA = A + KP * cs;        // KP * cs
  acc_t* SG = GA + KP * cs;       // KP * cs
  acc_t* Gk = SG + KP * cs;       // KP * DP: Gk[k*DP + 4*db + c] = G[k, db + DQ c]
  acc_t* Gd = Gk + KP * DP;       // DP * KP: Gd[d*KP + 4*kb + r] = G[kb + KQ r, d]
  acc_t* M = Gd + DP * KP;        // cp
  acc_t* IM = M + cp;             // cp
  acc_t* U = IM + cp;             // cp

  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  const int64_t n = b / T;
  const int64_t t = b - n * T;
  const scalar_t* e_n = emb + n * static_cast<int64_t>(D) * P;
  const scalar_t* s_n = asg + n * static_cast<int64_t>(K) * P;
  scalar_t* ge_n = grad_emb + n * static_cast<int64_t>(D) * P;
  scalar_t* gs_n = grad_asg + n * static_cast<int64_t>(K) * P;

  for (int i = tid; i < KP * DP; i += blockDim.x) {
    const int k = i / DP;
    const int d = i - k * DP;
    const acc_t v = (k < K && d < D) ? Gg[n * K * D + k * D + d] : acc_t(0);
    Gk[k * DP + 4 * (d % DQ) + d / DQ] = v;
    Gd[d * KP + 4 * (k % KQ) + k / KQ] = v;
  }
  const acc_t gent = entropy ? grad_ent[0] * ent_scale : acc_t(0);
  const int nq = cp / 4;
  const int nga = KQ * nq, nge = DQ * nq;

  StagedChunk<scalar_t, kStageBwd> st;  // as in the forward
  staged_chunk_loop<prefetch>(
      t, T, nchunks, cp, P, [&](int64_t c) { st.load_chunk(c, e_n, D, DP, s_n, K, KP, P, tl); },
      [&](int np) { st.template store<acc_t>(Z, DP, A, K, KP, np, tl, mode, mode == kSigmoid ? SG : nullptr); },
      [&](int64_t p0, int np) {
        if (tid < cp) rb_pixel_prep<acc_t>(tid, np, tl, normalize, mode, false, Z, A, M, IM, U);
        __syncthreads();
        for (int u = tid; u < nga + nge; u += blockDim.x) {
          if (u < nga) {
            const int kb = u % KQ, q = u / KQ;
            product44_store(Gd + 4 * kb, KP, Z + 4 * q, cs, D, GA + kb * cs + 4 * q, KQ * cs);
          } else {
            const int db = (u - nga) % DQ, q = (u - nga) / DQ;
            product44_store(Gk + 4 * db, DP, A + 4 * q, cs, K, GE + db * cs + 4 * q, DQ * cs);
          }
        }
        __syncthreads();
        if (tid < cp) {
          // Assignments: g_a = im * GA (+ entropy), then the normalisation's backward.
          const int j = tid;
          if (j < np) {
            const acc_t im = IM[j];
            acc_t da = 0;
#pragma unroll 4
            for (int k = 0; k < K; ++k) {
              const acc_t a = A[k * cs + j];
              acc_t ga = GA[k * cs + j] * im;
              if (entropy) ga += gent * binary_entropy_grad(a);
              GA[k * cs + j] = ga;
              da += ga * a;
            }
            const acc_t iu = acc_t(1) / U[j];
#pragma unroll 4
            for (int k = 0; k < K; ++k) {
              const acc_t ga = GA[k * cs + j];
              acc_t v;
              if (mode == kSigmoid) {
                const acc_t sg = SG[k * cs + j];
                v = sg * (acc_t(1) - sg) * (ga - da) * iu;
              } else if (mode == kSoftmax) {
                v = A[k * cs + j] * (ga - da);
              } else {
                v = ga;
              }
              gs_n[k * P + p0 + j] = static_cast<scalar_t>(v);
            }
          }
        } else if (tid < 2 * cp) {
          // Embeddings: with normalize, e = z im and dL/dz = (g_e - z (e . g_e) / m) im (the projection
          // term is 0 when m == 0); without, dL/dz = g_e.
          const int j = tid - cp;
          if (j < np) {
            if (normalize) {
              const acc_t im = IM[j];
              const acc_t m = M[j];
              acc_t s = 0;
#pragma unroll 4
              for (int d = 0; d < D; ++d) s += Z[d * cs + j] * GE[d * cs + j];
              // projection coefficient (e . g_e) / m, 0 when m == 0
              const acc_t c = m > acc_t(0) ? s * im / m : acc_t(0);
#pragma unroll 4
              for (int d = 0; d < D; ++d) {
                const acc_t v = GE[d * cs + j] - Z[d * cs + j] * c;
                ge_n[d * P + p0 + j] = static_cast<scalar_t>(v * im);
              }
            } else {
#pragma unroll 4
              for (int d = 0; d < D; ++d) ge_n[d * P + p0 + j] = static_cast<scalar_t>(GE[d * cs + j]);
            }
          }
        }
      });
}

// ------------------------------------------------------------------------------------ host side

constexpr const char* kOp = "ld_ext::region_features (CUDA)";
constexpr const char* kOpB = "ld_ext::region_features_backward (CUDA)";

// Plans of the register-blocked kernels: the tile and its shared-memory bytes; tile.cp == 0 when
// the fast path does not apply (more than 256 output blocks, or no chunk fits) and the general
// kernels run instead. LD_EXT_CUDA_RB_FWD_CP / LD_EXT_CUDA_RB_BWD_CP cap the chunk (tuning knob;
// 0 forces the general kernels).
RBPlan rb_forward_plan(int64_t D, int64_t K, size_t elem, int device) {
  const int max_cp = env_cap("LD_EXT_CUDA_RB_FWD_CP", 128);
  const int64_t DP = (D + 3) / 4 * 4, KP = (K + 3) / 4 * 4;
  const int64_t nob = (DP / 4) * (KP / 4);
  if (nob > kThreads) return rb_none();
  const int64_t G = std::max<int64_t>(1, kThreads / nob);
  return rb_search(D, K, max_cp, DP + KP, kStageFwd, device, [&](int cp) {
    const int64_t region0 = std::max<int64_t>((DP + KP) * (cp + 4), G * nob * 16);
    return std::make_pair(region0, static_cast<size_t>(region0 + 2 * cp + kThreads) * elem);
  });
}

RBPlan rb_backward_plan(int64_t D, int64_t K, size_t elem, int device) {
  const int max_cp = env_cap("LD_EXT_CUDA_RB_BWD_CP", 64);
  const int64_t DP = (D + 3) / 4 * 4, KP = (K + 3) / 4 * 4;
  if ((DP / 4) * (KP / 4) > kThreads) return rb_none();
  return rb_search(D, K, max_cp, DP + KP, kStageBwd, device, [&](int cp) {
    return std::make_pair(int64_t{0}, static_cast<size_t>((2 * DP + 3 * KP) * (cp + 4) + 2 * KP * DP + 3 * cp) * elem);
  });
}

void check_inputs(const at::Tensor& e, const at::Tensor& a, const char* op) {
  check_cuda_tensor(e, op, "embeddings");
  check_cuda_tensor(a, op, "assignments");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> region_features_cuda(const at::Tensor& embeddings,
                                                                    const at::Tensor& assignments, bool normalize,
                                                                    int64_t mode, bool entropy) {
  checks::region_features(kOp, embeddings, assignments, mode);
  check_inputs(embeddings, assignments, kOp);
  const OpDevice dev(embeddings);
  const at::Tensor e = embeddings.contiguous();
  const at::Tensor a = assignments.contiguous();
  const int64_t N = e.size(0), D = e.size(1), K = a.size(1);
  const int64_t P = e.numel() / (N * D);
  const auto out_opts = e.options().dtype(out_type(e.scalar_type()));
  at::Tensor feats = at::empty({N, K, D}, out_opts);
  at::Tensor rnorm = at::empty({N, K}, out_opts);
  at::Tensor ent = at::zeros({}, out_opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "ld_ext_region_features_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const auto acc_opts = e.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const int imode = static_cast<int>(mode);
    const RBPlan rb = rb_forward_plan(D, K, sizeof(acc_t), dev.device);
    int64_t T = 0;
    at::Tensor part, ent_part;
    if (rb.tile.cp > 0) {
      const int64_t nchunks = ceil_div(P, rb.tile.cp);
      auto kernel = env_prefetch() ? rf_forward_rb_kernel<scalar_t, acc_t, true>
                                   : rf_forward_rb_kernel<scalar_t, acc_t, false>;
      T = wave_tiles(kernel, rb.bytes, N, nchunks, dev.device);
      part = at::empty({N * T * K * D}, acc_opts);
      ent_part = at::empty({entropy ? N * T : 1}, acc_opts);
      launch(kernel, N * T, kThreads, rb.bytes, dev.stream, e.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
             part.data_ptr<acc_t>(), ent_part.data_ptr<acc_t>(), P, T, nchunks, rb.tile, rb.region0, normalize,
             imode, entropy);
    } else {
      const TilePlan plan = plan_tile(K * D + kThreads, (D + 1) + (K + 1) + 3, sizeof(acc_t), dev.device, kOp,
                                      "K * D (clusters times channels)");
      const Tile tl = make_tile(plan.pixels, D, K);
      const int64_t nchunks = ceil_div(P, tl.cp);
      auto kernel = rf_forward_partial_kernel<scalar_t, acc_t>;
      T = wave_tiles(kernel, plan.bytes, N, nchunks, dev.device);
      part = at::empty({N * T * K * D}, acc_opts);
      ent_part = at::empty({entropy ? N * T : 1}, acc_opts);
      launch(kernel, N * T, kThreads, plan.bytes, dev.stream, e.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
             part.data_ptr<acc_t>(), ent_part.data_ptr<acc_t>(), D, K, P, T, nchunks, tl, normalize, imode, entropy);
    }
    launch(rf_forward_finalize_kernel<acc_t>, N * K, kSmallThreads, 0, dev.stream, part.data_ptr<acc_t>(),
           feats.data_ptr<acc_t>(), rnorm.data_ptr<acc_t>(), K, D, T, P);
    if (entropy) {
      const acc_t scale = acc_t(1) / (static_cast<acc_t>(N) * static_cast<acc_t>(K) * static_cast<acc_t>(P));
      launch_sum_scalar<acc_t>(ent_part.data_ptr<acc_t>(), N * T, scale, ent.data_ptr<acc_t>(), dev.stream);
    }
  });
  return {feats, rnorm, ent};
}

std::tuple<at::Tensor, at::Tensor> region_features_backward_cuda(const at::Tensor& grad_feats,
                                                                 const at::Tensor& grad_entropy,
                                                                 const at::Tensor& embeddings,
                                                                 const at::Tensor& assignments,
                                                                 const at::Tensor& feats, const at::Tensor& rnorm,
                                                                 bool normalize, int64_t mode, bool entropy) {
  checks::region_features_backward(kOpB, grad_feats, grad_entropy, embeddings, assignments, feats, rnorm, mode);
  check_inputs(embeddings, assignments, kOpB);
  const OpDevice dev(embeddings);
  const at::Tensor e = embeddings.contiguous();
  const at::Tensor a = assignments.contiguous();
  const int64_t N = e.size(0), D = e.size(1), K = a.size(1);
  const int64_t P = e.numel() / (N * D);
  TORCH_CHECK(grad_feats.numel() == N * K * D && feats.numel() == N * K * D && rnorm.numel() == N * K, kOpB,
              ": grad_feats/feats must have N*K*D elements and rnorm N*K");
  const at::ScalarType acc_type = out_type(e.scalar_type());
  const at::Tensor gf = grad_feats.to(e.device(), acc_type).contiguous();
  const at::Tensor ft = feats.to(e.device(), acc_type).contiguous();
  const at::Tensor rn = rnorm.to(e.device(), acc_type).contiguous();
  const at::Tensor ge = grad_entropy.to(e.device(), acc_type).reshape({1}).contiguous();
  at::Tensor grad_e = at::empty(e.sizes(), e.options());
  at::Tensor grad_a = at::empty(a.sizes(), a.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "ld_ext_region_features_backward_cuda",
                                  [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const int imode = static_cast<int>(mode);
    const int64_t ds = D + 1, ks = K + 1;
    const TilePlan plan =
        plan_tile(K * ds, 2 * ds + 3 * ks + 5, sizeof(acc_t), dev.device, kOpB, "K * D (clusters times channels)");
    const Tile tl = make_tile(plan.pixels, D, K);
    at::Tensor G = at::empty({N * K * D}, gf.options());
    launch(rf_backward_prep_kernel<acc_t>, N * K, kSmallThreads, 0, dev.stream, gf.data_ptr<acc_t>(),
           ft.data_ptr<acc_t>(), rn.data_ptr<acc_t>(), G.data_ptr<acc_t>(), D, P);
    const acc_t ent_scale = acc_t(1) / (static_cast<acc_t>(N) * static_cast<acc_t>(K) * static_cast<acc_t>(P));
    const RBPlan rb = rb_backward_plan(D, K, sizeof(acc_t), dev.device);
    if (rb.tile.cp > 0) {
      const int64_t nchunks = ceil_div(P, rb.tile.cp);
      auto kernel = env_prefetch() ? rf_backward_rb_kernel<scalar_t, acc_t, true>
                                   : rf_backward_rb_kernel<scalar_t, acc_t, false>;
      const int64_t T = wave_tiles(kernel, rb.bytes, N, nchunks, dev.device);
      launch(kernel, N * T, kThreads, rb.bytes, dev.stream, e.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
             G.data_ptr<acc_t>(), ge.data_ptr<acc_t>(), grad_e.data_ptr<scalar_t>(), grad_a.data_ptr<scalar_t>(), P,
             T, nchunks, rb.tile, normalize, imode, entropy, ent_scale);
      return;
    }
    const int64_t nchunks = ceil_div(P, tl.cp);
    auto kernel = rf_backward_kernel<scalar_t, acc_t>;
    const int64_t T = wave_tiles(kernel, plan.bytes, N, nchunks, dev.device);
    launch(kernel, N * T, kThreads, plan.bytes, dev.stream, e.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
           G.data_ptr<acc_t>(), ge.data_ptr<acc_t>(), grad_e.data_ptr<scalar_t>(), grad_a.data_ptr<scalar_t>(), D, K,
           P, T, nchunks, tl, normalize, imode, entropy, ent_scale);
  });
  return {grad_e, grad_a};
}

}  // namespace

TORCH_LIBRARY_IMPL(ld_ext, LD_CUDA_DISPATCH_KEY, m) {
  m.impl("region_features", &region_features_cuda);
  m.impl("region_features_backward", &region_features_backward_cuda);
}

}  // namespace cuda
}  // namespace ld_ext
