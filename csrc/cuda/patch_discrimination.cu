// CUDA kernels of ld_ext::patch_discrimination and its backward (docs/method.md section 5), in the
// stable form of ld_ext.reference.patch_discrimination.
//
// x (M, D), s_ij = <x_i, sg(x_j)> / T for j != i, i' = (i + M/2) mod M the positive. Per row:
// mx = max_{j != i} s_ij (first arg-max a), shift m = max(mx, log 1e-10), q_ij = exp(s_ij - m),
// W = sum_{j != i} q_ij + exp(log 1e-10 - m), p_ij = q_ij / W, f_i = log p_ii' + sum_{j not in {i, i'}}
// log(1 - p_ij); loss = -(1/M) sum_i f_i. The shift keeps the 1e-10 term finite when every logit is far
// below log 1e-10 (anti-aligned rows at a small T); otherwise m = mx and q_ia = 1.
// Cancellation-free, as the CPU kernel and the reference: rest = W - q_ia is summed without
// the arg-max term, so log(1 - p_ia) = log(rest) - log(W) stays finite and accurate when one negative
// takes almost all of the row's mass; every other negative has W - q_ij >= W/2 (p_ij <= 1/2), where
// log1p(-p_ij) is exact enough; log p_ii' = s_ii' - mx - log W (no underflow to log 0).
// One block per row recomputes its M inner products in each pass (nothing of size M x M is kept);
// the row terms are added by one block in a fixed order.
//
// Backward (gradients only through the first argument of each inner product):
// df_i/ds_ij = [j == i'] - p_ij - [j in N_i] p_ij / (1 - p_ij) + p_ij R_i,
// R_i = sum_{l in N_i} p_il / (1 - p_il), with p/(1-p) = q / (W - q) (1 / rest at the arg-max);
// dL/dx_i = -(g/M) sum_j df_i/ds_ij x_j / T. Written without cancellation, as the CPU kernel: with
// R = R' + A (R' over the negatives other than the arg-max, A = 1/rest if the arg-max is a
// negative; a/rest with a = q_ia when shifted), p_ij A = q_ij / (W rest) <= 1/W; at the arg-max
// p (R - 1) - a/rest = a (R' - 2)/W (as W - a = rest); if the arg-max is i', 1 + p (R' - 1) =
// (rest + a R')/W.
#include "common.cuh"

