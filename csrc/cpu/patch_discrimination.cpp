// patch_discrimination on the CPU: the patch (instance) discrimination criterion on (M, D) rows,
// forward and backward. The M x M logits and exponentials are computed in the input precision and
// every sum is kept in double (see below); the result is returned in the input dtype.
#include <type_traits>

#include "common.h"

namespace ld_ext {
namespace cpu {
namespace {

// patch_discrimination. Row i pairs with i' = (i + M/2) mod M. With s_ij = <x_i, sg(x_j)>/T, the
// shift m_i = max(max_j s_ij, log 1e-10), q_ij = exp(s_ij - m_i) (j != i),
// W_i = sum_j q_ij + exp(log 1e-10 - m_i) and p_ij = q_ij / W_i:
//   f_i = log p_ii' + sum_{j not in {i, i'}} log(1 - p_ij),   loss = -(1/M) sum_i f_i.
// The shift keeps the 1e-10 term finite: with every logit far below log 1e-10 (anti-aligned rows at
// a small T) exp(-max) would overflow and give an infinite loss and NaN gradients, while the loss
// (about -max + log 1e-10 per row) is finite. Where max >= log 1e-10 the shift is the maximum.
// Stability: log(1 - p_ij) = log(W_i - q_ij) - log W_i, where W_i - q_ij is the sum of the OTHER
// terms. For the row's largest term (q = 1) that sum is accumulated directly (no cancellation),
// so a negative that takes almost all the mass gives a finite, accurate log(1 - p) instead of
// log(0). For every other j, W_i - q_ij >= W_i / 2 (the row maximum, q = 1 >= q_ij, is among the
// other terms), so p_ij <= 1/2 and log(1 - p_ij) = log1p(-p_ij) loses nothing.
//
// Blocked path (all rows whose logits are finite): blocks of kPDRows rows; the block's logits
// against all M rows come from a register-blocked tile product in the input precision (each
// logit summed over d in order: the result does not depend on the thread count or on how rows
// fall into blocks); then per row, on a buffer of ld >= M entries (padding and the diagonal set
// to -inf): max and first arg-max (per lane, combined in lane order), the shifted exponentials
// with the arg-max entry left out of the buffer (its q is exactly 1), and the sums over the row,
// which are kept in double whatever the input precision. float inputs use fast_exp and a log1p
// built on fast_log2 (about 1 and 3 ulp; exponentials below e^-69 ~ 1e-30 are flushed to 0, which
// changes no float sum, as W_i >= 1); double inputs use double versions of the same (about 2 and
// 3 ulp, flushed below e^-700). Backward recomputes these per-row quantities and multiplies the
// block's d f / d s row by x with a second tile product.
// Scalar row path (rows with a non-finite maximum logit, e.g. inf inputs): the row is computed
// one term at a time in double. A row with a NaN logit gives NaN (loss and gradient row).

struct PDRow {
  std::vector<double> s, q;  // logits and shifted exponentials of row i (entry i unused)
  double mx = 0.0, W = 0.0, rest = 0.0;  // mx: the shift; rest = W - q[am], summed without q[am]
  int64_t am = -1;
  // W_i - q_ij, computed without cancellation
  double others(int64_t j) const { return j == am ? rest : W - q[j]; }
};

template <typename T>
void pd_row(const T* x, int64_t M, int64_t D, int64_t i, double inv_t, PDRow& row) {
  row.s.resize(M);
  row.q.resize(M);
  const T* xi = x + i * D;
  double mx = -std::numeric_limits<double>::infinity();
  int64_t am = -1;
  bool nan = false;
  for (int64_t j = 0; j < M; ++j) {
    if (j == i) continue;
    const T* xj = x + j * D;
    double acc = 0.0;
    for (int64_t d = 0; d < D; ++d) acc += static_cast<double>(xi[d]) * static_cast<double>(xj[d]);
    row.s[j] = acc * inv_t;
    nan |= row.s[j] != row.s[j];
    if (am < 0 || row.s[j] > mx) {  // first strict maximum; NaN never replaces it
      mx = row.s[j];
      am = j;
    }
  }
  if (nan || !std::isfinite(mx)) mx = nan ? std::numeric_limits<double>::quiet_NaN() : 0.0;
  const double eps = mx < kLogSoftmaxEps ? 1.0 : kSoftmaxEps * std::exp(-mx);
  if (mx < kLogSoftmaxEps) mx = kLogSoftmaxEps;  // the shift (q of the arg-max below 1)
  double rest = 0.0;
  for (int64_t j = 0; j < M; ++j) {
    if (j == i) continue;
    row.q[j] = std::exp(row.s[j] - mx);
    if (j != am) rest += row.q[j];
  }
  row.mx = mx;
  row.am = am;
  row.rest = rest + eps;
  row.W = row.rest + row.q[am];
}

// f_i on the scalar row path.
template <typename T>
double pd_row_loss(const T* x, int64_t M, int64_t D, int64_t i, double inv_t, PDRow& row) {
  pd_row<T>(x, M, D, i, inv_t, row);
  const int64_t ip = (i + M / 2) % M;
  const double logW = std::log(row.W);
  double fi = row.s[ip] - row.mx - logW;
  for (int64_t j = 0; j < M; ++j) {
    if (j == i || j == ip) continue;
    fi += std::log(row.others(j)) - logW;
  }
  return fi;
}

// d f_i / d s_ij = [j == i'] - p_ij - [j not in {i,i'}] p_ij/(1-p_ij) + p_ij R_i,
// R_i = sum_{l not in {i,i'}} p_il/(1-p_il), with p/(1-p) = q / (W - q) from the stable sum.
// Gradient row i on the scalar row path; scale = -g / M / T.
template <typename T>
void pd_row_grad(const T* x, int64_t M, int64_t D, int64_t i, double inv_t, double scale, PDRow& row,
                 std::vector<double>& odds, std::vector<double>& acc, T* gxi) {
  pd_row<T>(x, M, D, i, inv_t, row);
  odds.resize(M);
  acc.assign(D, 0.0);
  const int64_t ip = (i + M / 2) % M;
  double R = 0.0;
  for (int64_t j = 0; j < M; ++j) {
    if (j == i || j == ip) continue;
    odds[j] = row.q[j] / row.others(j);
    R += odds[j];
  }
  for (int64_t j = 0; j < M; ++j) {
    if (j == i) continue;
    const double p = row.q[j] / row.W;
    double df = (j == ip ? 1.0 : 0.0) - p + p * R;
    if (j != ip) df -= odds[j];
    const double w = scale * df;
    const T* xj = x + j * D;
    for (int64_t d = 0; d < D; ++d) acc[d] += w * static_cast<double>(xj[d]);
  }
  for (int64_t d = 0; d < D; ++d) gxi[d] = static_cast<T>(acc[d]);
}

// ---- blocked path

constexpr int64_t kPDRows = 4;  // rows per block: 4 x 2 vector accumulators in the tile products

// exp(d) of a shifted logit (d <= 0). float: fast_exp, flushed to 0 below e^-69 (also for
// d = -inf, which marks the diagonal, the arg-max and the padding); double: the C library.
template <typename T>
LD_INLINE T pd_exp(T d);
template <>
LD_INLINE float pd_exp<float>(float d) {
  return fast_exp(d) * static_cast<float>(d >= -69.0f);  // a product, not a branch: vectorises
}
// double: d = n ln2 + r (Cody-Waite, |r| <= ln2/2), degree-13 Taylor polynomial for exp(r)
// (truncation below 2^-57 relative), times 2^n built from the bits of the rounding sum; about 1 ulp,
// branch-free so that the loops vectorise; flushed to 0 below e^-700 (also for d = -inf).
template <>
LD_INLINE double pd_exp<double>(double d) {
  const double keep = static_cast<double>(d >= -700.0);
  double x = d < -700.0 ? -700.0 : d;
  x = x > 700.0 ? 700.0 : x;
  const double magic = 6755399441055744.0;  // 1.5 * 2^52: t's low mantissa bits hold n
  const double t = x * 1.4426950408889634 + magic;
  const double n = t - magic;
  int64_t k;
  std::memcpy(&k, &t, sizeof k);
  k -= int64_t{0x4338000000000000};  // bits of magic
  const double r = (x - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
  double p = 1.6059043836821613e-10;
  p = p * r + 2.08767569878681e-09;
  p = p * r + 2.505210838544172e-08;
  p = p * r + 2.755731922398589e-07;
  p = p * r + 2.7557319223985893e-06;
  p = p * r + 2.48015873015873e-05;
  p = p * r + 1.984126984126984e-04;
  p = p * r + 1.388888888888889e-03;
  p = p * r + 8.333333333333333e-03;
  p = p * r + 4.1666666666666664e-02;
  p = p * r + 1.6666666666666666e-01;
  p = p * r + 0.5;
  p = p * r + 1.0;
  const double y = p * r + 1.0;
  const int64_t sbits = (k + 1023) << 52;
  double scale;
  std::memcpy(&scale, &sbits, sizeof scale);
  return y * scale * keep;
}

// log(1 - p) for 0 <= p <= 1/2 (p = 0 gives 0). float: w = 1 - p rounded, plus the exact rounding
// error e = (1 - p) - w (Fast2Sum, |1| >= |p|): log(1 - p) = log(w) + log1p(e/w) ~ log(w) + e (1 + p)
// (|e| <= 2^-25, so the dropped terms are below 2^-50 relative); log(w) from fast_log2.
template <typename T>
LD_INLINE T pd_log1m(T p);
template <>
LD_INLINE float pd_log1m<float>(float p) {
  const float w = 1.0f - p;
  const float e = (-p) - (w - 1.0f);
  return fast_log2(w) * 0.693147180559945309f + e * (1.0f + p);
}
// double: the same split, log(w) + e / w, with log(w) = e2 ln2 + log(m), m = w or 2w in
// [sqrt(1/2), sqrt(2)), log(m) = 2 atanh(f), f = (m - 1)/(m + 1) (|f| <= 0.172), series to f^21
// (truncation below 2^-60 relative); a few ulp, branch-free.
template <>
LD_INLINE double pd_log1m<double>(double p) {
  const double w = 1.0 - p;
  const double e = (-p) - (w - 1.0);
  const bool lo = w < 0.70710678118654752;
  const double m = lo ? w + w : w;
  const double f = (m - 1.0) / (m + 1.0);
  const double u = f * f;
  double P = 0.047619047619047616;
  P = P * u + 0.05263157894736842;
  P = P * u + 0.058823529411764705;
  P = P * u + 0.06666666666666667;
  P = P * u + 0.07692307692307693;
  P = P * u + 0.09090909090909091;
  P = P * u + 0.1111111111111111;
  P = P * u + 0.14285714285714285;
  P = P * u + 0.2;
  P = P * u + 0.3333333333333333;
  const double logm = 2.0 * f + 2.0 * f * (u * P);
  return (lo ? -0.6931471805599453 : 0.0) + logm + e / w;
}

// S[r*ld + c] = inv_t * sum_d A[r*D + d] * Xt[d*ld + c] for r < kPDRows, c < ld: the common
// tile_combine (weights A with row stride D, inputs Xt: all rows transposed (D, ld), zero past M;
// ld a multiple of two vectors), then the temperature.
template <typename T>
LD_INLINE void pd_block_logits(const T* __restrict A, const T* __restrict Xt, int64_t D, int64_t ld, T inv_t,
                               T* __restrict S) {
  tile_combine<T>(A, 1, D, Xt, D, kPDRows, ld, ld, S);
  for (int64_t k = 0; k < kPDRows * ld; ++k) S[k] *= inv_t;
}

// Load rows [i0, i0 + kPDRows) of x into A (D columns), zero past M.
template <typename T>
LD_INLINE void pd_block_rows(const T* x, int64_t M, int64_t D, int64_t i0, T* A) {
  for (int64_t r = 0; r < kPDRows; ++r)
    for (int64_t d = 0; d < D; ++d) A[r * D + d] = i0 + r < M ? x[(i0 + r) * D + d] : T(0);
}

enum class PDState { kOk, kNaN, kScalar };

struct PDStat {
  PDState state = PDState::kOk;
  double mx = 0.0, W = 0.0, rest = 0.0;  // as in PDRow (mx the shift)
  double a = 1.0;                        // q of the arg-max: exp(max - shift), 1 unless max < log 1e-10
  double c = 1.0;                        // exp(s2 - mx): q_ij = c e_ij (see pd_row_stats)
  double s_ip = 0.0, e_ip = 0.0;         // logit and e of the positive (e_ip unused if i' = am)
  int64_t am = -1, ip = -1;
};

// Row statistics from the logits of row i in s[0, M) (ld entries). The exponentials are taken
// relative to s2, the largest logit after the arg-max's: e_ij = exp(s_ij - s2), q_ij = c e_ij with
// c = exp(s2 - mx) (in double), so rest = c sum e + eps keeps its relative accuracy (and the
// flush of tiny exponentials stays negligible) even when rest is far below 1, as when one negative
// takes almost all of the row's mass. On return (kOk) s holds e_ij for the negatives other than
// the arg-max, and 0 at i, i', the arg-max and the padding.
template <typename T>
LD_INLINE PDStat pd_row_stats(T* __restrict s, int64_t M, int64_t ld, int64_t i) {
  constexpr int L = Lanes<T>::value;
  using I = typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type;
  const T ninf = -std::numeric_limits<T>::infinity();
  PDStat st;
  st.ip = (i + M / 2) % M;
  s[i] = ninf;
  for (int64_t j = M; j < ld; ++j) s[j] = ninf;
  // Per-lane maximum and its first index, in vector registers (comparisons give lane masks).
  using V = typename VecT<T>::type;
  typedef I VI __attribute__((vector_size(64)));
  V m = V{} + ninf;
  VI idx = VI{} + std::numeric_limits<I>::max(), bad = VI{}, jv;
  for (int l = 0; l < L; ++l) jv[l] = static_cast<I>(l);
  for (int64_t j = 0; j < ld; j += L) {
    const V v = vload<T>(s + j);
    bad |= (v != v);
    const VI gt = v > m;  // first strict maximum per lane; NaN never replaces it
    m = gt ? v : m;
    idx = gt ? jv : idx;
    jv += static_cast<I>(L);
  }
  T mx = m[0];
  I am = idx[0], nan = bad[0];
  for (int l = 1; l < L; ++l) {
    if (m[l] > mx || (m[l] == mx && idx[l] < am)) {
      mx = m[l];
      am = idx[l];
    }
    nan |= bad[l];
  }
  if (nan) {
    st.state = PDState::kNaN;
    return st;
  }
  if (!std::isfinite(mx)) {
    st.state = PDState::kScalar;
    return st;
  }
  st.am = am;
  st.mx = static_cast<double>(mx);
  st.s_ip = static_cast<double>(s[st.ip]);
  s[am] = ninf;  // q_am (1, or a when shifted) is kept out of the buffer and of the sum
  V m2 = V{} + ninf;
  for (int64_t j = 0; j < ld; j += L) {
    const V v = vload<T>(s + j);
    m2 = v > m2 ? v : m2;
  }
  T s2 = m2[0];
  for (int l = 1; l < L; ++l) s2 = m2[l] > s2 ? m2[l] : s2;
  if (!(s2 > ninf)) s2 = mx;  // no other term (M = 2): all e are 0
  double acc[L];
  for (int l = 0; l < L; ++l) acc[l] = 0.0;
  for (int64_t j = 0; j < ld; j += L)
    for (int l = 0; l < L; ++l) {
      const T e = pd_exp<T>(s[j + l] - s2);
      s[j + l] = e;
      acc[l] += static_cast<double>(e);
    }
  double rest = 0.0;
  for (int l = 0; l < L; ++l) rest += acc[l];
  double eps = 1.0;
  if (st.mx < kLogSoftmaxEps) {  // shift to log 1e-10 (see the top of the file)
    st.a = pd_exp<double>(st.mx - kLogSoftmaxEps);
    st.mx = kLogSoftmaxEps;
  } else {
    eps = kSoftmaxEps * std::exp(-st.mx);
  }
  st.c = pd_exp<double>(static_cast<double>(s2) - st.mx);
  st.rest = st.c * rest + eps;
  st.W = st.rest + st.a;
  st.e_ip = st.ip == st.am ? 0.0 : static_cast<double>(s[st.ip]);
  s[st.ip] = T(0);
  return st;
}

template <typename T>
LD_INLINE void pd_forward_task_impl(const T* x, const T* Xt, int64_t M, int64_t D, int64_t ld, double inv_t,
                                    int64_t b0, int64_t b1, double* f) {
  constexpr int L = Lanes<T>::value;
  std::vector<T> A(kPDRows * D), S(kPDRows * ld);
  PDRow row;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t i0 = b * kPDRows;
    pd_block_rows<T>(x, M, D, i0, A.data());
    pd_block_logits<T>(A.data(), Xt, D, ld, static_cast<T>(inv_t), S.data());
    for (int64_t r = 0; r < kPDRows && i0 + r < M; ++r) {
      const int64_t i = i0 + r;
      T* s = S.data() + r * ld;
      const PDStat st = pd_row_stats<T>(s, M, ld, i);
      if (st.state == PDState::kNaN) {
        f[i] = std::numeric_limits<double>::quiet_NaN();
        continue;
      }
      if (st.state == PDState::kScalar) {
        f[i] = pd_row_loss<T>(x, M, D, i, inv_t, row);
        continue;
      }
      const T pc = static_cast<T>(st.c / st.W);  // p_ij = e_ij pc
      double acc[L];
      for (int l = 0; l < L; ++l) acc[l] = 0.0;
      for (int64_t j = 0; j < ld; j += L)
        for (int l = 0; l < L; ++l) acc[l] += static_cast<double>(pd_log1m<T>(s[j + l] * pc));
      double neg = 0.0;
      for (int l = 0; l < L; ++l) neg += acc[l];
      const double logW = std::log(st.W);
      if (st.am != st.ip) neg += std::log(st.rest) - logW;
      f[i] = (st.s_ip - st.mx) - logW + neg;
    }
  }
}

template <typename T>
LD_INLINE void pd_backward_task_impl(const T* x, const T* Xt, const T* Xp, int64_t M, int64_t D, int64_t ld,
                                     int64_t Dp, double inv_t, double scale, int64_t b0, int64_t b1, T* gx) {
  constexpr int L = Lanes<T>::value;
  std::vector<T> A(kPDRows * D), S(kPDRows * ld), G(kPDRows * Dp);
  PDRow row;
  std::vector<double> odds, dacc;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t i0 = b * kPDRows;
    pd_block_rows<T>(x, M, D, i0, A.data());
    pd_block_logits<T>(A.data(), Xt, D, ld, static_cast<T>(inv_t), S.data());
    PDState state[kPDRows];
    for (int64_t r = 0; r < kPDRows; ++r) {
      const int64_t i = i0 + r;
      T* s = S.data() + r * ld;
      state[r] = PDState::kScalar;
      if (i < M) {
        const PDStat st = pd_row_stats<T>(s, M, ld, i);
        state[r] = st.state;
        if (st.state == PDState::kOk) {
          // s -> d f_i / d s_ij * scale: the negatives other than the arg-max here, the rest below.
          // With a = q of the arg-max (1 unless shifted), R = R' + A, R' the sum over those
          // negatives (each odds <= 1), A = a/rest for an arg-max among the negatives (0 if it is
          // i'), every weight is written without cancellation: p_ij A = c e_ij a / (W rest) <= 1/W;
          // at the arg-max, p (R - 1) - a/rest = a (R' - 2)/W (as W - a = rest); if the arg-max is
          // i', 1 + p (R' - 1) = (rest + a R')/W.
          const T pc = static_cast<T>(st.c / st.W);
          double acc[L];
          for (int l = 0; l < L; ++l) acc[l] = 0.0;
          for (int64_t j = 0; j < ld; j += L)
            for (int l = 0; l < L; ++l) {
              const T p = s[j + l] * pc;
              acc[l] += static_cast<double>(p / (T(1) - p));
            }
          double Rp = 0.0;
          for (int l = 0; l < L; ++l) Rp += acc[l];
          const bool am_neg = st.am != st.ip;
          const double cw = st.c / st.W, ca = am_neg ? st.c * st.a / (st.W * st.rest) : 0.0;
          const T alpha = static_cast<T>(scale * (cw * (Rp - 1.0) + ca)), sc = static_cast<T>(scale);
          for (int64_t j = 0; j < ld; ++j) {
            const T p = s[j] * pc;
            s[j] = s[j] * alpha - sc * (p / (T(1) - p));
          }
          if (am_neg) {
            s[st.ip] = static_cast<T>(scale * (1.0 + st.e_ip * (cw * (Rp - 1.0) + ca)));
            s[st.am] = static_cast<T>(scale * st.a * (Rp - 2.0) / st.W);
          } else {
            s[st.ip] = static_cast<T>(scale * (st.rest + st.a * Rp) / st.W);
          }
          continue;
        }
      }
      for (int64_t j = 0; j < ld; ++j) s[j] = T(0);
    }
    // G[r*Dp + d] = sum_{j < M} S[r*ld + j] * Xp[j*Dp + d] (Xp: rows zero-padded to Dp), j in order
    tile_combine<T>(S.data(), 1, ld, Xp, M, kPDRows, Dp, Dp, G.data());
    for (int64_t r = 0; r < kPDRows && i0 + r < M; ++r) {
      const int64_t i = i0 + r;
      T* gxi = gx + i * D;
      if (state[r] == PDState::kOk) {
        for (int64_t d = 0; d < D; ++d) gxi[d] = G[r * Dp + d];
      } else if (state[r] == PDState::kNaN) {
        for (int64_t d = 0; d < D; ++d) gxi[d] = std::numeric_limits<T>::quiet_NaN();
      } else {
        pd_row_grad<T>(x, M, D, i, inv_t, scale, row, odds, dacc, gxi);
      }
    }
  }
}

LD_CLONES void pd_forward_task(const float* x, const float* Xt, int64_t M, int64_t D, int64_t ld, double inv_t,
                               int64_t b0, int64_t b1, double* f) {
  pd_forward_task_impl<float>(x, Xt, M, D, ld, inv_t, b0, b1, f);
}
LD_CLONES void pd_forward_task(const double* x, const double* Xt, int64_t M, int64_t D, int64_t ld, double inv_t,
                               int64_t b0, int64_t b1, double* f) {
  pd_forward_task_impl<double>(x, Xt, M, D, ld, inv_t, b0, b1, f);
}
LD_CLONES void pd_backward_task(const float* x, const float* Xt, const float* Xp, int64_t M, int64_t D, int64_t ld,
                                int64_t Dp, double inv_t, double scale, int64_t b0, int64_t b1, float* gx) {
  pd_backward_task_impl<float>(x, Xt, Xp, M, D, ld, Dp, inv_t, scale, b0, b1, gx);
}
LD_CLONES void pd_backward_task(const double* x, const double* Xt, const double* Xp, int64_t M, int64_t D,
                                int64_t ld, int64_t Dp, double inv_t, double scale, int64_t b0, int64_t b1,
                                double* gx) {
  pd_backward_task_impl<double>(x, Xt, Xp, M, D, ld, Dp, inv_t, scale, b0, b1, gx);
}

// Row stride of the logit buffers (two vectors) and x transposed into (D, ld), zero past M.
template <typename T>
int64_t pd_ld(int64_t M) {
  return round_up(M, 2 * Lanes<T>::value);
}
template <typename T>
std::vector<T> pd_transpose(const T* x, int64_t M, int64_t D, int64_t ld) {
  std::vector<T> Xt(D * ld, T(0));
  for (int64_t j = 0; j < M; ++j)
    for (int64_t d = 0; d < D; ++d) Xt[d * ld + j] = x[j * D + d];
  return Xt;
}
// Blocks per parallel task: about 64K logits at least, so that small problems run on one thread.
inline int64_t pd_grain(int64_t ld) { return std::max<int64_t>(1, (int64_t{1} << 16) / (kPDRows * ld)); }

template <typename T>
double pd_forward(const T* x, int64_t M, int64_t D, double inv_t) {
  const int64_t ld = pd_ld<T>(M);
  const std::vector<T> Xt = pd_transpose<T>(x, M, D, ld);
  std::vector<double> f(M);
  const int64_t nb = (M + kPDRows - 1) / kPDRows;
  at::parallel_for(0, nb, pd_grain(ld), [&](int64_t b0, int64_t b1) {
    pd_forward_task(x, Xt.data(), M, D, ld, inv_t, b0, b1, f.data());
  });
  double tot = 0.0;  // row order: independent of the thread count
  for (int64_t i = 0; i < M; ++i) tot += f[i];
  return -tot / static_cast<double>(M);
}

template <typename T>
void pd_backward(const T* x, int64_t M, int64_t D, double inv_t, double g, T* gx) {
  const int64_t ld = pd_ld<T>(M), Dp = round_up(D, Lanes<T>::value);
  const std::vector<T> Xt = pd_transpose<T>(x, M, D, ld);
  std::vector<T> Xp(M * Dp, T(0));
  for (int64_t j = 0; j < M; ++j)
    for (int64_t d = 0; d < D; ++d) Xp[j * Dp + d] = x[j * D + d];
  const double scale = -g / static_cast<double>(M) * inv_t;
  const int64_t nb = (M + kPDRows - 1) / kPDRows;
  at::parallel_for(0, nb, pd_grain(ld), [&](int64_t b0, int64_t b1) {
    pd_backward_task(x, Xt.data(), Xp.data(), M, D, ld, Dp, inv_t, scale, b0, b1, gx);
  });
}

at::Tensor patch_discrimination_cpu(const at::Tensor& x_in, double temperature) {
  checks::patch_discrimination("ld_ext::patch_discrimination", x_in, temperature);
  check_cpu_float(x_in, "x");
  const at::Tensor x = as_compute(x_in);
  double loss = 0.0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "patch_discrimination_cpu", [&] {
    loss = pd_forward<scalar_t>(x.data_ptr<scalar_t>(), x.size(0), x.size(1), 1.0 / temperature);
  });
  return scalar_result(loss, x.options(), x.scalar_type());
}

at::Tensor patch_discrimination_backward_cpu(const at::Tensor& grad, const at::Tensor& x_in, double temperature) {
  checks::patch_discrimination_backward("ld_ext::patch_discrimination_backward", grad, x_in, temperature);
  check_cpu_float(x_in, "x");
  const at::Tensor x = as_compute(x_in);
  const double g = grad.to(at::kDouble).item<double>();
  at::Tensor gx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "patch_discrimination_backward_cpu", [&] {
    pd_backward<scalar_t>(x.data_ptr<scalar_t>(), x.size(0), x.size(1), 1.0 / temperature, g,
                          gx.data_ptr<scalar_t>());
  });
  return gx.to(x_in.scalar_type());
}

}  // namespace

}  // namespace cpu
}  // namespace ld_ext

TORCH_LIBRARY_IMPL(ld_ext, CPU, m) {
  m.impl("patch_discrimination", [](const at::Tensor& x, const c10::Scalar& t) {
    return ld_ext::cpu::patch_discrimination_cpu(x, ld_ext::checks::temperature_arg("ld_ext::patch_discrimination", t));
  });
  m.impl("patch_discrimination_backward", [](const at::Tensor& g, const at::Tensor& x, const c10::Scalar& t) {
    return ld_ext::cpu::patch_discrimination_backward_cpu(g, x, ld_ext::checks::temperature_arg("ld_ext::patch_discrimination_backward", t));
  });
}
