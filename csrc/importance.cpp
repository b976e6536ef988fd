// torch glue of the importance op: the `lora2::importance_update` schema, its CPU kernel, and
// (built with LORA2_WITH_CUDA) the CUDA dispatch that calls importance_cuda.cu's launcher.
//
// The op reads λ, B₁, A₂ and their gradients of every adapted module in place (tensor lists,
// no torch.stack copies), updates the six EMA state tensors in place and returns
// (scores (M, r) float32, skipped int32 scalar). importance.h states the formulas;
// lora2_kernels/reference.py is the oracle the tests compare against.
//
// No CUDA header is included here: the CUDA stream comes from c10's device-generic interface,
// so this file compiles against a CPU build of torch too (CI compiles it that way).
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "importance.h"

namespace lora2 {
namespace {

using OptionalTensorList = c10::List<std::optional<at::Tensor>>;

struct Shapes {
  int64_t modules, r, k;
};

// Everything is checked before anything is touched: a bad call changes no state.
Shapes check_inputs(at::TensorList singular_values, at::TensorList q_up, at::TensorList p_down,
                    const OptionalTensorList& singular_values_grad, const OptionalTensorList& q_up_grad,
                    const OptionalTensorList& p_down_grad, const std::vector<at::Tensor>& state) {
  const int64_t modules = static_cast<int64_t>(singular_values.size());
  TORCH_CHECK(modules > 0, "lora2::importance_update needs at least one module");
  TORCH_CHECK(static_cast<int64_t>(q_up.size()) == modules && static_cast<int64_t>(p_down.size()) == modules &&
                  static_cast<int64_t>(singular_values_grad.size()) == modules &&
                  static_cast<int64_t>(q_up_grad.size()) == modules &&
                  static_cast<int64_t>(p_down_grad.size()) == modules,
              "lora2::importance_update: the six tensor lists must have one entry per module (", modules, ")");
  const int64_t r = singular_values[0].numel();
  TORCH_CHECK(r > 0 && q_up[0].dim() == 2 && q_up[0].size(0) == r, "lora2::importance_update: q_up must be r × k");
  const int64_t k = q_up[0].size(1);
  const at::Tensor& first = singular_values[0];
  TORCH_CHECK(first.scalar_type() == at::kFloat || first.scalar_type() == at::kHalf ||
                  first.scalar_type() == at::kBFloat16,
              "lora2::importance_update: parameters must be float32, float16 or bfloat16, got ", first.scalar_type());
  auto check_param = [&](const at::Tensor& t, at::IntArrayRef shape, const char* name, int64_t m) {
    TORCH_CHECK(t.sizes() == shape, "lora2::importance_update: module ", m, " ", name, " has shape ", t.sizes(),
                ", expected ", shape, " (all modules must share r and k)");
    TORCH_CHECK(t.is_contiguous(), "lora2::importance_update: module ", m, " ", name, " must be contiguous");
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), "lora2::importance_update: module ", m, " ", name, " is ",
                t.scalar_type(), " but module 0 is ", first.scalar_type(), "; give all adapters one dtype");
    TORCH_CHECK(t.device() == first.device(), "lora2::importance_update: module ", m, " ", name, " is on ",
                t.device(), " but module 0 is on ", first.device());
  };
  for (int64_t m = 0; m < modules; ++m) {
    check_param(singular_values[m], {r}, "singular_values", m);
    check_param(q_up[m], {r, k}, "q_up", m);
    check_param(p_down[m], {k, r}, "p_down", m);
    const std::optional<at::Tensor> grads[3] = {singular_values_grad.get(m), q_up_grad.get(m), p_down_grad.get(m)};
    const at::Tensor* params[3] = {&singular_values[m], &q_up[m], &p_down[m]};
    const char* names[3] = {"singular_values.grad", "q_up.grad", "p_down.grad"};
    for (int i = 0; i < 3; ++i) {
      if (grads[i].has_value() && grads[i]->defined()) check_param(*grads[i], params[i]->sizes(), names[i], m);
    }
  }
  const std::vector<std::vector<int64_t>> shapes = {{modules, r}, {modules, r}, {modules, r, k},
                                                    {modules, r, k}, {modules, k, r}, {modules, k, r}};
  for (size_t i = 0; i < state.size(); ++i) {
    TORCH_CHECK(state[i].scalar_type() == at::kFloat && state[i].is_contiguous() &&
                    state[i].sizes() == at::IntArrayRef(shapes[i]) && state[i].device() == first.device(),
                "lora2::importance_update: state tensor ", i, " must be a contiguous float32 tensor of shape ",
                at::IntArrayRef(shapes[i]), " on ", first.device(), ", got ", state[i].scalar_type(), " ",
                state[i].sizes(), " on ", state[i].device());
  }
  return {modules, r, k};
}

const void* grad_ptr(const OptionalTensorList& grads, int64_t m) {
  const std::optional<at::Tensor> g = grads.get(m);
  return (g.has_value() && g->defined()) ? g->data_ptr() : nullptr;
}

