#include "stylealigned/models/loading.h"
#include <ATen/core/grad_mode.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/nn/module.h>

#include <algorithm>
#include <cstdint>
#include <set>
#include <string_view>
#include <utility>

#include "stylealigned/error.h"
#include "stylealigned/log.h"

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace stylealigned::models {
namespace {

// One parameter or buffer of the module, with what loading it needs.
struct Slot {
  std::string name;
  at::Tensor tensor;
};

std::vector<Slot> module_slots(const torch::nn::Module& module) {
  std::vector<Slot> slots;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) slots.push_back({item.key(), item.value()});
  for (const auto& item : module.named_buffers(/*recurse=*/true)) slots.push_back({item.key(), item.value()});
  return slots;
}

bool is_floating(io::DType dtype) {
  switch (dtype) {
    case io::DType::F64:
    case io::DType::F32:
    case io::DType::F16:
    case io::DType::BF16:
      return true;
    default:
      return false;
  }
}

// "Kind" rather than exact dtype: any floating checkpoint tensor converts into any floating parameter (that is what
// loading an fp16 file into an fp32 model means); integers and bools must stay what they are.
enum class Kind { Floating, Integral, Bool };

Kind kind_of(io::DType dtype) {
  if (is_floating(dtype)) return Kind::Floating;
  return dtype == io::DType::BOOL ? Kind::Bool : Kind::Integral;
}

Kind kind_of(c10::ScalarType dtype) {
  if (c10::isFloatingType(dtype)) return Kind::Floating;
  return dtype == c10::kBool ? Kind::Bool : Kind::Integral;
}

std::string shape_string(c10::IntArrayRef shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

// Long lists stay readable: a completely wrong checkpoint would otherwise produce thousands of lines.
constexpr size_t kMaxListed = 64;

void append_list(std::string& out, std::string_view title, const std::vector<std::string>& names) {
  if (names.empty()) return;
  out += fmt::format("\n  {} ({}):", title, names.size());
  for (size_t i = 0; i < names.size() && i < kMaxListed; ++i) out += fmt::format("\n    {}", names[i]);
  if (names.size() > kMaxListed) out += fmt::format("\n    ... and {} more", names.size() - kMaxListed);
}

// A tensor the reader handed out as a view of the file mapping (not a copy it had to make for misaligned data).
bool aliases_mapping(const at::Tensor& source) {
  return source.has_storage() && source.storage().allocator() == nullptr && !source.storage().resizable();
}

// madvise over the pages of a mapped tensor: `inner_only` keeps to the pages entirely inside it, for advice that
// must not touch a neighbouring tensor's pages.
void advise_pages(const at::Tensor& source, int advice, bool inner_only) {
#if defined(__linux__)
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(source.data_ptr());
  const uintptr_t end = begin + source.numel() * source.element_size();
  const uintptr_t first = inner_only ? (begin + page - 1) / page * page : begin / page * page;
  const uintptr_t last = inner_only ? end / page * page : end;
  if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, advice);
#else
  (void)source;
  (void)advice;
  (void)inner_only;
#endif
}

// Asks the kernel to read a mapped tensor's pages ahead, so a cold file streams in while the model is assembled
// instead of faulting page by page in the first forward.
void prefetch_mapped_pages(const at::Tensor& source) {
#if defined(__linux__)
  advise_pages(source, MADV_WILLNEED, /*inner_only=*/false);
#else
  (void)source;
#endif
}

// Drops the pages of a tensor that aliases a checkpoint's (private, read-only-in-practice) file mapping once it has
// been copied: otherwise every page read stays resident and loading peaks at two copies of the weights (the file's
// pages plus the converted tensors). The kernel re-reads the pages from the file if the tensor is used again.
// Tensors the reader had to copy (misaligned data) own their memory and are left alone; they are freed anyway.
void release_mapped_pages(const at::Tensor& source) {
#if defined(__linux__)
  if (aliases_mapping(source)) advise_pages(source, MADV_DONTNEED, /*inner_only=*/true);
#else
  (void)source;
#endif
}

}  // namespace

LoadReport check_weights(const torch::nn::Module& module, const io::Checkpoint& checkpoint,
                         const LoadOptions& options) {
  LoadReport report;
  std::set<std::string, std::less<>> in_module;
  for (const auto& slot : module_slots(module)) {
    in_module.insert(slot.name);
    if (!checkpoint.contains(slot.name)) {
      report.missing.push_back(fmt::format("{} {}", slot.name, shape_string(slot.tensor.sizes())));
      continue;
    }
    const io::TensorInfo& info = checkpoint.info(slot.name);
    const bool same_shape = c10::IntArrayRef(info.shape) == slot.tensor.sizes();
    const bool same_kind = kind_of(info.dtype) == kind_of(slot.tensor.scalar_type());
    if (!same_shape || !same_kind) {
      report.mismatched.push_back(fmt::format(
          "{}: checkpoint {} {} vs model {} {}", slot.name, io::dtype_name(info.dtype), shape_string(info.shape),
          c10::toString(slot.tensor.scalar_type()), shape_string(slot.tensor.sizes())));
    }
  }
  const std::set<std::string, std::less<>> ignored(options.ignore.begin(), options.ignore.end());
  for (const auto& name : checkpoint.names()) {
    if (in_module.count(name) == 0 && ignored.count(name) == 0) {
      const auto& info = checkpoint.info(name);
      report.unexpected.push_back(fmt::format("{} {}", name, shape_string(info.shape)));
    }
  }
  std::sort(report.missing.begin(), report.missing.end());
  std::sort(report.mismatched.begin(), report.mismatched.end());
  return report;
}

