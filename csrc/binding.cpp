// Python binding of the CUDA backend (module lora_fused._C). The torch custom ops (lora_fused/ops/) dispatch to
// lora_fused/backends/cuda_backend.py, which calls these functions; they check the tensors, plan the kernels
// (csrc/lora_plan.h), allocate outputs and workspaces, and launch on the current CUDA stream. The big GEMMs run
// the sm_90a kernels on compute capability 9.x when the build has them, the sm_80 kernels elsewhere.
// Lighter than <torch/extension.h> (the whole C++ frontend): ATen, torch's pybind casters for at::Tensor, and
// pybind11's std::optional / std::vector casters.
#include <ATen/ATen.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <cutlass/version.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "lora_launch.h"
#include "lora_plan.h"

// csrc_build.py defines LORA_FUSED_ARCHS as one token, the arch list joined by '_' (e.g. 90a_80).
#define LF_STRINGIFY2(x) #x
#define LF_STRINGIFY(x) LF_STRINGIFY2(x)
#ifdef LORA_FUSED_ARCHS
#define LF_ARCHS_STRING LF_STRINGIFY(LORA_FUSED_ARCHS)
#else
#define LF_ARCHS_STRING "unknown"
#endif

namespace lf = lora_fused;

namespace {

std::vector<std::string> built_archs() {
  std::vector<std::string> out;
  std::string all = LF_ARCHS_STRING, cur;
  for (char c : all) {
    if (c == '_' || c == ';' || c == ',' || c == ' ') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(c);
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

bool built_sm90a() {
  for (const auto& a : built_archs())
    if (a == "90a") return true;
  return false;
}

std::string cutlass_version() {
  return std::to_string(CUTLASS_MAJOR) + "." + std::to_string(CUTLASS_MINOR) + "." + std::to_string(CUTLASS_PATCH);
}

struct DeviceInfo {
  int major = 0, sms = 0;
};

DeviceInfo device_info(int dev) {
  static DeviceInfo cache[64];
  static bool known[64] = {};
  if (dev >= 0 && dev < 64 && known[dev]) return cache[dev];
  DeviceInfo d;
  cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev);
  if (dev >= 0 && dev < 64) {
    cache[dev] = d;
    known[dev] = true;
  }
  return d;
}

lf::DType dtype_of(const at::Tensor& t) {
  if (t.scalar_type() == at::kHalf) return lf::DType::kHalf;
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, "lora_fused CUDA kernels support float16 and bfloat16, got ",
              t.scalar_type());
  return lf::DType::kBFloat16;
}

void check_on(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.is_cuda(), "lora_fused CUDA: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), "lora_fused CUDA: ", name, " is on ", t.device(), ", expected ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "lora_fused CUDA: ", name, " has dtype ", t.scalar_type(),
              ", expected ", ref.scalar_type());
  TORCH_CHECK(t.dim() == 2, "lora_fused CUDA: ", name, " must be 2-D, got ", t.dim(), " dims");
}

// The big operands are streamed by TMA / 16-byte cp.async: contiguous, 16-byte aligned rows (the backend
// copies a tensor that is not, and says why, before calling in).
void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(0) >= t.size(1) &&
                  lf::rows_16b_aligned(reinterpret_cast<uint64_t>(t.data_ptr()), t.stride(0), t.stride(1),
                                       static_cast<int>(t.element_size())),
              "lora_fused CUDA: ", name, " needs contiguous rows with a 16-byte aligned start and row stride (got ",
              "strides ", t.strides(), ")");
}

void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous() && reinterpret_cast<uint64_t>(t.data_ptr()) % 16 == 0, "lora_fused CUDA: ", name,
              " must be contiguous and 16-byte aligned");
}

void check_size(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v < (int64_t{1} << 31), "lora_fused CUDA: ", what, " = ", v, " does not fit in int32");
}

lf::Slices make_slices(const std::vector<int64_t>& s, int64_t n_out, int64_t b_rows) {
  TORCH_CHECK(s.size() % 2 == 0 && !s.empty() && s.size() / 2 <= lf::kMaxTargets,
              "lora_fused CUDA: lora_slices must hold 1 to ", lf::kMaxTargets, " (offset, size) pairs");
  lf::Slices sl{};
  sl.ntgt = static_cast<int>(s.size() / 2);
  int64_t boff = 0;
  for (int t = 0; t < sl.ntgt; ++t) {
    const int64_t off = s[2 * t], cnt = s[2 * t + 1];
    TORCH_CHECK(off >= 0 && cnt >= 0 && off + cnt <= n_out, "lora_fused CUDA: slice (", off, ", ", cnt,
                ") outside the ", n_out, " output columns");
    sl.off[t] = static_cast<int>(off);
    sl.cnt[t] = static_cast<int>(cnt);
    sl.boff[t] = static_cast<int>(boff);
    boff += cnt;
  }
  TORCH_CHECK(boff == b_rows, "lora_fused CUDA: lora_B has ", b_rows, " rows but the slices cover ", boff);
  return sl;
}

