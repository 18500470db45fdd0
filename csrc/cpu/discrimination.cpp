// The two small contrastive criteria on the CPU: region discrimination on (N, K, D) region
// features and the patch (instance) discrimination criterion on (M, D) rows. Both work in double
// internally; results are returned in the input dtype (float32 for float16/bfloat16 inputs).
#include "common.h"

namespace ld_ext {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// region_discrimination: c~ = mean_n r, c = c~/(||c~||+eps), l = <r, c>/tau,
// loss = mean_{n,k} (logsumexp_j l[n,k,:] - l[n,k,k]).

struct RDState {
  int64_t N, K, D;
  std::vector<double> r, ct, c, cn, lse, logits;  // logits (N*K, K)
};

RDState rd_prepare(const at::Tensor& feats, double tau) {
  const at::Tensor f = feats.to(at::kDouble).contiguous();
  RDState st{f.size(0), f.size(1), f.size(2), {}, {}, {}, {}, {}, {}};
  const int64_t N = st.N, K = st.K, D = st.D;
  st.r.assign(f.data_ptr<double>(), f.data_ptr<double>() + N * K * D);
  st.ct.assign(K * D, 0.0);
  st.c.assign(K * D, 0.0);
  st.cn.assign(K, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < K * D; ++i) st.ct[i] += st.r[n * K * D + i];
  for (int64_t i = 0; i < K * D; ++i) st.ct[i] /= static_cast<double>(N);
  for (int64_t k = 0; k < K; ++k) {
    double ss = 0.0;
    for (int64_t d = 0; d < D; ++d) ss += st.ct[k * D + d] * st.ct[k * D + d];
    st.cn[k] = std::sqrt(ss);
    for (int64_t d = 0; d < D; ++d) st.c[k * D + d] = st.ct[k * D + d] / (st.cn[k] + kNormEps);
  }
  st.logits.assign(N * K * K, 0.0);
  st.lse.assign(N * K, 0.0);
  for (int64_t i = 0; i < N * K; ++i) {
    const double* ri = st.r.data() + i * D;
    double* li = st.logits.data() + i * K;
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < K; ++j) {
      double acc = 0.0;
      for (int64_t d = 0; d < D; ++d) acc += ri[d] * st.c[j * D + d];
      li[j] = acc / tau;
      mx = li[j] > mx ? li[j] : mx;
    }
    if (!std::isfinite(mx)) mx = 0.0;  // NaN or inf logits: let them propagate through the sum
    double se = 0.0;
    for (int64_t j = 0; j < K; ++j) se += std::exp(li[j] - mx);
    st.lse[i] = mx + std::log(se);
  }
  return st;
}

