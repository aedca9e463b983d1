// This instruction set's entry in isa_kernels.h (compiled with the kernels, once per set).
#include "isa_kernels.h"

namespace calm_fast {

IsaKernels CALM_FAST_CAT(isa_kernels_, CALM_FAST_ISA_NAME)() {
  return {CALM_FAST_STR(CALM_FAST_ISA_NAME), &paged_decode_attention_cpu,
          &paged_window_attention_cpu, &decode_step_f32, &conv_rows_f32, &conv2_pairs_f32,
          &conv3_pairs_f32, &conv_rows_to_one_f32, &gemm_panels_f32_isa,
          &gemm_panels_bf16w_isa};
}

}  // namespace calm_fast
