// Python binding of the CUDA backend (module lora_fused._C). The torch custom op layer
// (lora_fused/ops/lora_linear.py) dispatches to lora_fused/backends/cuda_backend.py, which calls these
// functions; they check the tensors, allocate outputs, and launch the kernels on the current CUDA stream.
// Lighter than <torch/extension.h> (which pulls in the whole C++ frontend): ATen, torch's pybind casters for
// at::Tensor, and pybind11's std::optional / std::vector casters. Halves the compile time of this file.
#include <ATen/ATen.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "lora_launch.h"

// csrc_build.py defines LORA_FUSED_ARCHS as one token, the arch list joined by '_' (e.g. 80_90a).
#define LF_STRINGIFY2(x) #x
#define LF_STRINGIFY(x) LF_STRINGIFY2(x)
#ifdef LORA_FUSED_ARCHS
#define LF_ARCHS_STRING LF_STRINGIFY(LORA_FUSED_ARCHS)
#else
#define LF_ARCHS_STRING "unknown"
#endif

namespace lf = lora_fused;

namespace {

lf::DType dtype_of(const at::Tensor& t) {
  if (t.scalar_type() == at::kHalf) return lf::DType::kHalf;
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, "lora_fused CUDA kernels support float16 and bfloat16, got ",
              t.scalar_type());
  return lf::DType::kBFloat16;
}

void check_operand(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.is_cuda(), "lora_fused CUDA: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), "lora_fused CUDA: ", name, " is on ", t.device(), ", expected ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "lora_fused CUDA: ", name, " has dtype ", t.scalar_type(),
              ", expected ", ref.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "lora_fused CUDA: ", name, " must be contiguous");
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

lf::Dropout make_dropout(double p, const std::optional<at::Tensor>& seed, const at::Tensor& x) {
  lf::Dropout d{nullptr, 0u, 1.f, false};
  if (p <= 0.0) return d;
  TORCH_CHECK(p < 1.0, "lora_fused CUDA: dropout_p must be in [0, 1), got ", p);
  TORCH_CHECK(seed.has_value() && seed->defined(), "lora_fused CUDA: dropout_p > 0 needs a seed tensor");
  TORCH_CHECK(seed->is_cuda() && seed->device() == x.device() && seed->scalar_type() == at::kLong &&
                  seed->numel() >= 1,
              "lora_fused CUDA: the seed must be an int64 tensor on ", x.device());
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

struct Shapes {
  int64_t M, K, N, r, R;
};

Shapes check_all(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && lora_A.dim() == 2 && lora_B.dim() == 2,
              "lora_fused CUDA: x, weight, lora_A, lora_B must be 2-D");
  dtype_of(x);
  check_operand(x, x, "x");
  check_operand(weight, x, "weight");
  check_operand(lora_A, x, "lora_A");
  check_operand(lora_B, x, "lora_B");
  Shapes s{x.size(0), x.size(1), weight.size(0), lora_B.size(1), lora_A.size(0)};
  TORCH_CHECK(weight.size(1) == s.K && lora_A.size(1) == s.K, "lora_fused CUDA: in_features mismatch");
  TORCH_CHECK(s.r >= 1 && s.r <= lf::kMaxRank, "lora_fused CUDA: rank r = ", s.r, " outside [1, ", lf::kMaxRank,
              "]");
  TORCH_CHECK(s.R % s.r == 0, "lora_fused CUDA: lora_A rows ", s.R, " not a multiple of r = ", s.r);
  check_size(s.M, "M");
  check_size(s.K, "K");
  check_size(s.N, "N");
  return s;
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                           const at::Tensor& lora_B, double scaling, double dropout_p,
                                           const std::optional<at::Tensor>& seed, std::vector<int64_t> lora_slices) {
  const Shapes s = check_all(x, weight, lora_A, lora_B);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_operand(*bias, x, "bias");
    TORCH_CHECK(bias->numel() == s.N, "lora_fused CUDA: bias has ", bias->numel(), " elements, expected ", s.N);
  }
  const lf::Slices sl = make_slices(lora_slices, s.N, lora_B.size(0));
  TORCH_CHECK(s.R == sl.ntgt * s.r, "lora_fused CUDA: lora_A has ", s.R, " rows, expected ", sl.ntgt, " x ", s.r);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({s.M, s.N}, x.options());
  at::Tensor h = at::empty({s.M, s.R}, x.options());
  if (s.M == 0) return {y, h};
  const lf::Dropout d = make_dropout(dropout_p, seed, x);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  check_launch(lf::launch_forward(dtype_of(x), x.data_ptr(), weight.data_ptr(), has_bias ? bias->data_ptr() : nullptr,
                                  lora_A.data_ptr(), lora_B.data_ptr(), y.data_ptr(), h.data_ptr(),
                                  static_cast<int>(s.M), static_cast<int>(s.N), static_cast<int>(s.K),
                                  static_cast<int>(s.r), sl, static_cast<float>(scaling), d, stream),
               "forward");
  return {y, h};
}