lf::Dropout make_dropout(double p, const std::optional<at::Tensor>& seed, const at::Device& dev) {
  lf::Dropout d{nullptr, 0u, 1.f, false};
  if (p <= 0.0) return d;
  TORCH_CHECK(p < 1.0, "lora_fused CUDA: dropout_p must be in [0, 1), got ", p);
  TORCH_CHECK(seed.has_value() && seed->defined(), "lora_fused CUDA: dropout_p > 0 needs a seed tensor");
  TORCH_CHECK(seed->is_cuda() && seed->device() == dev && seed->scalar_type() == at::kLong && seed->numel() >= 1,
              "lora_fused CUDA: the seed must be an int64 tensor on ", dev);
  d.seed = seed->data_ptr<int64_t>();
  // round half to even, like Python's round() in the torch backend; p is quantized to 1/65536
  const double thr = std::nearbyint(p * 65536.0);
  d.thr = static_cast<uint32_t>(thr > 65535.0 ? 65535.0 : thr);
  d.inv = static_cast<float>(1.0 / (1.0 - p));
  d.on = true;
  return d;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "lora_fused CUDA: ", what, " failed: ", cudaGetErrorString(err));
}

cudaError_t run_gemm(bool sm90, lf::DType dt, bool dx, const lf::GemmArgs& a, cudaStream_t stream) {
  using lf::DType;
  if (sm90) {
    if (dt == DType::kHalf) return dx ? lf::gemm_sm90<DType::kHalf, true>(a, stream) : lf::gemm_sm90<DType::kHalf, false>(a, stream);
    return dx ? lf::gemm_sm90<DType::kBFloat16, true>(a, stream) : lf::gemm_sm90<DType::kBFloat16, false>(a, stream);
  }
  if (dt == DType::kHalf) return dx ? lf::gemm_sm80<DType::kHalf, true>(a, stream) : lf::gemm_sm80<DType::kHalf, false>(a, stream);
  return dx ? lf::gemm_sm80<DType::kBFloat16, true>(a, stream) : lf::gemm_sm80<DType::kBFloat16, false>(a, stream);
}

at::Tensor f32_workspace(int64_t n, const at::Tensor& like) {
  return at::empty({n > 0 ? n : 1}, like.options().dtype(at::kFloat));
}

struct Adapters {
  int64_t R, r, NB;
  lf::Slices sl;
};

