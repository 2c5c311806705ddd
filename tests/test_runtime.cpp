// Process-wide runtime settings. Own executable: the allocator it installs stays for the life of the process.
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <fstream>
#include <string>

#include "stylealigned/error.h"
#include "stylealigned/runtime.h"

namespace {

bool thp_enabled_here() {
  std::ifstream in("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string mode;
  std::getline(in, mode);
  return !mode.empty() && mode.find("[never]") == std::string::npos;
}

constexpr std::uintptr_t kTwoMiB = std::uintptr_t{2} << 20;

TEST(runtime, large_tensor_pages_serve_large_blocks_aligned_and_free_them) {
  const bool expected = thp_enabled_here();
  ASSERT_EQ(stylealigned::configure_large_tensor_pages(std::size_t{4} << 20), expected);
  if (!expected) {
    // Nothing installed: the default allocator still serves tensors.
    EXPECT_EQ(at::ones({1 << 20}).sum().item<float>(), float(1 << 20));
    return;
  }
  EXPECT_TRUE(stylealigned::configure_large_tensor_pages()) << "a second call reports the installed allocator";

  // Large: its own 2 MiB-aligned mapping, usable to the last byte, released when the tensor dies (repeat to
  // catch a leak of mappings or a double unmap).
  for (int i = 0; i < 50; ++i) {
    at::Tensor big = at::empty({(5 << 20) / 4 + 3});  // 5 MiB + 12 bytes: not a multiple of the page
    ASSERT_EQ(reinterpret_cast<std::uintptr_t>(big.data_ptr()) % kTwoMiB, 0u);
    big.fill_(float(i));
    EXPECT_EQ(big[-1].item<float>(), float(i));
    EXPECT_EQ(big.sum(at::kDouble).item<double>(), double(i) * double(big.numel()));
  }
  // A dead tensor's mapping serves the next one of its size (no fresh zeroed pages), and not a much smaller one.
  void* first = nullptr;
  {
    at::Tensor a = at::empty({(6 << 20) / 4});
    first = a.data_ptr();
  }
  {
    at::Tensor smaller = at::empty({(3 << 20) / 4});  // 4 MiB of pages: the kept 6 MiB mapping is too big for it
    EXPECT_NE(smaller.data_ptr(), first);
    at::Tensor b = at::empty({(6 << 20) / 4 - 100});
    EXPECT_EQ(b.data_ptr(), first);
    b.fill_(3.0f);
    EXPECT_EQ(b.sum(at::kDouble).item<double>(), 3.0 * double(b.numel()));
  }
  // Small: the previous allocator (a heap block, not 2 MiB-aligned in general); values intact.
  at::Tensor small = at::arange(1000, at::kFloat);
  EXPECT_EQ(small.sum().item<float>(), 999.0f * 1000.0f / 2.0f);

  // raw_allocate / raw_deallocate (libtorch uses them in conv and mkldnn paths): both sizes through one deleter.
  c10::Allocator* alloc = c10::GetCPUAllocator();
  ASSERT_NE(alloc->raw_deleter(), nullptr);
  for (const std::size_t n : {std::size_t{64}, std::size_t{6} << 20}) {
    void* p = alloc->raw_allocate(n);
    ASSERT_NE(p, nullptr);
    static_cast<char*>(p)[0] = 1;
    static_cast<char*>(p)[n - 1] = 2;
    alloc->raw_deallocate(p);
  }
}

TEST(runtime, autograd_convolution_runs_on_the_large_page_allocator) {
  // The trainer's path: conv2d backward frees buffers through raw_deleter() (it crashed an allocator without one).
  stylealigned::configure_large_tensor_pages(std::size_t{2} << 20);
  at::Tensor x = at::randn({4, 64, 64, 64}).set_requires_grad(true);  // 4 MiB
  at::Tensor w = at::randn({64, 64, 3, 3}).set_requires_grad(true);
  at::conv2d(x, w, {}, 1, 1).square().sum().backward();
  ASSERT_TRUE(x.grad().defined());
  EXPECT_TRUE(at::isfinite(x.grad()).all().item<bool>());
  EXPECT_GT(w.grad().abs().sum().item<float>(), 0.0f);
}

TEST(runtime, configure_threads_sets_the_requested_count) {
  EXPECT_EQ(stylealigned::configure_threads(1), 1);
  EXPECT_GE(stylealigned::configure_threads(0), 1);
}

}  // namespace

TEST(runtime, conv_weight_packing_parses_sets_and_names_bad_values) {
  using stylealigned::ConvWeightPacking;
  const ConvWeightPacking saved = stylealigned::conv_weight_packing();
  for (const char* name : {"auto", "always", "never"}) {
    const ConvWeightPacking mode = stylealigned::parse_conv_weight_packing(name);
    EXPECT_STREQ(stylealigned::to_string(mode), name);
    stylealigned::configure_conv_weight_packing(mode);
    EXPECT_EQ(stylealigned::conv_weight_packing(), mode);
  }
  stylealigned::configure_conv_weight_packing(saved);
  try {
    stylealigned::parse_conv_weight_packing("sometimes", "--conv-packing");
    ADD_FAILURE() << "no error for 'sometimes'";
  } catch (const stylealigned::Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("--conv-packing"), std::string::npos) << msg;
    EXPECT_NE(msg.find("sometimes"), std::string::npos) << msg;
  }
}
