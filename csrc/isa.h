// The instruction set a translation unit's kernels are compiled for. CMakeLists.txt compiles
// the kernel sources (CALM_FAST_ISA_SOURCES) once per instruction set with
// -DCALM_FAST_ISA_NAME=build|avx2|avx512 and that set's flags; their functions and the
// inline helpers they use (simd.h) live in the inline namespace calm_fast::isa_<name>, so
// each copy has its own symbols and the linker never merges an AVX-512 body into code that
// must run on a CPU without it. Types shared by the copies (ConvCall, Panels, ...) stay in
// calm_fast itself: the copies' entry points then have one signature, and isa_kernels.h
// keeps them in one table per instruction set.
#pragma once

#ifndef CALM_FAST_ISA_NAME
#define CALM_FAST_ISA_NAME build
#endif
#define CALM_FAST_CAT2(a, b) a##b
#define CALM_FAST_CAT(a, b) CALM_FAST_CAT2(a, b)
#define CALM_FAST_STR2(a) #a
#define CALM_FAST_STR(a) CALM_FAST_STR2(a)
#define CALM_FAST_ISA CALM_FAST_CAT(isa_, CALM_FAST_ISA_NAME)