std::vector<std::optional<at::Tensor>> backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                const at::Tensor& weight, const at::Tensor& lora_A,
                                                const at::Tensor& lora_B, const at::Tensor& h, double scaling,
                                                double dropout_p, const std::optional<at::Tensor>& seed,
                                                std::vector<int64_t> lora_slices, std::vector<bool> needs) {
  const Shapes s = check_all(x, weight, lora_A, lora_B);
  check_operand(grad_y, x, "grad_y");
  check_operand(h, x, "h");
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == s.M && grad_y.size(1) == s.N, "lora_fused CUDA: grad_y shape");
  TORCH_CHECK(h.dim() == 2 && h.size(0) == s.M && h.size(1) == s.R, "lora_fused CUDA: h shape");
  TORCH_CHECK(needs.size() == 5, "lora_fused CUDA: needs must have 5 entries (dx, dW, db, dA, dB)");
  const lf::Slices sl = make_slices(lora_slices, s.N, lora_B.size(0));
  TORCH_CHECK(s.R == sl.ntgt * s.r, "lora_fused CUDA: lora_A has ", s.R, " rows, expected ", sl.ntgt, " x ", s.r);
  const bool need_dx = needs[0], need_dw = needs[1], need_db = needs[2], need_da = needs[3], need_dbl = needs[4];
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const lf::DType dt = dtype_of(x);
  const int M = static_cast<int>(s.M), N = static_cast<int>(s.N), K = static_cast<int>(s.K);
  const int r = static_cast<int>(s.r), R = static_cast<int>(s.R);
  const float sc = static_cast<float>(scaling);
  const lf::Dropout d = (need_dx || need_da) && M > 0 ? make_dropout(dropout_p, seed, x) : lf::Dropout{};

  std::optional<at::Tensor> dx, dW, db, dA, dB;
  at::Tensor dh;
  at::Tensor dB32;
  if (need_dbl) dB32 = at::zeros({lora_B.size(0), s.r}, x.options().dtype(at::kFloat));
  if (M > 0 && (need_dx || need_da || need_dbl)) {
    dh = at::empty({s.M, s.R}, x.options());
    check_launch(lf::launch_dh_db(dt, grad_y.data_ptr(), h.data_ptr(), lora_B.data_ptr(), dh.data_ptr(),
                                  need_dbl ? dB32.data_ptr<float>() : nullptr, M, N, r, sl, sc, stream),
                 "backward dh/dB");
  }
  if (need_dx) {
    at::Tensor out = at::empty({s.M, s.K}, x.options());
    if (M > 0)
      check_launch(lf::launch_dx(dt, grad_y.data_ptr(), weight.data_ptr(), dh.data_ptr(), lora_A.data_ptr(),
                                 out.data_ptr(), M, N, K, R, d, stream),
                   "backward dx");
    dx = out;
  }
  if (need_da) {
    at::Tensor dA32 = at::zeros({s.R, s.K}, x.options().dtype(at::kFloat));
    int num_sms = 0;
    cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, x.device().index());
    if (M > 0) {
      check_launch(lf::launch_da(dt, dh.data_ptr(), x.data_ptr(), dA32.data_ptr<float>(), M, K, R, d, num_sms, stream),
                   "backward dA");
    }
    dA = (d.on ? dA32.mul_(d.inv) : dA32).to(x.scalar_type());
  }
  if (need_dbl) dB = dB32.mul_(sc).to(x.scalar_type());
  // An unfrozen base (rare in LoRA training) uses cuBLAS through ATen.
  if (need_dw) dW = at::mm(grad_y.t(), x);
  if (need_db) db = grad_y.sum(0);
  return {dx, dW, db, dA, dB};
}

at::Tensor keep_mask(const at::Tensor& seed, int64_t M, int64_t K, double p) {
  TORCH_CHECK(seed.is_cuda(), "lora_fused CUDA: keep_mask needs a CUDA seed tensor");
  check_size(M, "M");
  check_size(K, "K");
  const c10::cuda::CUDAGuard guard(seed.device());
  at::Tensor out = at::empty({M, K}, seed.options().dtype(at::kByte));
  lf::Dropout d = make_dropout(p, seed, seed);
  if (!d.on) return out.fill_(1).to(at::kBool);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(seed.device().index()).stream();
  check_launch(lf::launch_keep_mask(out.data_ptr<uint8_t>(), static_cast<int>(M), static_cast<int>(K), d, stream),
               "keep_mask");
  return out.to(at::kBool);
}

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lora_fused CUDA kernels (fused LoRA linear forward/backward, fp16/bf16, sm_80+)";
  m.def("forward", &forward, "y, h = forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_slices)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("lora_A"), py::arg("lora_B"), py::arg("scaling"),
        py::arg("dropout_p"), py::arg("seed"), py::arg("lora_slices"));
  m.def("backward", &backward,
        "[dx, dW, db, dA, dB] = backward(grad_y, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, "
        "lora_slices, needs)",
        py::arg("grad_y"), py::arg("x"), py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("h"),
        py::arg("scaling"), py::arg("dropout_p"), py::arg("seed"), py::arg("lora_slices"), py::arg("needs"));
  m.def("keep_mask", &keep_mask, "bool keep mask (M, K) of the kernels' dropout for a seed (testing aid)",
        py::arg("seed"), py::arg("M"), py::arg("K"), py::arg("p"));
  m.def("built_archs", &built_archs, "the CUDA archs this extension was compiled for");
  m.attr("max_rank") = lf::kMaxRank;
  m.attr("max_targets") = lf::kMaxTargets;
}