// --- CPU ----------------------------------------------------------------------------------------

inline float update_element(float value, float grad, float* ema, float* unc, float beta1, float beta2, bool update) {
  if (update) {
    const float sensitivity = std::fabs(value * grad);
    const float e = beta1 * *ema + (1.0f - beta1) * sensitivity;
    *ema = e;
    *unc = beta2 * *unc + (1.0f - beta2) * std::fabs(sensitivity - e);
  }
  return *ema * *unc;
}

// One module's inputs as raw pointers (a missing gradient is nullptr and reads as zero).
template <typename scalar_t>
struct ModuleView {
  const scalar_t *lambda, *q_up, *p_down, *lambda_grad, *q_up_grad, *p_down_grad;

  static float at(const scalar_t* p, int64_t i) { return static_cast<float>(p[i]); }
  static float grad_at(const scalar_t* p, int64_t i) { return p == nullptr ? 0.0f : static_cast<float>(p[i]); }
};

template <typename scalar_t>
const scalar_t* optional_ptr(const OptionalTensorList& grads, int64_t m) {
  const std::optional<at::Tensor> g = grads.get(m);
  return (g.has_value() && g->defined()) ? g->const_data_ptr<scalar_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> importance_update_cpu(
    at::TensorList singular_values, at::TensorList q_up, at::TensorList p_down,
    const OptionalTensorList& singular_values_grad, const OptionalTensorList& q_up_grad,
    const OptionalTensorList& p_down_grad, at::Tensor& ema_lambda, at::Tensor& unc_lambda, at::Tensor& ema_q_up,
    at::Tensor& unc_q_up, at::Tensor& ema_p_down, at::Tensor& unc_p_down, double beta1_, double beta2_) {
  const Shapes s = check_inputs(singular_values, q_up, p_down, singular_values_grad, q_up_grad, p_down_grad,
                                {ema_lambda, unc_lambda, ema_q_up, unc_q_up, ema_p_down, unc_p_down});
  const int64_t r = s.r, k = s.k;
  const float beta1 = static_cast<float>(beta1_), beta2 = static_cast<float>(beta2_);
  at::Tensor scores = at::empty({s.modules, r}, ema_lambda.options());
  at::Tensor skipped = at::zeros({}, ema_lambda.options().dtype(at::kInt));
  float* out = scores.data_ptr<float>();
  float *el = ema_lambda.data_ptr<float>(), *ul = unc_lambda.data_ptr<float>();
  float *eb = ema_q_up.data_ptr<float>(), *ub = unc_q_up.data_ptr<float>();
  float *ea = ema_p_down.data_ptr<float>(), *ua = unc_p_down.data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, singular_values[0].scalar_type(), "importance_update_cpu",
                                  [&] {
    using View = ModuleView<scalar_t>;
    std::vector<View> views(s.modules);
    for (int64_t m = 0; m < s.modules; ++m) {
      views[m] = {singular_values[m].const_data_ptr<scalar_t>(), q_up[m].const_data_ptr<scalar_t>(),
                  p_down[m].const_data_ptr<scalar_t>(), optional_ptr<scalar_t>(singular_values_grad, m),
                  optional_ptr<scalar_t>(q_up_grad, m), optional_ptr<scalar_t>(p_down_grad, m)};
    }
    bool finite = true;  // phase 1, as on the GPU: any non-finite input skips the whole update
    for (int64_t m = 0; m < s.modules && finite; ++m) {
      const View& v = views[m];
      // The sensitivity θ·g itself must be finite: finite θ and g can still overflow (1e30 · 1e30), and
      // an infinite EMA turns into NaN for good at the next update. (A NaN or inf θ or g makes it so too.)
      for (int64_t i = 0; i < r; ++i) {
        finite = finite && std::isfinite(View::at(v.lambda, i) * View::grad_at(v.lambda_grad, i));
      }
      for (int64_t i = 0; i < r * k; ++i) {
        finite = finite && std::isfinite(View::at(v.q_up, i) * View::grad_at(v.q_up_grad, i)) &&
                 std::isfinite(View::at(v.p_down, i) * View::grad_at(v.p_down_grad, i));
      }
    }
    skipped.fill_(finite ? 0 : 1);
    // Phase 2: a few hundred modules of r·(2k+1) elements: one thread's work, no parallel_for overhead.
    for (int64_t m = 0; m < s.modules; ++m) {
      const View& v = views[m];
      for (int64_t i = 0; i < r; ++i) {
        const int64_t li = m * r + i;
        const float score = update_element(View::at(v.lambda, i), View::grad_at(v.lambda_grad, i), &el[li], &ul[li],
                                           beta1, beta2, finite);
        float b1_sum = 0.0f, a2_sum = 0.0f;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t b = i * k + j, a = j * r + i;
          b1_sum += update_element(View::at(v.q_up, b), View::grad_at(v.q_up_grad, b), &eb[m * r * k + b],
                                   &ub[m * r * k + b], beta1, beta2, finite);
          a2_sum += update_element(View::at(v.p_down, a), View::grad_at(v.p_down_grad, a), &ea[m * k * r + a],
                                   &ua[m * k * r + a], beta1, beta2, finite);
        }
        out[li] = score + b1_sum / static_cast<float>(k) + a2_sum / static_cast<float>(k);
      }
    }
  });
  return {scores, skipped};
}

