// stylealigned/runtime.h: process-wide runtime settings a host or tool sets once at start-up.
//
//   stylealigned::configure_threads();          // libtorch intra-op threads = hardware cores (Debian starts at 1)
//   stylealigned::configure_large_tensor_pages(); // big CPU tensors on huge pages (the tool and benchmarks do this)
//   if (!stylealigned::cpu_has_native_bf16()) { /* stay in fp32 on this CPU */ }
//   stylealigned::configure_conv_weight_packing(stylealigned::ConvWeightPacking::always);  // speed for memory
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

/// True if this libtorch can run fp16 convolutions on the CPU. libtorch 1.13 cannot ("slow_conv2d_cpu" not
/// implemented for 'Half'); 2.x can. Probed once with a 1x1 convolution. Pipeline::load refuses an fp16 UNet or VAE
/// on the CPU without it, naming the option, instead of failing mid-generation.
bool cpu_supports_fp16_convolution();

/// When the CPU convolutions reorder their weights once into oneDNN's blocked layout and run on channels-last
/// activations (its brgconv kernels). Measured on a 2-core AVX-512 BF16 EPYC, SD1.5 UNet at 512x512, batch 2, one
/// run: bf16 5.00 s packed against 6.38 s plain (fp32 plain 9.11 s), fp32 8.47 s packed. The price is a second copy
/// of every convolution weight, kept while the model lives: +0.9 GB for an SD1.5 UNet in bf16, +2.3 GB in fp32.
enum class ConvWeightPacking {
  automatic,  ///< bf16 packs (bf16 weights plus their packed copy still hold less than plain fp32); fp32 does not
  always,     ///< every dtype with a fast packed kernel
  never,      ///< plain NCHW / OIHW everywhere (the layout diffusers uses; no extra memory)
};

/// Sets the packing policy for every convolution that runs from now on (a packed copy made earlier stays with its
/// module). The initial value is STYLEALIGNED_CONV_PACK=1 (always) / 0 (never), else automatic. Results differ
/// from plain convolutions only in summation order.
void configure_conv_weight_packing(ConvWeightPacking mode);
ConvWeightPacking conv_weight_packing();

/// "auto", "always" or "never" (the tool's and benchmark's --conv-packing); anything else throws stylealigned::Error
/// naming `option` and the value.
ConvWeightPacking parse_conv_weight_packing(const std::string& value, const std::string& option = "--conv-packing");
const char* to_string(ConvWeightPacking mode);

/// The CPU model name (from /proc/cpuinfo), for benchmark reports.
std::string cpu_model_name();

}  // namespace stylealigned
