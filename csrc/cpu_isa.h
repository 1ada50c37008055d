// Which instruction set the CPU sampling backends run their vectorized screening stages with
// (docs/sampling-screen.md, "C++"): "avx2" when the processor has it, else "scalar" (the portable build of
// the same code). Tests force either one with _C.set_cpu_isa and compare the draws; both return the same
// tokens, since the screen only chooses which tokens the exact pass scores.
#pragma once

#include <string>

namespace hdlm {

// Ordered: a level includes the ones below it. kAvx512 runs the γ step's exact row sum (hybrid_sum_cpu.cpp)
// in 8 float64 lanes and every other stage as kAvx2.
enum class CpuIsa : int { kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

// Whether this build has an AVX2 path and the processor supports it.
bool cpu_has_avx2();
// Whether this build has an AVX-512 path and the processor supports AVX-512F (and AVX2).
bool cpu_has_avx512();
// The instruction set in use (the best available unless set_cpu_isa chose one).
CpuIsa active_cpu_isa();
// "auto" (the best available), "scalar", "avx2" or "avx512" (an error where the processor lacks it).
void set_cpu_isa(const std::string& name);
std::string cpu_isa_name();

}  // namespace hdlm
