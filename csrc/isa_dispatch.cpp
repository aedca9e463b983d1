#include <cstdlib>
#include <string>
#include <vector>

#include "isa_kernels.h"

namespace calm_fast {

namespace {

struct Entry {
  const char* name;
  IsaKernels (*table)();
};

bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512() {  // what the avx512 copy is compiled with (CMakeLists.txt)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

std::vector<Entry> runnable() {  // lowest first
  std::vector<Entry> out{{"build", &isa_kernels_build}};
#if defined(CALM_FAST_HAVE_AVX2)
  if (cpu_has_avx2()) out.push_back({"avx2", &isa_kernels_avx2});
#endif
#if defined(CALM_FAST_HAVE_AVX512)
  if (cpu_has_avx512()) out.push_back({"avx512", &isa_kernels_avx512});
#endif
  return out;
}

}  // namespace

bool native_build() {
#if defined(CALM_FAST_NATIVE_BUILD)
  return true;
#else
  return false;
#endif
}

std::vector<std::string> runnable_isas() {
  std::vector<std::string> names;
  for (const Entry& e : runnable()) names.emplace_back(e.name);
  return names;
}

const IsaKernels& kernels() {
  static const IsaKernels chosen = [] {
    const std::vector<Entry> sets = runnable();
    const char* env = std::getenv("CALM_FAST_ISA");
    if (env != nullptr) {  // a set this CPU cannot run, or one not built: the default below
      for (const Entry& e : sets) {  // (calm_fast.fast.ops warns when it sees that)
        if (std::string(env) == e.name) return e.table();
      }
    }
    return native_build() ? sets.front().table() : sets.back().table();
  }();
  return chosen;
}

}  // namespace calm_fast