namespace ld_ext {
namespace cuda {
namespace {

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t row_dot(const acc_t* xi, const scalar_t* __restrict__ x, int64_t j, int64_t D) {
  const scalar_t* xj = x + j * D;
  acc_t s = 0;
  for (int64_t d = 0; d < D; ++d) s += xi[d] * static_cast<acc_t>(xj[d]);
  return s;
}

// Row statistics of row i over j != i; every thread gets them: the shift m (mx_out), the first
// arg-max am, its q_ia (a_out: 1 unless m > max), rest = sum_{j != i, am} q_ij + 1e-10 exp(-m)
// (without the arg-max term, so no cancellation) and W = rest + a. Each thread keeps its own maximum, first arg-max and the sum of its other
// terms; the block combines them in a fixed order. `buf` holds blockDim.x acc_t (>= ints).
template <typename scalar_t, typename acc_t>
__device__ void row_softmax_stats(const acc_t* xi, const scalar_t* __restrict__ x, int64_t i, int64_t M, int64_t D,
                                  acc_t tau, acc_t* buf, acc_t& mx_out, int64_t& am_out, acc_t& rest_out,
                                  acc_t& w_out, acc_t& a_out) {
  acc_t mx = neg_inf<acc_t>();
  acc_t rt = 0;  // sum of this thread's terms other than its maximum, relative to exp(mx)
  int am = static_cast<int>(M);
  for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
    if (j == i) continue;
    const acc_t s = row_dot<scalar_t, acc_t>(xi, x, j, D) / tau;
    if (s > mx) {  // first strict maximum of this thread; the old maximum joins the rest
      rt = (am < M ? rt + acc_t(1) : rt) * dev_exp(mx - s);  // first term: rt * 0 (keeps a NaN)
      mx = s;
      am = static_cast<int>(j);
    } else {
      rt += dev_exp(s - mx);  // NaN logits land here and propagate
    }
  }
  const acc_t MX = block_max(mx, buf);
  const int AM = block_min(mx == MX ? am : static_cast<int>(M), reinterpret_cast<int*>(buf));
  acc_t part = rt * acc_t(0);  // 0, or NaN after a NaN logit
  if (am < M) part = (am == AM ? rt : rt + acc_t(1)) * dev_exp(mx - MX);
  const acc_t total = block_sum(part, buf);
  const acc_t log_eps = static_cast<acc_t>(kLogSoftmaxEps);
  acc_t a = 1, shift = MX, eps;
  if (MX < log_eps) {  // every logit far below log 1e-10: exp(-MX) could overflow
    a = dev_exp(MX - log_eps);
    shift = log_eps;
    eps = 1;
  } else {
    eps = static_cast<acc_t>(kSoftmaxEps) * dev_exp(-MX);
  }
  mx_out = shift;
  am_out = AM;
  a_out = a;
  rest_out = total * a + eps;
  w_out = rest_out + a;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kSmallThreads) pd_forward_rows_kernel(const scalar_t* __restrict__ x,
                                                                       acc_t* __restrict__ f, int64_t M, int64_t D,
                                                                       acc_t tau) {
  LD_CUDA_DYNAMIC_SMEM(acc_t, buf);  // blockDim
  acc_t* xi = buf + blockDim.x;      // D
  const int64_t i = blockIdx.x;
  const int64_t ip = (i + M / 2) % M;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) xi[d] = static_cast<acc_t>(x[i * D + d]);
  __syncthreads();
  acc_t mx, rest, W, a;
  int64_t am;
  row_softmax_stats<scalar_t, acc_t>(xi, x, i, M, D, tau, buf, mx, am, rest, W, a);
  const acc_t logW = dev_log(W);
  acc_t pos = 0, neg = 0;
  for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
    if (j == i) continue;
    const acc_t d = row_dot<scalar_t, acc_t>(xi, x, j, D) / tau - mx;
    if (j == ip) {
      pos = d - logW;
    } else if (j == am) {
      neg += dev_log(rest) - logW;
    } else {
      neg += dev_log1p(-dev_exp(d) / W);
    }
  }
  pos = block_sum(pos, buf);
  neg = block_sum(neg, buf);
  if (threadIdx.x == 0) f[i] = pos + neg;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kSmallThreads) pd_backward_rows_kernel(const scalar_t* __restrict__ x,
                                                                        const acc_t* __restrict__ grad,
                                                                        scalar_t* __restrict__ grad_x, int64_t M,
                                                                        int64_t D, int64_t groups, acc_t tau) {
  LD_CUDA_DYNAMIC_SMEM(acc_t, buf);  // blockDim
  acc_t* W = buf + blockDim.x;       // blockDim
  acc_t* xi = W + blockDim.x;        // D
  acc_t* GX = xi + D;                // groups * D
  const int64_t i = blockIdx.x;
  const int64_t ip = (i + M / 2) % M;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) xi[d] = static_cast<acc_t>(x[i * D + d]);
  for (int64_t q = threadIdx.x; q < groups * D; q += blockDim.x) GX[q] = 0;
  __syncthreads();
  acc_t mx, rest, Z, a;
  int64_t am;
  row_softmax_stats<scalar_t, acc_t>(xi, x, i, M, D, tau, buf, mx, am, rest, Z, a);
  acc_t R = 0;  // R'
  for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
    if (j == i || j == ip || j == am) continue;
    const acc_t q = dev_exp(row_dot<scalar_t, acc_t>(xi, x, j, D) / tau - mx);
    R += q / (Z - q);
  }
  R = block_sum(R, buf);
  const acc_t A = am != ip ? a / rest : acc_t(0);
  const acc_t scale = -grad[0] / static_cast<acc_t>(M);
  for (int64_t j0 = 0; j0 < M; j0 += blockDim.x) {
    const int64_t j = j0 + threadIdx.x;
    acc_t w = 0;
    if (j < M && j != i) {
      acc_t df;
      if (j == am) {
        df = j == ip ? (rest + a * R) / Z : a * (R - acc_t(2)) / Z;
      } else {
        const acc_t q = dev_exp(row_dot<scalar_t, acc_t>(xi, x, j, D) / tau - mx);
        const acc_t p = q / Z;
        df = p * (R - acc_t(1)) + p * A;
        df += j == ip ? acc_t(1) : -q / (Z - q);
      }
      w = scale * df;
    }
    W[threadIdx.x] = w;
    __syncthreads();
    const int64_t len = min(static_cast<int64_t>(blockDim.x), M - j0);
    for (int64_t q = threadIdx.x; q < groups * D; q += blockDim.x) {
      const int64_t g = q / D;
      const int64_t d = q - g * D;
      acc_t s = GX[q];
      for (int64_t jj = g; jj < len; jj += groups) s += W[jj] * static_cast<acc_t>(x[(j0 + jj) * D + d]);
      GX[q] = s;
    }
    __syncthreads();
  }
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t s = 0;
    for (int64_t g = 0; g < groups; ++g) s += GX[g * D + d];
    grad_x[i * D + d] = static_cast<scalar_t>(s / tau);
  }
}