// --- CUDA ---------------------------------------------------------------------------------------

#ifdef LORA2_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> importance_update_cuda(
    at::TensorList singular_values, at::TensorList q_up, at::TensorList p_down,
    const OptionalTensorList& singular_values_grad, const OptionalTensorList& q_up_grad,
    const OptionalTensorList& p_down_grad, at::Tensor& ema_lambda, at::Tensor& unc_lambda, at::Tensor& ema_q_up,
    at::Tensor& unc_q_up, at::Tensor& ema_p_down, at::Tensor& unc_p_down, double beta1, double beta2) {
  const Shapes s = check_inputs(singular_values, q_up, p_down, singular_values_grad, q_up_grad, p_down_grad,
                                {ema_lambda, unc_lambda, ema_q_up, unc_q_up, ema_p_down, unc_p_down});
  const c10::Device device = singular_values[0].device();
  c10::DeviceGuard guard(device);
  ScalarKind kind = ScalarKind::kFloat32;
  if (singular_values[0].scalar_type() == at::kHalf) kind = ScalarKind::kFloat16;
  if (singular_values[0].scalar_type() == at::kBFloat16) kind = ScalarKind::kBFloat16;

  std::vector<ImportanceChunk> chunks;
  for (int64_t first = 0; first < s.modules; first += kModulesPerChunk) {
    ImportanceChunk chunk{};
    chunk.first_module = static_cast<int>(first);
    chunk.num_modules = static_cast<int>(std::min<int64_t>(kModulesPerChunk, s.modules - first));
    for (int m = 0; m < chunk.num_modules; ++m) {
      chunk.singular_values[m] = singular_values[first + m].const_data_ptr();
      chunk.q_up[m] = q_up[first + m].const_data_ptr();
      chunk.p_down[m] = p_down[first + m].const_data_ptr();
      chunk.singular_values_grad[m] = grad_ptr(singular_values_grad, first + m);
      chunk.q_up_grad[m] = grad_ptr(q_up_grad, first + m);
      chunk.p_down_grad[m] = grad_ptr(p_down_grad, first + m);
    }
    chunks.push_back(chunk);
  }
  at::Tensor scores = at::empty({s.modules, s.r}, ema_lambda.options());
  at::Tensor skipped = at::empty({}, ema_lambda.options().dtype(at::kInt));
  const ImportanceState state{ema_lambda.data_ptr<float>(), unc_lambda.data_ptr<float>(),
                              ema_q_up.data_ptr<float>(),   unc_q_up.data_ptr<float>(),
                              ema_p_down.data_ptr<float>(), unc_p_down.data_ptr<float>()};
  void* stream = c10::impl::getDeviceGuardImpl(device.type())->getStream(device).native_handle();
  const int err = launch_importance_update(chunks.data(), static_cast<int>(chunks.size()), static_cast<int>(s.r),
                                           static_cast<int>(s.k), kind, state, static_cast<float>(beta1),
                                           static_cast<float>(beta2), scores.data_ptr<float>(),
                                           skipped.data_ptr<int32_t>(), stream);
  TORCH_CHECK(err == 0, "lora2::importance_update CUDA launch failed: ", cuda_error_string(err));
  return {scores, skipped};
}
#endif

}  // namespace

TORCH_LIBRARY(lora2, m) {
  m.def(
      "importance_update(Tensor[] singular_values, Tensor[] q_up, Tensor[] p_down, Tensor?[] singular_values_grad, "
      "Tensor?[] q_up_grad, Tensor?[] p_down_grad, Tensor(a!) ema_lambda, Tensor(b!) unc_lambda, "
      "Tensor(c!) ema_q_up, Tensor(d!) unc_q_up, Tensor(e!) ema_p_down, Tensor(f!) unc_p_down, float beta1, "
      "float beta2) -> (Tensor scores, Tensor skipped)");
}

TORCH_LIBRARY_IMPL(lora2, CPU, m) { m.impl("importance_update", &importance_update_cpu); }

// Not differentiable (it reads gradients; nothing flows back through it): autograd passes through.
TORCH_LIBRARY_IMPL(lora2, Autograd, m) { m.impl("importance_update", torch::CppFunction::makeFallthrough()); }

#ifdef LORA2_WITH_CUDA
TORCH_LIBRARY_IMPL(lora2, CUDA, m) { m.impl("importance_update", &importance_update_cuda); }
#endif

}  // namespace lora2

// `import lora2_kernels._C` loads this library, which runs the registrations above. The module
// itself has no Python functions: the op is called as torch.ops.lora2.importance_update.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