at::Tensor region_discrimination_cpu(const at::Tensor& feats, double temperature) {
  check_cpu_float(feats, "feats");
  TORCH_CHECK(feats.dim() == 3, "feats must be (N, K, D)");
  TORCH_CHECK(temperature > 0, "temperature must be > 0");
  const RDState st = rd_prepare(feats, temperature);
  double loss = 0.0;
  for (int64_t i = 0; i < st.N * st.K; ++i) loss += st.lse[i] - st.logits[i * st.K + (i % st.K)];
  loss /= static_cast<double>(st.N * st.K);
  const auto out_t = (feats.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  return at::full({}, loss, feats.options().dtype(out_t));
}

at::Tensor region_discrimination_backward_cpu(const at::Tensor& grad, const at::Tensor& feats, double temperature) {
  check_cpu_float(feats, "feats");
  const RDState st = rd_prepare(feats, temperature);
  const int64_t N = st.N, K = st.K, D = st.D;
  const double g = grad.to(at::kDouble).item<double>() / static_cast<double>(N * K);
  std::vector<double> gr(N * K * D, 0.0), gc(K * D, 0.0), gl(K);
  for (int64_t i = 0; i < N * K; ++i) {
    const int64_t k = i % K;
    const double* li = st.logits.data() + i * K;
    for (int64_t j = 0; j < K; ++j) gl[j] = g * (std::exp(li[j] - st.lse[i]) - (j == k ? 1.0 : 0.0)) / temperature;
    double* gri = gr.data() + i * D;
    const double* ri = st.r.data() + i * D;
    for (int64_t j = 0; j < K; ++j) {
      const double* cj = st.c.data() + j * D;
      double* gcj = gc.data() + j * D;
      for (int64_t d = 0; d < D; ++d) {
        gri[d] += gl[j] * cj[d];
        gcj[d] += gl[j] * ri[d];
      }
    }
  }
  // through c = c~ / (||c~|| + eps) and c~ = mean_n r
  for (int64_t k = 0; k < K; ++k) {
    const double* ctk = st.ct.data() + k * D;
    const double* gck = gc.data() + k * D;
    const double cn = st.cn[k];
    double dotv = 0.0;
    for (int64_t d = 0; d < D; ++d) dotv += ctk[d] * gck[d];
    const double coef = cn > 0.0 ? dotv / (cn * (cn + kNormEps) * (cn + kNormEps)) : 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const double gct = gck[d] / (cn + kNormEps) - ctk[d] * coef;
      for (int64_t n = 0; n < N; ++n) gr[(n * K + k) * D + d] += gct / static_cast<double>(N);
    }
  }
  at::Tensor out = at::empty({N, K, D}, feats.options().dtype(at::kDouble));
  std::memcpy(out.data_ptr<double>(), gr.data(), sizeof(double) * gr.size());
  return out.to(feats.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// patch_discrimination. Row i pairs with i' = (i + M/2) mod M. With s_ij = <x_i, sg(x_j)>/T,
// q_ij = exp(s_ij - max_j s_ij) (j != i), W_i = sum_j q_ij + 1e-10 exp(-max), p_ij = q_ij / W_i:
//   f_i = log p_ii' + sum_{j not in {i, i'}} log(1 - p_ij),   loss = -(1/M) sum_i f_i.
// Stability: log(1 - p_ij) = log(W_i - q_ij) - log W_i, where W_i - q_ij is the sum of the OTHER
// terms. For the row's largest term (q = 1) that sum is accumulated directly (no cancellation),
// so a negative that takes almost all the mass gives a finite, accurate log(1 - p) instead of
// log(0). For every other j, W_i - q_ij >= 1 and the subtraction loses nothing.

struct PDRow {
  std::vector<double> s, q;  // logits and shifted exponentials of row i (entry i unused)
  double mx = 0.0, W = 0.0, rest = 0.0;  // rest = W - q[am], summed without q[am]
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
  const double eps = kSoftmaxEps * std::exp(-mx);
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

template <typename T>
double pd_forward(const T* x, int64_t M, int64_t D, double inv_t) {
  std::vector<double> f(M);
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    PDRow row;
    for (int64_t i = b; i < e; ++i) {
      pd_row<T>(x, M, D, i, inv_t, row);
      const int64_t ip = (i + M / 2) % M;
      const double logW = std::log(row.W);
      double fi = row.s[ip] - row.mx - logW;
      for (int64_t j = 0; j < M; ++j) {
        if (j == i || j == ip) continue;
        fi += std::log(row.others(j)) - logW;
      }
      f[i] = fi;
    }
  });
  double tot = 0.0;
  for (int64_t i = 0; i < M; ++i) tot += f[i];
  return -tot / static_cast<double>(M);
}

// d f_i / d s_ij = [j == i'] - p_ij - [j not in {i,i'}] p_ij/(1-p_ij) + p_ij R_i,
// R_i = sum_{l not in {i,i'}} p_il/(1-p_il), with p/(1-p) = q / (W - q) from the stable sum.
template <typename T>
void pd_backward(const T* x, int64_t M, int64_t D, double inv_t, double g, T* gx) {
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    PDRow row;
    std::vector<double> odds(M), acc(D);
    for (int64_t i = b; i < e; ++i) {
      pd_row<T>(x, M, D, i, inv_t, row);
      const int64_t ip = (i + M / 2) % M;
      double R = 0.0;
      for (int64_t j = 0; j < M; ++j) {
        if (j == i || j == ip) continue;
        odds[j] = row.q[j] / row.others(j);
        R += odds[j];
      }
      for (int64_t d = 0; d < D; ++d) acc[d] = 0.0;
      const double scale = -g / static_cast<double>(M) * inv_t;
      for (int64_t j = 0; j < M; ++j) {
        if (j == i) continue;
        const double p = row.q[j] / row.W;
        double df = (j == ip ? 1.0 : 0.0) - p + p * R;
        if (j != ip) df -= odds[j];
        const double w = scale * df;
        const T* xj = x + j * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += w * static_cast<double>(xj[d]);
      }
      for (int64_t d = 0; d < D; ++d) gx[i * D + d] = static_cast<T>(acc[d]);
    }
  });
}

at::Tensor patch_discrimination_cpu(const at::Tensor& x_in, double temperature) {
  check_cpu_float(x_in, "x");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) % 2 == 0, "x must be (M, D) with M even");
  TORCH_CHECK(temperature > 0, "temperature must be > 0");
  const at::Tensor x = as_compute(x_in);
  double loss = 0.0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "patch_discrimination_cpu", [&] {
    loss = pd_forward<scalar_t>(x.data_ptr<scalar_t>(), x.size(0), x.size(1), 1.0 / temperature);
  });
  return at::full({}, loss, x.options());
}

at::Tensor patch_discrimination_backward_cpu(const at::Tensor& grad, const at::Tensor& x_in, double temperature) {
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

std::string cpu_isa() {
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return "x86-64-v4 (AVX-512)";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "x86-64-v3 (AVX2+FMA)";
  return "x86-64 baseline";
#else
  return "generic";
#endif
}

}  // namespace ld_ext

TORCH_LIBRARY_IMPL(ld_ext, CPU, m) {
  m.impl("region_discrimination", &ld_ext::cpu::region_discrimination_cpu);
  m.impl("region_discrimination_backward", &ld_ext::cpu::region_discrimination_backward_cpu);
  m.impl("patch_discrimination", &ld_ext::cpu::patch_discrimination_cpu);
  m.impl("patch_discrimination_backward", &ld_ext::cpu::patch_discrimination_backward_cpu);
}
