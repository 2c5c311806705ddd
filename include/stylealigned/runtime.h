// stylealigned/runtime.h: process-wide runtime settings a host or tool sets once at start-up.
//
//   stylealigned::configure_threads();          // libtorch intra-op threads = hardware cores (Debian starts at 1)
//   stylealigned::configure_large_tensor_pages(); // big CPU tensors on huge pages (the tool and benchmarks do this)
//   if (!stylealigned::cpu_has_native_bf16()) { /* stay in fp32 on this CPU */ }
#pragma once

#include <cstddef>
#include <string>

namespace stylealigned {

/// Sets libtorch's intra-op thread count: `threads` if > 0, else the number of hardware threads available to this
/// process. Returns the count in effect.
int configure_threads(int threads = 0);

/// Serves every CPU tensor of at least `min_bytes` from its own mapping advised for transparent huge pages, and
/// every smaller one from the allocator that was installed before. Why: glibc gives blocks over 32 MB fresh 4 KiB
/// mappings, so each large activation of a UNet forward (GEGLU halves, attention chunks, batch-8 hidden states) is
/// page-faulted in again, 4 KiB at a time: about 220k faults and 2 s of system time per SD1.5 forward at 512x512,
/// and a 2048^2 fp32 product whose output is a fresh tensor ran at half its rate. 2 MiB pages cut the faults 512-fold.
/// A dead tensor's mapping is kept for the next large tensor of its size (up to a quarter larger) while the kept
/// mappings total at most `cache_bytes`, and returned to the system beyond that: fresh huge pages are zeroed by
/// the kernel on first touch, which cost 5-6 s of system CPU per batch-8 SD1.5 forward before the cache. So peak
/// RSS grows by at most `cache_bytes` over the live tensors. Process-wide (it replaces c10's CPU allocator), so
/// call it once at start-up before tensors exist; later calls only report. Returns false, changing nothing, where
/// transparent huge pages are off ("never") or not on Linux; STYLEALIGNED_HUGE_PAGES=0 also disables it.
bool configure_large_tensor_pages(std::size_t min_bytes = std::size_t{2} << 20,
                                  std::size_t cache_bytes = std::size_t{1} << 30);

/// True if the CPU executes bf16 matrix products natively (AVX-512 BF16 or AMX). Without it libtorch's bf16 CPU
/// kernels run 20-100x slower than fp32, so fp32 is the default there.
bool cpu_has_native_bf16();

/// The CPU model name (from /proc/cpuinfo), for benchmark reports.
std::string cpu_model_name();

}  // namespace stylealigned
