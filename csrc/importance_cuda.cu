// CUDA kernels of the importance update (see importance.h for what they compute).
//
// Only CUDA headers here: this file compiles with `nvcc -c -arch=sm_90 importance_cuda.cu` and
// nothing else, which is how CI checks it on machines without a GPU or a CUDA build of torch.
//
// One thread owns one singular value (module m, index i) and walks its row of B₁ and its column
// of A₂ (2k + 1 elements). With M·r threads (≈1,200 for LLaMA-1.1B at r = 8) the whole update
// is two small launches per chunk of 32 modules; every output element is written by exactly one
// thread, so the result is deterministic (no floating-point atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "importance.h"

namespace lora2 {
namespace {

constexpr int kThreads = 128;

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ float load(const void* base, int index) {
  return to_float<T>(static_cast<const T*>(base)[index]);
}

template <typename T>
__device__ __forceinline__ float load_grad(const void* base, int index) {
  return base == nullptr ? 0.0f : load<T>(base, index);
}

// Phase 1: raise *skipped if any value or gradient this thread owns is not finite.
template <typename T>
__global__ void check_finite_kernel(const ImportanceChunk chunk, int r, int k, int32_t* skipped) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= chunk.num_modules * r) return;
  const int m = t / r, i = t % r;
  // The sensitivity θ·g itself must be finite: finite θ and g can still overflow (1e30 · 1e30), and an
  // infinite EMA turns into NaN for good at the next update.
  bool finite = isfinite(load<T>(chunk.singular_values[m], i) * load_grad<T>(chunk.singular_values_grad[m], i));
  for (int j = 0; j < k; ++j) {
    finite = finite && isfinite(load<T>(chunk.q_up[m], i * k + j) * load_grad<T>(chunk.q_up_grad[m], i * k + j)) &&
             isfinite(load<T>(chunk.p_down[m], j * r + i) * load_grad<T>(chunk.p_down_grad[m], j * r + i));
  }
  if (!finite) *skipped = 1;  // every writer stores the same value: a benign race
}

// One element: fold I = |θ·g| into the EMAs (unless skipped) and return its score Ī·Ū.
__device__ __forceinline__ float update_element(float value, float grad, float* ema, float* unc, float beta1,
                                                float beta2, bool update) {
  if (update) {
    const float sensitivity = fabsf(value * grad);
    const float e = beta1 * *ema + (1.0f - beta1) * sensitivity;
    *ema = e;
    *unc = beta2 * *unc + (1.0f - beta2) * fabsf(sensitivity - e);
  }
  return *ema * *unc;
}

// Phase 2: update the EMAs and write score[m, i].
template <typename T>
__global__ void update_kernel(const ImportanceChunk chunk, int r, int k, ImportanceState state, float beta1,
                              float beta2, float* scores, const int32_t* skipped) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= chunk.num_modules * r) return;
  const int m = t / r, i = t % r;
  const int row = chunk.first_module + m;  // module index in the state tensors
  const bool update = *skipped == 0;

  const int li = row * r + i;
  float score = update_element(load<T>(chunk.singular_values[m], i), load_grad<T>(chunk.singular_values_grad[m], i),
                               &state.ema_lambda[li], &state.unc_lambda[li], beta1, beta2, update);
  float b1_sum = 0.0f, a2_sum = 0.0f;
  for (int j = 0; j < k; ++j) {
    const int b = i * k + j;  // B₁[i, j]
    b1_sum += update_element(load<T>(chunk.q_up[m], b), load_grad<T>(chunk.q_up_grad[m], b),
                             &state.ema_q_up[row * r * k + b], &state.unc_q_up[row * r * k + b], beta1, beta2, update);
    const int a = j * r + i;  // A₂[j, i]
    a2_sum += update_element(load<T>(chunk.p_down[m], a), load_grad<T>(chunk.p_down_grad[m], a),
                             &state.ema_p_down[row * k * r + a], &state.unc_p_down[row * k * r + a], beta1, beta2,
                             update);
  }
  scores[li] = score + b1_sum / k + a2_sum / k;
}

template <typename T>
int launch_typed(const ImportanceChunk* chunks, int num_chunks, int r, int k, ImportanceState state, float beta1,
                 float beta2, float* scores, int32_t* skipped, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(skipped, 0, sizeof(int32_t), stream);
  if (err != cudaSuccess) return static_cast<int>(err);
  // Every chunk is checked before any is updated: one non-finite gradient anywhere skips all.
  for (int c = 0; c < num_chunks; ++c) {
    const int blocks = (chunks[c].num_modules * r + kThreads - 1) / kThreads;
    check_finite_kernel<T><<<blocks, kThreads, 0, stream>>>(chunks[c], r, k, skipped);
  }
  for (int c = 0; c < num_chunks; ++c) {
    const int blocks = (chunks[c].num_modules * r + kThreads - 1) / kThreads;
    update_kernel<T><<<blocks, kThreads, 0, stream>>>(chunks[c], r, k, state, beta1, beta2, scores, skipped);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_importance_update(const ImportanceChunk* chunks, int num_chunks, int r, int k, ScalarKind kind,
                             ImportanceState state, float beta1, float beta2, float* scores, int32_t* skipped,
                             void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (kind) {
    case ScalarKind::kFloat32:
      return launch_typed<float>(chunks, num_chunks, r, k, state, beta1, beta2, scores, skipped, s);
    case ScalarKind::kFloat16:
      return launch_typed<__half>(chunks, num_chunks, r, k, state, beta1, beta2, scores, skipped, s);
    case ScalarKind::kBFloat16:
      return launch_typed<__nv_bfloat16>(chunks, num_chunks, r, k, state, beta1, beta2, scores, skipped, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

const char* cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace lora2