Adapters check_adapters(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                        const std::vector<int64_t>& lora_slices) {
  check_on(lora_A, weight, "lora_A");
  check_on(lora_B, weight, "lora_B");
  check_contiguous(lora_A, "lora_A");
  check_contiguous(lora_B, "lora_B");
  Adapters a{lora_A.size(0), lora_B.size(1), lora_B.size(0), {}};
  TORCH_CHECK(lora_A.size(1) == weight.size(1), "lora_fused CUDA: lora_A has ", lora_A.size(1),
              " columns, weight has ", weight.size(1));
  TORCH_CHECK(a.r >= 1 && a.r <= lf::kMaxRank, "lora_fused CUDA: rank r = ", a.r, " outside [1, ", lf::kMaxRank, "]");
  a.sl = make_slices(lora_slices, weight.size(0), a.NB);
  TORCH_CHECK(a.R == a.sl.ntgt * a.r, "lora_fused CUDA: lora_A has ", a.R, " rows, expected ", a.sl.ntgt, " x ", a.r);
  TORCH_CHECK(weight.size(1) % 8 == 0 && weight.size(0) % 8 == 0, "lora_fused CUDA: in_features (",
              weight.size(1), ") and out_features (", weight.size(0), ") must be multiples of 8");
  return a;
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                           const at::Tensor& lora_B, double scaling, double dropout_p,
                                           const std::optional<at::Tensor>& seed, std::vector<int64_t> lora_slices) {
  const lf::DType dt = dtype_of(x);
  check_on(x, x, "x");
  check_on(weight, x, "weight");
  const Adapters ad = check_adapters(weight, lora_A, lora_B, lora_slices);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "lora_fused CUDA: x has ", K, " features, weight ", weight.size(1));
  check_size(M, "M");
  check_size(K, "K");
  check_size(N, "N");
  check_rows(x, "x");
  check_rows(weight, "weight");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->is_cuda() && bias->device() == x.device() && bias->scalar_type() == x.scalar_type() &&
                    bias->is_contiguous() && bias->numel() == N,
                "lora_fused CUDA: bias must be a contiguous (", N, ",) tensor like x");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int dev = x.device().index();
  const DeviceInfo info = device_info(dev);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  const int R = static_cast<int>(ad.R), r = static_cast<int>(ad.r), R8 = lf::padded_rank_cols(R);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor h = at::empty({M, ad.R}, x.options());
  if (M == 0) return {y, h};
  const lf::Dropout d = make_dropout(dropout_p, seed, x.device());

  // h = x_hat A^T. The GEMMs read h with a 16-byte row stride: for R % 8 != 0 the kernel also writes a padded copy.
  const bool pad = R % 8 != 0;
  at::Tensor h_pad = pad ? at::empty({M, R8}, x.options()) : at::Tensor();
  const lf::DownPlan dplan = lf::plan_down(M, K, R, info.sms);
  at::Tensor ws = dplan.splits > 1 ? f32_workspace(int64_t{dplan.splits} * M * R, x) : at::Tensor();
  check_launch(lf::launch_down(dt, x.data_ptr(), x.stride(0), lora_A.data_ptr(), h.data_ptr(), R,
                               pad ? h_pad.data_ptr() : nullptr, R8, ws.defined() ? ws.data_ptr<float>() : nullptr,
                               static_cast<int>(M), static_cast<int>(K), R, d, dplan, stream),
               "forward h = dropout(x) A^T");

  // s * B packed per target (N x R8): the low-rank B operand of the fused GEMM.
  at::Tensor b_packed = at::empty({N, R8}, x.options());
  check_launch(lf::launch_pack_b(dt, lora_B.data_ptr(), b_packed.data_ptr(), R8, static_cast<int>(N), R, r, ad.sl,
                                 static_cast<float>(scaling), stream),
               "forward pack s*B");

  lf::GemmArgs a{};
  a.a = x.data_ptr();
  a.lda = x.stride(0);
  a.b = weight.data_ptr();
  a.ldb = weight.stride(0);
  a.la = pad ? h_pad.data_ptr() : h.data_ptr();
  a.ldla = pad ? R8 : R;
  a.lb = b_packed.data_ptr();
  a.ldlb = R8;
  a.d = y.data_ptr();
  a.ldd = N;
  a.bias = has_bias ? bias->data_ptr() : nullptr;
  a.M = static_cast<int>(M);
  a.N = static_cast<int>(N);
  a.Kred = static_cast<int>(K);
  a.R = R;
  a.sl = ad.sl;
  a.r = r;
  a.drop = lf::Dropout{nullptr, 0u, 1.f, false};
  a.sms = info.sms;
  check_launch(run_gemm(info.major == 9 && built_sm90a(), dt, false, a, stream), "forward y = x W^T + b + s h B^T");
  return {y, h};
}

