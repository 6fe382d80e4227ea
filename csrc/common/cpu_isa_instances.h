// Instantiates one CPU op's kernel header once per instruction set, with the register tile of each.
// Include it (no include guard: once per op) after defining MEDVL_CPU_KERNELS to the header's path,
// inside the op's namespace, after its `detail` namespace. Each instance sits in a namespace named
// for its ISA (scalar, avx2, avx512) and sees `Vec` (cpu_simd.h), kMR rows x kNV vectors per tile.
//
//   ISA      Vec width   kMR x kNV        accumulators
//   scalar   1           4 x 4            16 floats (compilers may vectorise it for the baseline ISA)
//   avx2     8           6 x 2 (6 x 16)   12 of 16 ymm
//   avx512   16          12 x 2 (12 x 32) 24 of 32 zmm
#ifndef MEDVL_CPU_KERNELS
#error "define MEDVL_CPU_KERNELS to the kernel header's path before including cpu_isa_instances.h"
#endif

namespace scalar {
using namespace detail;
using Vec = cpu::scalar::Vec;
constexpr int kMR = 4;
constexpr int kNV = 4;
#include MEDVL_CPU_KERNELS
}  // namespace scalar

#if MEDVL_X86
MEDVL_TARGET_AVX2_BEGIN
namespace avx2 {
using namespace detail;
using Vec = cpu::avx2::Vec;
constexpr int kMR = 6;
constexpr int kNV = 2;
#include MEDVL_CPU_KERNELS
}  // namespace avx2
MEDVL_TARGET_AVX2_END

MEDVL_TARGET_AVX512_BEGIN
namespace avx512 {
using namespace detail;
using Vec = cpu::avx512::Vec;
constexpr int kMR = 12;
constexpr int kNV = 2;
#include MEDVL_CPU_KERNELS
}  // namespace avx512
MEDVL_TARGET_AVX512_END
#endif  // MEDVL_X86

#undef MEDVL_CPU_KERNELS
