// CUDA kernels of ld_ext::region_discrimination and its backward (docs/method.md section 3).
//
// feats r (N, K, D); centres c~[k] = mean_n r[n,k], c = c~ / (||c~|| + 1e-10) (NOT detached);
// logits l[n,k,j] = <r[n,k], c[j]> / tau; loss = mean_{n,k} (logsumexp_j l[n,k,:] - l[n,k,k]).
// Everything here is of size N*K*D or N*K*K: small kernels, each reduction done by one thread or
// one block in a fixed order (bitwise reproducible).
//
// Backward, with W[n,k,j] = g/(N K) (softmax_j(l[n,k,:]) - [j == k]):
//   dL/dr[n,k] = sum_j W[n,k,j] c[j] / tau + dL/dc~[k] / N
//   gc[j] = sum_{n,k} W[n,k,j] r[n,k] / tau
//   dL/dc~[j] = gc[j]/(m_j+eps) - c~[j] (c~[j].gc[j]) / (m_j (m_j+eps)^2),  m_j = ||c~[j]||
#include "common.cuh"

namespace ld_ext {
namespace cuda {
namespace {

// One block per cluster k: ct[k,:] = mean_n r[n,k,:], cn[k] = ||ct[k]||, c[k,:] = ct / (cn + eps).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kSmallThreads) rd_centres_kernel(const scalar_t* __restrict__ r,
                                                                  acc_t* __restrict__ ct, acc_t* __restrict__ cn,
                                                                  acc_t* __restrict__ c, int64_t N, int64_t K,
                                                                  int64_t D) {
  __shared__ acc_t buf[kSmallThreads];
  const int64_t k = blockIdx.x;
  acc_t sq = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t s = 0;
    for (int64_t n = 0; n < N; ++n) s += static_cast<acc_t>(r[(n * K + k) * D + d]);
    s = s / static_cast<acc_t>(N);
    ct[k * D + d] = s;
    sq += s * s;
  }
  const acc_t m = dev_sqrt(block_sum(sq, buf));
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) c[k * D + d] = ct[k * D + d] / (m + static_cast<acc_t>(kNormEps));
  if (threadIdx.x == 0) cn[k] = m;
}

// One block per row (n, k). Inner products <r, c_j> to shared memory (thread per j), then the
// log-sum-exp of the logits l_j = <r, c_j> / tau with 1/tau (itau) applied to <r, c_j> - max: at
// the smallest temperatures <r, c_j> / tau alone can overflow (inf - inf is NaN). Forward writes
// row_loss[n*K + k] = (max - l_k) + log(sum) (never max + log(sum), which rounds back to max at a
// tiny temperature); backward (W != nullptr) writes W[n,k,:] instead.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kSmallThreads) rd_rows_kernel(const scalar_t* __restrict__ r,
                                                               const acc_t* __restrict__ c,
                                                               acc_t* __restrict__ row_loss, acc_t* __restrict__ W,
                                                               const acc_t* __restrict__ grad, int64_t N, int64_t K,
                                                               int64_t D, acc_t itau) {
  LD_CUDA_DYNAMIC_SMEM(acc_t, L);  // K
  acc_t* rs = L + K;               // D
  acc_t* buf = rs + D;             // blockDim
  const int64_t row = blockIdx.x;
  const int64_t k = row % K;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) rs[d] = static_cast<acc_t>(r[row * D + d]);
  __syncthreads();
  acc_t mx = neg_inf<acc_t>();
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    acc_t s = 0;
    for (int64_t d = 0; d < D; ++d) s += rs[d] * c[j * D + d];
    L[j] = s;
    mx = dev_max(mx, s);
  }
  mx = block_max(mx, buf);
  acc_t se = 0;
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) se += dev_exp((L[j] - mx) * itau);
  se = block_sum(se, buf);
  if (W == nullptr) {
    if (threadIdx.x == 0) row_loss[row] = (mx - L[k]) * itau + dev_log(se);
  } else {
    const acc_t scale = grad[0] / (static_cast<acc_t>(N) * static_cast<acc_t>(K));
    for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
      const acc_t p = dev_exp((L[j] - mx) * itau) / se;
      W[row * K + j] = scale * (p - (j == k ? acc_t(1) : acc_t(0)));
    }
  }
}