std::vector<std::optional<at::Tensor>> backward(const at::Tensor& grad_y, const std::optional<at::Tensor>& x_opt,
                                                const at::Tensor& weight, const at::Tensor& lora_A,
                                                const at::Tensor& lora_B, const std::optional<at::Tensor>& h_opt,
                                                double scaling, double dropout_p,
                                                const std::optional<at::Tensor>& seed,
                                                std::vector<int64_t> lora_slices, std::vector<bool> needs) {
  TORCH_CHECK(needs.size() == 5, "lora_fused CUDA: needs must have 5 entries (dx, dW, db, dA, dB)");
  const bool need_dx = needs[0], need_dw = needs[1], need_db = needs[2], need_da = needs[3], need_dbl = needs[4];
  const lf::DType dt = dtype_of(grad_y);
  check_on(grad_y, grad_y, "grad_y");
  check_on(weight, grad_y, "weight");
  const Adapters ad = check_adapters(weight, lora_A, lora_B, lora_slices);
  const int64_t M = grad_y.size(0), N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(grad_y.size(1) == N, "lora_fused CUDA: grad_y has ", grad_y.size(1), " columns, weight ", N, " rows");
  check_size(M, "M");
  check_size(K, "K");
  check_size(N, "N");
  const bool has_x = x_opt.has_value() && x_opt->defined();
  const bool has_h = h_opt.has_value() && h_opt->defined();
  TORCH_CHECK(has_x || !(need_da || need_dw), "lora_fused CUDA: x is needed for dA and dW");
  TORCH_CHECK(has_h || !need_dbl, "lora_fused CUDA: h is needed for dB");
  if (has_x) {
    check_on(*x_opt, grad_y, "x");
    TORCH_CHECK(x_opt->size(0) == M && x_opt->size(1) == K, "lora_fused CUDA: x has shape ", x_opt->sizes(),
                ", expected (", M, ", ", K, ")");
    check_rows(*x_opt, "x");
  }
  if (has_h) {
    check_on(*h_opt, grad_y, "h");
    TORCH_CHECK(h_opt->size(0) == M && h_opt->size(1) == ad.R, "lora_fused CUDA: h has shape ", h_opt->sizes(),
                ", expected (", M, ", ", ad.R, ")");
    TORCH_CHECK(h_opt->stride(1) == 1, "lora_fused CUDA: h must have contiguous rows");
  }
  check_rows(grad_y, "grad_y");
  check_rows(weight, "weight");

  const c10::cuda::CUDAGuard guard(grad_y.device());
  const int dev = grad_y.device().index();
  const DeviceInfo info = device_info(dev);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  const int R = static_cast<int>(ad.R), r = static_cast<int>(ad.r), R8 = lf::padded_rank_cols(R);
  const int Mi = static_cast<int>(M), Ki = static_cast<int>(K), Ni = static_cast<int>(N);
  const float s = static_cast<float>(scaling);
  const bool need_dh = need_dx || need_da;
  const lf::Dropout d = need_dh && M > 0 ? make_dropout(dropout_p, seed, grad_y.device()) : lf::Dropout{};
  const float inv = d.on ? d.inv : 1.f;

  std::optional<at::Tensor> dx, dW, db, dA, dB;
  if (M == 0) {
    if (need_dx) dx = at::empty({0, K}, grad_y.options());
    if (need_da) dA = at::zeros_like(lora_A);
    if (need_dbl) dB = at::zeros_like(lora_B);
    if (need_dw) dW = at::zeros_like(weight);
    if (need_db) db = at::zeros({N}, grad_y.options());
    return {dx, dW, db, dA, dB};
  }

  // 1. dh' = s g B / (1-p) (M x R8, padding zeroed) and dB, from one read of g.
  const lf::DhDbPlan hplan = lf::plan_dh_db(M, ad.sl, r, info.sms);
  // Targets that own no output column (an empty slice) leave dh' = 0; the kernel only visits owned columns.
  at::Tensor dh = !need_dh ? at::Tensor()
                  : hplan.jb_total < ad.sl.ntgt ? at::zeros({M, R8}, grad_y.options())
                                                : at::empty({M, R8}, grad_y.options());
  at::Tensor dB_out = need_dbl ? at::empty_like(lora_B) : at::Tensor();
  at::Tensor ws_dh = need_dh && hplan.jb_max > 1 ? f32_workspace(int64_t{hplan.jb_max} * M * R, grad_y) : at::Tensor();
  at::Tensor ws_db = need_dbl && hplan.m_blocks > 1 ? f32_workspace(int64_t{hplan.m_blocks} * ad.NB * r, grad_y)
                                                     : at::Tensor();
  if (need_dh || need_dbl) {
    check_launch(lf::launch_dh_db(dt, grad_y.data_ptr(), grad_y.stride(0), has_h ? h_opt->data_ptr() : nullptr,
                                  has_h ? h_opt->stride(0) : 0, lora_B.data_ptr(), need_dh ? dh.data_ptr() : nullptr,
                                  R8, need_dbl ? dB_out.data_ptr() : nullptr,
                                  ws_dh.defined() ? ws_dh.data_ptr<float>() : nullptr,
                                  ws_db.defined() ? ws_db.data_ptr<float>() : nullptr, Mi, R, r, ad.sl, s, inv,
                                  need_dh, need_dbl, hplan, stream),
                 "backward dh/dB");
  }

  // 2. dx = g W + mask * (dh' A): the fused GEMM, the mask regenerated from the seed.
  if (need_dx) {
    at::Tensor out = at::empty({M, K}, grad_y.options());
    lf::GemmArgs a{};
    a.a = grad_y.data_ptr();
    a.lda = grad_y.stride(0);
    a.b = weight.data_ptr();
    a.ldb = weight.stride(0);
    a.la = dh.data_ptr();
    a.ldla = R8;
    a.lb = lora_A.data_ptr();
    a.ldlb = K;
    a.d = out.data_ptr();
    a.ldd = K;
    a.bias = nullptr;
    a.M = Mi;
    a.N = Ki;
    a.Kred = Ni;
    a.R = R;
    a.sl = ad.sl;
    a.r = r;
    a.drop = d;
    a.sms = info.sms;
    check_launch(run_gemm(info.major == 9 && built_sm90a(), dt, true, a, stream), "backward dx");
    dx = out;
  }

  // 3. dA = dh'^T (mask * x) from one read of x, then the fixed-order sums of the split reductions.
  at::Tensor dA_out = need_da ? at::empty_like(lora_A) : at::Tensor();
  at::Tensor ws_da;
  lf::DaPlan aplan{};
  if (need_da) {
    aplan = lf::plan_da(M, K, R, info.sms);
    if (aplan.m_blocks > 1) ws_da = f32_workspace(int64_t{aplan.m_blocks} * R * K, grad_y);
    check_launch(lf::launch_da(dt, dh.data_ptr(), R8, x_opt->data_ptr(), x_opt->stride(0), dA_out.data_ptr(),
                               ws_da.defined() ? ws_da.data_ptr<float>() : nullptr, Mi, Ki, R, d, aplan, stream),
                 "backward dA");
  }
  const int64_t n_db = ws_db.defined() ? ad.NB * r : 0, n_da = ws_da.defined() ? int64_t{R} * K : 0;
  if (n_db + n_da > 0) {
    check_launch(lf::launch_finish_grads(dt, ws_db.defined() ? ws_db.data_ptr<float>() : nullptr,
                                         ws_db.defined() ? dB_out.data_ptr() : nullptr, n_db, hplan.m_blocks, s,
                                         ws_da.defined() ? ws_da.data_ptr<float>() : nullptr,
                                         ws_da.defined() ? dA_out.data_ptr() : nullptr, n_da, aplan.m_blocks, stream),
                 "backward dA/dB reduction");
  }
  if (need_da) dA = dA_out;
  if (need_dbl) dB = dB_out;
  // An unfrozen base (rare in LoRA training) uses cuBLAS through ATen.
  if (need_dw) dW = at::mm(grad_y.t(), *x_opt);
  if (need_db) db = grad_y.sum(0);
  return {dx, dW, db, dA, dB};
}

