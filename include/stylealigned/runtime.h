// stylealigned/runtime.h: process-wide runtime settings a host or tool sets once at start-up.
//
//   stylealigned::configure_threads();          // libtorch intra-op threads = hardware cores (Debian starts at 1)
//   if (!stylealigned::cpu_has_native_bf16()) { /* stay in fp32 on this CPU */ }
#pragma once

#include <string>

namespace stylealigned {

/// Sets libtorch's intra-op thread count: `threads` if > 0, else the number of hardware threads available to this
/// process. Returns the count in effect.
int configure_threads(int threads = 0);

/// True if the CPU executes bf16 matrix products natively (AVX-512 BF16 or AMX). Without it libtorch's bf16 CPU
/// kernels run 20-100x slower than fp32, so fp32 is the default there.
bool cpu_has_native_bf16();

/// The CPU model name (from /proc/cpuinfo), for benchmark reports.
std::string cpu_model_name();

}  // namespace stylealigned
