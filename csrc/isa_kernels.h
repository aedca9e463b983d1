// One table of the kernels per instruction set they were compiled for (isa.h), and the one
// place that picks the table a process runs: the best set the CPU has among those built,
// or the one CALM_FAST_ISA names (build, avx2, avx512; read once). A native build
// (-march=native, the default) runs "build": its flags already hold everything the host
// has; the avx2 and avx512 copies are still built, so the tests run every copy on one host.
#pragma once
#include <string>
#include <vector>

#include "conv_cpu.h"
#include "decode_step_cpu.h"
#include "gemm_cpu.h"
#include "paged_attention_cpu.h"
#include "window_attention_cpu.h"

namespace calm_fast {

struct IsaKernels {
  const char* isa;
  decltype(&paged_decode_attention_cpu) paged_decode_attention;
  decltype(&paged_window_attention_cpu) paged_window_attention;
  decltype(&decode_step_f32) decode_step;
  decltype(&conv_rows_f32) conv_rows;
  decltype(&conv2_pairs_f32) conv2_pairs;
  decltype(&conv3_pairs_f32) conv3_pairs;
  decltype(&conv_rows_to_one_f32) conv_rows_to_one;
  decltype(&gemm_panels_f32_isa) gemm_f32;
  decltype(&gemm_panels_bf16w_isa) gemm_bf16_widen;
};

// isa_table.cpp, once per built set (CMakeLists.txt defines CALM_FAST_HAVE_AVX2 / _AVX512
// for those it built besides "build").
IsaKernels isa_kernels_build();
IsaKernels isa_kernels_avx2();
IsaKernels isa_kernels_avx512();

const IsaKernels& kernels();
// The built sets this CPU can run, lowest first ("build" always).
std::vector<std::string> runnable_isas();
bool native_build();

}  // namespace calm_fast