at::Tensor keep_mask(const at::Tensor& seed, int64_t M, int64_t K, double p) {
  TORCH_CHECK(seed.is_cuda(), "lora_fused CUDA: keep_mask needs a CUDA seed tensor");
  check_size(M, "M");
  check_size(K, "K");
  const c10::cuda::CUDAGuard guard(seed.device());
  at::Tensor out = at::empty({M, K}, seed.options().dtype(at::kByte));
  lf::Dropout d = make_dropout(p, seed, seed.device());
  if (!d.on) return out.fill_(1).to(at::kBool);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(seed.device().index()).stream();
  check_launch(lf::launch_keep_mask(out.data_ptr<uint8_t>(), static_cast<int>(M), static_cast<int>(K), d, stream),
               "keep_mask");
  return out.to(at::kBool);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lora_fused CUDA kernels (fused LoRA linear forward/backward on CUTLASS/CuTe, fp16/bf16, sm_80+)";
  m.def("forward", &forward, "y, h = forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_slices)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("lora_A"), py::arg("lora_B"), py::arg("scaling"),
        py::arg("dropout_p"), py::arg("seed"), py::arg("lora_slices"));
  m.def("backward", &backward,
        "[dx, dW, db, dA, dB] = backward(grad_y, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, "
        "lora_slices, needs); x may be None without dA/dW, h None without dB",
        py::arg("grad_y"), py::arg("x"), py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("h"),
        py::arg("scaling"), py::arg("dropout_p"), py::arg("seed"), py::arg("lora_slices"), py::arg("needs"));
  m.def("keep_mask", &keep_mask, "bool keep mask (M, K) of the kernels' dropout for a seed (testing aid)",
        py::arg("seed"), py::arg("M"), py::arg("K"), py::arg("p"));
  m.def("built_archs", &built_archs, "the CUDA archs this extension was compiled for");
  m.def("cutlass_version", &cutlass_version, "the CUTLASS version whose headers the kernels were compiled with");
  m.attr("max_rank") = lf::kMaxRank;
  m.attr("max_targets") = lf::kMaxTargets;
}
