// Runtime choice of the screening stages' instruction set (cpu_isa.h): cpuid through the compiler's
// builtin, overridable for tests.
#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace hdlm {
namespace {

std::atomic<int> forced_isa{0};  // 0: automatic

}  // namespace

bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

CpuIsa active_cpu_isa() {
  const int forced = forced_isa.load(std::memory_order_relaxed);
  if (forced != 0) {
    return static_cast<CpuIsa>(forced);
  }
  return cpu_has_avx512() ? CpuIsa::kAvx512 : cpu_has_avx2() ? CpuIsa::kAvx2 : CpuIsa::kScalar;
}

void set_cpu_isa(const std::string& name) {
  if (name == "auto") {
    forced_isa.store(0);
  } else if (name == "scalar") {
    forced_isa.store(static_cast<int>(CpuIsa::kScalar));
  } else if (name == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "set_cpu_isa: isa 'avx2' is not available on this processor (or this build)");
    forced_isa.store(static_cast<int>(CpuIsa::kAvx2));
  } else if (name == "avx512") {
    TORCH_CHECK(cpu_has_avx512(), "set_cpu_isa: isa 'avx512' is not available on this processor (or this build)");
    forced_isa.store(static_cast<int>(CpuIsa::kAvx512));
  } else {
    TORCH_CHECK(false, "set_cpu_isa: isa must be one of 'auto', 'scalar', 'avx2', 'avx512', got '", name, "'");
  }
}

std::string cpu_isa_name() {
  switch (active_cpu_isa()) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

}  // namespace hdlm
