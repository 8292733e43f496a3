// The element types fastedit's kernels accept, as one enum shared by every side of the extension:
// the plain CUDA launchers take it (csrc/cuda/*.h), the torch bindings translate at::ScalarType
// into it (fastedit::to_kernel_dtype in csrc/binding_utils.h).
//
// Plain C++17, no torch and no CUDA header: nvcc compiles it inside the .cu files on their own.
#pragma once

namespace fastedit {

// The storage types of tensors handed to a kernel. The values are fixed (0..3) so that a DType
// passed across the C++/CUDA boundary means the same everywhere; they are never stored.
//   Float32  float           accumulates in float
//   Float64  double          accumulates in double
//   Float16  IEEE half       accumulates in float   (c10::Half on the CPU, __half on the GPU)
//   BFloat16 bfloat16        accumulates in float   (c10::BFloat16, __nv_bfloat16)
// The accumulate types and the half/bfloat16 conversions are in csrc/accumulate.h.
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

}  // namespace fastedit