constexpr const char* kOp = "ld_ext::patch_discrimination (CUDA)";
constexpr const char* kOpB = "ld_ext::patch_discrimination_backward (CUDA)";

void check_inputs(const at::Tensor& x, const char* op) { check_cuda_tensor(x, op, "x"); }

at::Tensor patch_discrimination_cuda(const at::Tensor& x_in, double temperature) {
  checks::patch_discrimination(kOp, x_in, temperature);
  check_inputs(x_in, kOp);
  const OpDevice dev(x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), D = x.size(1);
  const auto out_opts = x.options().dtype(out_type(x.scalar_type()));
  at::Tensor loss = at::empty({}, out_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ld_ext_pd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    at::Tensor f = at::empty({M}, out_opts);
    const size_t smem = static_cast<size_t>(kSmallThreads + D) * sizeof(acc_t);
    auto kernel = pd_forward_rows_kernel<scalar_t, acc_t>;
    require_smem(kernel, smem, dev.device, kOp, "D");
    launch(kernel, M, kSmallThreads, smem, dev.stream, x.data_ptr<scalar_t>(), f.data_ptr<acc_t>(), M, D,
           static_cast<acc_t>(temperature));
    launch_sum_scalar<acc_t>(f.data_ptr<acc_t>(), M, acc_t(-1) / static_cast<acc_t>(M), loss.data_ptr<acc_t>(),
                             dev.stream);
  });
  return loss;
}

at::Tensor patch_discrimination_backward_cuda(const at::Tensor& grad, const at::Tensor& x_in, double temperature) {
  checks::patch_discrimination_backward(kOpB, grad, x_in, temperature);
  check_inputs(x_in, kOpB);
  TORCH_CHECK(grad.numel() == 1, kOpB, ": grad must be a scalar");
  const OpDevice dev(x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), D = x.size(1);
  const at::Tensor g = grad.to(x.device(), out_type(x.scalar_type())).reshape({1}).contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ld_ext_pd_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const int64_t groups = std::max<int64_t>(1, kSmallThreads / D);
    const size_t smem = static_cast<size_t>(2 * kSmallThreads + D + groups * D) * sizeof(acc_t);
    auto kernel = pd_backward_rows_kernel<scalar_t, acc_t>;
    require_smem(kernel, smem, dev.device, kOpB, "D");
    launch(kernel, M, kSmallThreads, smem, dev.stream, x.data_ptr<scalar_t>(), g.data_ptr<acc_t>(),
           grad_x.data_ptr<scalar_t>(), M, D, groups, static_cast<acc_t>(temperature));
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(ld_ext, LD_CUDA_DISPATCH_KEY, m) {
  m.impl("patch_discrimination", [](const at::Tensor& x, const c10::Scalar& t) {
    return patch_discrimination_cuda(x, ld_ext::checks::temperature_arg("ld_ext::patch_discrimination", t));
  });
  m.impl("patch_discrimination_backward", [](const at::Tensor& g, const at::Tensor& x, const c10::Scalar& t) {
    return patch_discrimination_backward_cuda(g, x, ld_ext::checks::temperature_arg("ld_ext::patch_discrimination_backward", t));
  });
}

}  // namespace cuda
}  // namespace ld_ext