// One block per centre j: gct[j,:] = dL/dc~[j] / N.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kSmallThreads) rd_centre_grad_kernel(
    const scalar_t* __restrict__ r, const acc_t* __restrict__ W, const acc_t* __restrict__ ct,
    const acc_t* __restrict__ cn, acc_t* __restrict__ gct, int64_t N, int64_t K, int64_t D, acc_t tau) {
  __shared__ acc_t buf[kSmallThreads];
  const int64_t j = blockIdx.x;
  acc_t dot = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t s = 0;
    for (int64_t row = 0; row < N * K; ++row) s += W[row * K + j] * static_cast<acc_t>(r[row * D + d]);
    s = s / tau;
    gct[j * D + d] = s;
    dot += ct[j * D + d] * s;
  }
  dot = block_sum(dot, buf);
  const acc_t m = cn[j];
  const acc_t den = m + static_cast<acc_t>(kNormEps);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t v = gct[j * D + d] / den;
    if (m > acc_t(0)) v -= ct[j * D + d] * dot / (m * den * den);
    gct[j * D + d] = v / static_cast<acc_t>(N);
  }
}

// One thread per (n, k, d): dL/dr = sum_j W[n,k,j] c[j,d] / tau + gct[k,d].
template <typename scalar_t, typename acc_t>
__global__ void rd_feat_grad_kernel(const acc_t* __restrict__ W, const acc_t* __restrict__ c,
                                    const acc_t* __restrict__ gct, scalar_t* __restrict__ grad_r, int64_t N,
                                    int64_t K, int64_t D, acc_t tau) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= N * K * D) return;
  const int64_t row = idx / D;
  const int64_t d = idx - row * D;
  const int64_t k = row % K;
  acc_t s = 0;
  for (int64_t j = 0; j < K; ++j) s += W[row * K + j] * c[j * D + d];
  grad_r[idx] = static_cast<scalar_t>(s / tau + gct[k * D + d]);
}

constexpr const char* kOp = "ld_ext::region_discrimination (CUDA)";
constexpr const char* kOpB = "ld_ext::region_discrimination_backward (CUDA)";

void check_inputs(const at::Tensor& feats, const char* op) { check_cuda_tensor(feats, op, "feats"); }

size_t rows_smem(int64_t K, int64_t D, size_t elem) { return static_cast<size_t>(K + D + kSmallThreads) * elem; }

template <typename scalar_t, typename acc_t>
void launch_centres_and_rows(const at::Tensor& f, at::Tensor& ct, at::Tensor& cn, at::Tensor& c, acc_t* row_loss,
                             acc_t* W, const acc_t* grad, double temperature, const OpDevice& dev, const char* op) {
  const int64_t N = f.size(0), K = f.size(1), D = f.size(2);
  launch(rd_centres_kernel<scalar_t, acc_t>, K, kSmallThreads, 0, dev.stream, f.data_ptr<scalar_t>(),
         ct.data_ptr<acc_t>(), cn.data_ptr<acc_t>(), c.data_ptr<acc_t>(), N, K, D);
  const size_t smem = rows_smem(K, D, sizeof(acc_t));
  auto kernel = rd_rows_kernel<scalar_t, acc_t>;
  require_smem(kernel, smem, dev.device, op, "K + D");
  launch(kernel, N * K, kSmallThreads, smem, dev.stream, f.data_ptr<scalar_t>(), c.data_ptr<acc_t>(), row_loss, W,
         grad, N, K, D, static_cast<acc_t>(1.0 / temperature));  // finite: temperature >= 1/FLT_MAX
}

