// region_discrimination on the CPU: the contrastive criterion on (N, K, D) region features, forward
// and backward. Works in double internally; the result is returned in the input dtype (float32
// for float16/bfloat16 inputs).
#include "common.h"

namespace ld_ext {
namespace cpu {
namespace {

// region_discrimination: c~ = mean_n r, c = c~/(||c~||+eps), l = <r, c>/tau,
// loss = mean_{n,k} (logsumexp_j l[n,k,:] - l[n,k,k]).
// Per row, with mx = max_j l and se = sum_j exp(l_j - mx), the row loss is (mx - l_k) + log(se) and
// softmax_j = exp(l_j - mx) / se: mx + log(se) is never formed, as at a tiny temperature (|l| ~ 1/tau
// far above 1/ulp) it rounds back to mx and identical features would give 0 instead of log K.

struct RDState {
  int64_t N, K, D;
  std::vector<double> r, ct, c, cn, mx, se, logits;  // logits (N*K, K); mx, se per row
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
    st.cn[k] = safe_norm(st.ct.data() + k * D, D);
    for (int64_t d = 0; d < D; ++d) st.c[k * D + d] = st.ct[k * D + d] / (st.cn[k] + kNormEps);
  }
  st.logits.assign(N * K * K, 0.0);
  st.mx.assign(N * K, 0.0);
  st.se.assign(N * K, 0.0);
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
    st.mx[i] = mx;
    st.se[i] = se;
  }
  return st;
}

at::Tensor region_discrimination_cpu(const at::Tensor& feats, double temperature) {
  checks::region_discrimination("ld_ext::region_discrimination", feats, temperature);
  check_cpu_float(feats, "feats");
  const RDState st = rd_prepare(feats, temperature);
  double loss = 0.0;
  for (int64_t i = 0; i < st.N * st.K; ++i) loss += (st.mx[i] - st.logits[i * st.K + (i % st.K)]) + std::log(st.se[i]);
  loss /= static_cast<double>(st.N * st.K);
  const auto out_t = (feats.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  return scalar_result(loss, feats.options(), out_t);
}

at::Tensor region_discrimination_backward_cpu(const at::Tensor& grad, const at::Tensor& feats, double temperature) {
  checks::region_discrimination_backward("ld_ext::region_discrimination_backward", grad, feats, temperature);
  check_cpu_float(feats, "feats");
  const RDState st = rd_prepare(feats, temperature);
  const int64_t N = st.N, K = st.K, D = st.D;
  const double g = grad.to(at::kDouble).item<double>() / static_cast<double>(N * K);
  std::vector<double> gr(N * K * D, 0.0), gc(K * D, 0.0), gl(K);
  for (int64_t i = 0; i < N * K; ++i) {
    const int64_t k = i % K;
    const double* li = st.logits.data() + i * K;
    for (int64_t j = 0; j < K; ++j)
      gl[j] = g * (std::exp(li[j] - st.mx[i]) / st.se[i] - (j == k ? 1.0 : 0.0)) / temperature;
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

}  // namespace

}  // namespace cpu
}  // namespace ld_ext

TORCH_LIBRARY_IMPL(ld_ext, CPU, m) {
  m.impl("region_discrimination", [](const at::Tensor& a, const c10::Scalar& t) {
    return ld_ext::cpu::region_discrimination_cpu(a, ld_ext::checks::temperature_arg("ld_ext::region_discrimination", t));
  });
  m.impl("region_discrimination_backward", [](const at::Tensor& g, const at::Tensor& a, const c10::Scalar& t) {
    return ld_ext::cpu::region_discrimination_backward_cpu(g, a, ld_ext::checks::temperature_arg("ld_ext::region_discrimination_backward", t));
  });
}