void load_weights(torch::nn::Module& module, const io::Checkpoint& checkpoint, const LoadOptions& options) {
  if (!c10::isFloatingType(options.dtype)) {
    throw Error(fmt::format("{}: load dtype must be a floating type, got {}", checkpoint.path().string(),
                            c10::toString(options.dtype)));
  }
  const LoadReport report = check_weights(module, checkpoint, options);
  const bool unexpected_is_error = !report.unexpected.empty() && !options.allow_unexpected;
  if (!report.missing.empty() || !report.mismatched.empty() || unexpected_is_error) {
    std::string message =
        fmt::format("{}: checkpoint does not match the {} module", checkpoint.path().string(), module.name());
    append_list(message, "missing from the checkpoint", report.missing);
    append_list(message, "shape or dtype mismatch", report.mismatched);
    if (unexpected_is_error) append_list(message, "unexpected in the checkpoint", report.unexpected);
    throw Error(message);
  }
  if (!report.unexpected.empty()) {
    std::string message =
        fmt::format("{}: ignoring checkpoint tensors the module does not have", checkpoint.path().string());
    append_list(message, "unexpected", report.unexpected);
    warn(message);
  }

  // Every check passed: now replace each tensor's data by its converted checkpoint tensor. The checkpoint tensor
  // aliases the file mapping, so this allocates exactly one new tensor at a time and frees the old one (the module's
  // initial values) as it goes; no second full copy of the weights ever exists.
  at::NoGradGuard no_grad;
  for (auto& slot : module_slots(module)) {
    at::Tensor source = checkpoint.tensor(slot.name);
    const c10::ScalarType target =
        c10::isFloatingType(slot.tensor.scalar_type()) ? options.dtype : slot.tensor.scalar_type();
    if (options.map_weights && options.device.is_cpu() && source.scalar_type() == target &&
        slot.tensor.scalar_type() == target && source.is_contiguous() && aliases_mapping(source)) {
      // The module's placeholder (allocated, never written: from_pretrained builds without initialising) is
      // dropped; the parameter now reads the mapping, which the tensor keeps alive.
      prefetch_mapped_pages(source);
      slot.tensor.set_data(source);
      continue;
    }
    if (slot.tensor.scalar_type() == target && slot.tensor.device() == options.device &&
        slot.tensor.is_contiguous() && source.is_contiguous()) {
      // The module already holds a tensor of the final dtype and place: convert into it in slices of about 1 MiB,
      // dropping each slice's file pages as soon as it is copied. A new tensor per slot would briefly hold two
      // copies of it, which for a large single tensor (SD's 49408-token embedding is most of a small text encoder)
      // doubles the peak of the whole load.
      at::Tensor dst = slot.tensor.view({-1});
      at::Tensor src = source.view({-1});
      const int64_t slice = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, src.element_size()));
      for (int64_t begin = 0; begin < src.numel(); begin += slice) {
        const int64_t length = std::min(slice, src.numel() - begin);
        at::Tensor part = src.narrow(0, begin, length);
        dst.narrow(0, begin, length).copy_(part);
        release_mapped_pages(part);
      }
      continue;
    }
    // copy=true: the result must own its memory even when dtype and device already match (the mapping is
    // read-only and may be closed after loading).
    at::Tensor value = source.to(options.device, target, /*non_blocking=*/false, /*copy=*/true);
    slot.tensor.set_data(value);
    release_mapped_pages(source);
  }
}

std::filesystem::path find_weights(const std::filesystem::path& folder, const std::vector<std::string>& stems,
                                   bool prefer_fp16) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(folder))
    throw Error(fmt::format("{}: not a folder (looking for model weights)", folder.string()));
  if (stems.empty()) throw Error(fmt::format("{}: no weight file names to look for", folder.string()));
  std::vector<std::string> tried;
  for (const auto& stem : stems) {
    // diffusers' variant naming puts ".fp16" before the last extension: model.fp16.safetensors and
    // model.safetensors.index.fp16.json. Single files first: a folder holding both is unusual, and a single file
    // opens faster.
    std::vector<std::string> names = {stem + ".safetensors", stem + ".fp16.safetensors",
                                      stem + ".safetensors.index.json", stem + ".safetensors.index.fp16.json"};
    if (prefer_fp16) {
      std::swap(names[0], names[1]);
      std::swap(names[2], names[3]);
    }
    for (const auto& name : names) {
      const fs::path candidate = folder / name;
      if (fs::is_regular_file(candidate)) return candidate;
      tried.push_back(name);
    }
  }
  std::string message =
      fmt::format("{}: no safetensors weights found (looked for {})", folder.string(), fmt::join(tried, ", "));
  for (const auto& stem : stems) {
    for (const char* legacy : {".bin", ".ckpt", ".pt"}) {
      if (fs::exists(folder / (stem + legacy))) {
        message += fmt::format("; found {}{}, but only safetensors checkpoints are supported (convert it first)", stem,
                               legacy);
      }
    }
  }
  throw Error(message);
}

}  // namespace stylealigned::models