at::Tensor region_discrimination_cuda(const at::Tensor& feats, double temperature) {
  checks::region_discrimination(kOp, feats, temperature);
  check_inputs(feats, kOp);
  const OpDevice dev(feats);
  const at::Tensor f = feats.contiguous();
  const int64_t N = f.size(0), K = f.size(1), D = f.size(2);
  const auto out_opts = f.options().dtype(out_type(f.scalar_type()));
  at::Tensor loss = at::empty({}, out_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "ld_ext_rd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    at::Tensor ct = at::empty({K, D}, out_opts);
    at::Tensor c = at::empty({K, D}, out_opts);
    at::Tensor cn = at::empty({K}, out_opts);
    at::Tensor rows = at::empty({N * K}, out_opts);
    launch_centres_and_rows<scalar_t, acc_t>(f, ct, cn, c, rows.data_ptr<acc_t>(), nullptr, nullptr, temperature,
                                             dev, kOp);
    const acc_t scale = acc_t(1) / (static_cast<acc_t>(N) * static_cast<acc_t>(K));
    launch_sum_scalar<acc_t>(rows.data_ptr<acc_t>(), N * K, scale, loss.data_ptr<acc_t>(), dev.stream);
  });
  return loss;
}

at::Tensor region_discrimination_backward_cuda(const at::Tensor& grad, const at::Tensor& feats, double temperature) {
  checks::region_discrimination_backward(kOpB, grad, feats, temperature);
  check_inputs(feats, kOpB);
  const OpDevice dev(feats);
  const at::Tensor f = feats.contiguous();
  const int64_t N = f.size(0), K = f.size(1), D = f.size(2);
  const auto acc_opts = f.options().dtype(out_type(f.scalar_type()));
  TORCH_CHECK(grad.numel() == 1, kOpB, ": grad must be a scalar");
  const at::Tensor g = grad.to(f.device(), out_type(f.scalar_type())).reshape({1}).contiguous();
  at::Tensor grad_f = at::empty(f.sizes(), f.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "ld_ext_rd_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    at::Tensor ct = at::empty({K, D}, acc_opts);
    at::Tensor c = at::empty({K, D}, acc_opts);
    at::Tensor cn = at::empty({K}, acc_opts);
    at::Tensor W = at::empty({N * K * K}, acc_opts);
    at::Tensor gct = at::empty({K, D}, acc_opts);
    launch_centres_and_rows<scalar_t, acc_t>(f, ct, cn, c, nullptr, W.data_ptr<acc_t>(), g.data_ptr<acc_t>(),
                                             temperature, dev, kOpB);
    const acc_t tau = static_cast<acc_t>(temperature);
    launch(rd_centre_grad_kernel<scalar_t, acc_t>, K, kSmallThreads, 0, dev.stream, f.data_ptr<scalar_t>(),
           W.data_ptr<acc_t>(), ct.data_ptr<acc_t>(), cn.data_ptr<acc_t>(), gct.data_ptr<acc_t>(), N, K, D, tau);
    launch(rd_feat_grad_kernel<scalar_t, acc_t>, ceil_div(N * K * D, kThreads), kThreads, 0, dev.stream,
           W.data_ptr<acc_t>(), c.data_ptr<acc_t>(), gct.data_ptr<acc_t>(), grad_f.data_ptr<scalar_t>(), N, K, D, tau);
  });
  return grad_f;
}

}  // namespace

TORCH_LIBRARY_IMPL(ld_ext, LD_CUDA_DISPATCH_KEY, m) {
  m.impl("region_discrimination", [](const at::Tensor& a, const c10::Scalar& t) {
    return region_discrimination_cuda(a, ld_ext::checks::temperature_arg("ld_ext::region_discrimination", t));
  });
  m.impl("region_discrimination_backward", [](const at::Tensor& g, const at::Tensor& a, const c10::Scalar& t) {
    return region_discrimination_backward_cuda(g, a, ld_ext::checks::temperature_arg("ld_ext::region_discrimination_backward", t));
  });
}

}  // namespace cuda
}  // namespace ld_ext
