// Code-generation macros of the CPU kernels (csrc/cpu/*.cpp), defined once for all of them.
//
// FASTEDIT_CPU_CLONES: function multiversioning. The extension is compiled once for baseline
// x86-64 (no -march flag: the wheel must run on any x86-64 CPU); a function marked with it is
// compiled three times, for AVX-512 (avx512f), AVX2 and baseline x86-64, and the dynamic loader
// picks the best clone for the running CPU once, at load time (an ifunc). The kernels' hot loops
// are plain loops that the compiler vectorises within each clone.
//
// The condition: x86-64, Linux (ifuncs need glibc's loader) and GCC, not Clang. Every function
// marked with it is a function template (one instantiation per dtype, rule, ...), and Clang does
// not accept target_clones on function templates ("multiversioned functions do not yet support
// function templates"; llvm/llvm-project issue #116501, still open), although it supports the
// attribute on plain functions since Clang 14. Clang builds therefore get one baseline version of
// each function (correct, just without AVX2/AVX-512 code); GCC (>= 6, the build needs >= 11 for
// C++20) gets the clones. Clang also defines __GNUC__, hence the explicit !__clang__.
//
// No clone computes differently from another: the kernels that use FASTEDIT_CPU_CLONES turn FP
// contraction off for their own code, so no clone can fuse an a * b + c that another rounds twice
// (GCC 12 enables no FMA for target("avx512f") or target("avx2"), but the kernels do not rely on
// that).
//
// FASTEDIT_INLINE: force-inlining of small helpers into the cloned loop functions. A call per
// element would stop the vectorisation, and under `#pragma GCC optimize(...)` GCC no longer
// inlines such helpers by itself.
#pragma once

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define FASTEDIT_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTEDIT_CPU_CLONES
#endif

#if defined(__GNUC__)
#define FASTEDIT_INLINE inline __attribute__((always_inline))
#else
#define FASTEDIT_INLINE inline
#endif
