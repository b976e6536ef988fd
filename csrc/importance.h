// The importance update of LoRA²'s rank allocator: the interface between the torch glue
// (importance.cpp) and the CUDA kernels (importance_cuda.cu).
//
// This header includes no torch and no CUDA header on purpose: the .cu file that implements it
// must compile with nvcc alone (CI has nvcc but no CUDA build of torch), and the .cpp glue must
// compile against a CPU build of torch.
//
// What one call does, for M adapted modules with r singular values and inner width k each:
//   for every element θ of λ (r), B₁ (r × k) and A₂ (k × r) of every module, with gradient g:
//     I = |θ·g|,  Ī ← β₁·Ī + (1 − β₁)·I,  Ū ← β₂·Ū + (1 − β₂)·|I − Ī|,  s = Ī·Ū
//   score[m, i] = s(λ_i) + mean_j s(B₁[i, j]) + mean_j s(A₂[j, i])
// If any gradient or value is not finite (an fp16 step the GradScaler skipped, say), nothing is
// updated, *skipped is set to 1 and the scores are those of the unchanged state: one bad step
// can never poison the running averages. The flag stays on the device (no host sync).
#pragma once

#include <cstdint>

namespace lora2 {

// Module pointers travel as kernel arguments (like PyTorch's multi_tensor_apply), in chunks
// small enough for the 4 KiB argument limit: no host-to-device copy of a pointer table, so a
// call can also be captured in a CUDA graph.
constexpr int kModulesPerChunk = 32;

struct ImportanceChunk {
  const void* singular_values[kModulesPerChunk];       // λ: r
  const void* q_up[kModulesPerChunk];                  // B₁: r × k, row-major
  const void* p_down[kModulesPerChunk];                // A₂: k × r, row-major
  const void* singular_values_grad[kModulesPerChunk];  // nullptr: no gradient (counts as zero)
  const void* q_up_grad[kModulesPerChunk];
  const void* p_down_grad[kModulesPerChunk];
  int first_module;  // row of this chunk's first module in the (M, ...) state tensors
  int num_modules;
};

enum class ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The state tensors are float32, contiguous, shaped (M, r), (M, r, k) and (M, k, r).
struct ImportanceState {
  float* ema_lambda;
  float* unc_lambda;
  float* ema_q_up;
  float* unc_q_up;
  float* ema_p_down;
  float* unc_p_down;
};

// Launches the update on `stream` (a cudaStream_t). Returns 0 or a cudaError_t code.
int launch_importance_update(const ImportanceChunk* chunks, int num_chunks, int r, int k, ScalarKind kind,
                             ImportanceState state, float beta1, float beta2, float* scores, int32_t* skipped,
                             void* stream);

const char* cuda_error_string(int code);

}  // namespace lora2
