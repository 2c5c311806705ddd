#include "stylealigned/io/safetensors.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <optional>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "internal/atomic_file.h"
#include "stylealigned/error.h"

namespace stylealigned::io {

// The memory map of one file. Copy-on-write and writable, so a caller that modifies an aliased tensor in place
// changes its private pages instead of crashing (the file itself is never written).
struct Mapping {
  void* data = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (data != nullptr && data != MAP_FAILED) munmap(data, size);
  }
  const uint8_t* bytes() const { return static_cast<const uint8_t*>(data); }
};

namespace {

// Larger headers are certainly corrupt (upstream safetensors uses the same 100 MB bound).
constexpr uint64_t kMaxHeaderBytes = 100u * 1024u * 1024u;

struct DTypeEntry {
  DType dtype;
  std::string_view name;
  size_t size;
  at::ScalarType scalar;
};
constexpr DTypeEntry kDTypes[] = {
    {DType::F64, "F64", 8, at::kDouble}, {DType::F32, "F32", 4, at::kFloat},  {DType::F16, "F16", 2, at::kHalf},
    {DType::BF16, "BF16", 2, at::kBFloat16}, {DType::I64, "I64", 8, at::kLong}, {DType::I32, "I32", 4, at::kInt},
    {DType::I16, "I16", 2, at::kShort},  {DType::I8, "I8", 1, at::kChar},      {DType::U8, "U8", 1, at::kByte},
    {DType::BOOL, "BOOL", 1, at::kBool},
};

const DTypeEntry& entry(DType d) {
  for (const auto& e : kDTypes) {
    if (e.dtype == d) return e;
  }
  throw Error("safetensors: invalid dtype enum");
}

const DTypeEntry* entry_by_name(std::string_view name) {
  for (const auto& e : kDTypes) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

const DTypeEntry* entry_by_scalar(at::ScalarType s) {
  for (const auto& e : kDTypes) {
    if (e.scalar == s) return &e;
  }
  return nullptr;
}

[[noreturn]] void fail(const std::filesystem::path& path, const std::string& what) {
  throw Error(fmt::format("{}: {}", path.string(), what));
}

std::shared_ptr<Mapping> map_file(const std::filesystem::path& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, fmt::format("cannot open safetensors file ({})", std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    fail(path, fmt::format("cannot stat ({})", std::strerror(err)));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, "not a regular file");
  }
  auto mapping = std::make_shared<Mapping>();
  mapping->size = static_cast<size_t>(st.st_size);
  if (mapping->size < 8) {
    ::close(fd);
    fail(path, fmt::format("file is {} bytes, too small for a safetensors header (truncated?)", mapping->size));
  }
  mapping->data = ::mmap(nullptr, mapping->size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  int err = errno;
  ::close(fd);
  if (mapping->data == MAP_FAILED) fail(path, fmt::format("cannot map file ({})", std::strerror(err)));
  return mapping;
}

// numel * elem_size, or nullopt on overflow.
std::optional<uint64_t> byte_size(const std::vector<int64_t>& shape, size_t elem_size) {
  uint64_t n = elem_size;
  for (int64_t d : shape) {
    if (d != 0 && n > std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(d)) return std::nullopt;
    n *= static_cast<uint64_t>(d);
  }
  return n;
}

}  // namespace

std::string_view dtype_name(DType dtype) { return entry(dtype).name; }
size_t dtype_size(DType dtype) { return entry(dtype).size; }

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

SafetensorsFile SafetensorsFile::open(const std::filesystem::path& path) {
  SafetensorsFile file;
  file.path_ = path;
  file.mapping_ = map_file(path);
  const auto& m = *file.mapping_;

  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | m.bytes()[i];  // little-endian u64
  if (header_len > kMaxHeaderBytes) {
    fail(path, fmt::format("header length {} exceeds the {} byte limit (corrupt or not a safetensors file)",
                           header_len, kMaxHeaderBytes));
  }
  if (header_len > m.size - 8) {
    fail(path, fmt::format("header length {} runs past the end of the {} byte file (truncated?)", header_len, m.size));
  }
  const uint64_t data_begin = 8 + header_len;
  const uint64_t data_size = m.size - data_begin;

  nlohmann::json header;
  try {
    header = nlohmann::json::parse(reinterpret_cast<const char*>(m.bytes() + 8),
                                   reinterpret_cast<const char*>(m.bytes() + data_begin));
  } catch (const nlohmann::json::exception& e) {
    fail(path, fmt::format("header is not valid JSON ({})", e.what()));
  }
  if (!header.is_object()) fail(path, "header is not a JSON object");

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const auto& value = it.value();
    if (name == "__metadata__") {
      if (!value.is_object()) fail(path, "__metadata__ is not an object");
      for (auto mt = value.begin(); mt != value.end(); ++mt) {
        if (!mt.value().is_string()) fail(path, fmt::format("__metadata__ value of '{}' is not a string", mt.key()));
        file.metadata_[mt.key()] = mt.value().get<std::string>();
      }
      continue;
    }
    auto bad = [&](const std::string& why) { fail(path, fmt::format("tensor '{}': {}", name, why)); };
    if (name.empty()) bad("empty tensor name");
    if (!value.is_object()) bad("header entry is not an object");
    if (!value.contains("dtype") || !value["dtype"].is_string()) bad("missing or non-string dtype");
    const auto dtype_str = value["dtype"].get<std::string>();
    const DTypeEntry* dt = entry_by_name(dtype_str);
    if (dt == nullptr) bad(fmt::format("unsupported dtype '{}'", dtype_str));
    if (!value.contains("shape") || !value["shape"].is_array()) bad("missing or non-array shape");
    TensorInfo info;
    info.name = name;
    info.dtype = dt->dtype;
    for (const auto& d : value["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) bad(fmt::format("invalid shape {}", value["shape"].dump()));
      info.shape.push_back(d.get<int64_t>());
    }
    const auto& offs = value.contains("data_offsets") ? value["data_offsets"] : nlohmann::json();
    if (!offs.is_array() || offs.size() != 2 || !offs[0].is_number_unsigned() || !offs[1].is_number_unsigned()) {
      bad("data_offsets must be two non-negative integers");
    }
    info.begin = offs[0].get<uint64_t>();
    info.end = offs[1].get<uint64_t>();
    if (info.begin > info.end) bad(fmt::format("data_offsets [{}, {}] are reversed", info.begin, info.end));
    if (info.end > data_size) {
      bad(fmt::format("data_offsets [{}, {}] exceed the {} byte data section (truncated file?)", info.begin, info.end,
                      data_size));
    }
    auto expected = byte_size(info.shape, dt->size);
    if (!expected || *expected != info.end - info.begin) {
      bad(fmt::format("shape {} of {} needs {} bytes but data_offsets [{}, {}] span {}", value["shape"].dump(),
                      dtype_str, expected ? std::to_string(*expected) : std::string("overflowing"), info.begin,
                      info.end, info.end - info.begin));
    }
    file.tensors_.push_back(std::move(info));
  }

  std::sort(file.tensors_.begin(), file.tensors_.end(),
            [](const TensorInfo& a, const TensorInfo& b) { return a.begin < b.begin || (a.begin == b.begin && a.end < b.end); });
  for (size_t i = 1; i < file.tensors_.size(); ++i) {
    const auto& prev = file.tensors_[i - 1];
    const auto& cur = file.tensors_[i];
    if (cur.begin < prev.end) {
      fail(path, fmt::format("tensors '{}' [{}, {}) and '{}' [{}, {}) overlap", prev.name, prev.begin, prev.end,
                             cur.name, cur.begin, cur.end));
    }
  }
  for (size_t i = 0; i < file.tensors_.size(); ++i) file.index_[file.tensors_[i].name] = i;
  // Offsets are relative to the data section; store absolute ones internally only through data_begin.
  file.data_begin_ = data_begin;
  return file;
}

bool SafetensorsFile::contains(std::string_view name) const { return index_.count(std::string(name)) != 0; }

const TensorInfo& SafetensorsFile::info(std::string_view name) const {
  auto it = index_.find(std::string(name));
  if (it == index_.end()) fail(path_, fmt::format("no tensor named '{}'", name));
  return tensors_[it->second];
}

at::Tensor SafetensorsFile::tensor(std::string_view name) const {
  const TensorInfo& ti = info(name);
  const auto& e = entry(ti.dtype);
  auto options = at::TensorOptions().dtype(e.scalar).device(at::kCPU);
  if (ti.numel() == 0) return at::empty(ti.shape, options);
  uint8_t* ptr = static_cast<uint8_t*>(mapping_->data) + data_begin_ + ti.begin;
  if (reinterpret_cast<uintptr_t>(ptr) % e.size != 0) {
    // Unaligned data (allowed by the format): copy into an owned, aligned tensor.
    auto t = at::empty(ti.shape, options);
    std::memcpy(t.data_ptr(), ptr, ti.end - ti.begin);
    return t;
  }
  auto keep = mapping_;
  return at::from_blob(
      ptr, ti.shape, [keep](void*) mutable { keep.reset(); }, options);
}

// ---- Checkpoint ------------------------------------------------------------------------------------------------

Checkpoint Checkpoint::open(const std::filesystem::path& path) {
  Checkpoint ckpt;
  ckpt.path_ = path;
  const std::string filename = path.filename().string();
  const bool is_index = filename.size() > 11 && filename.substr(filename.size() - 11) == ".index.json";
  if (!is_index) {
    ckpt.files_.push_back(SafetensorsFile::open(path));
    for (const auto& t : ckpt.files_[0].tensors()) ckpt.file_of_[t.name] = 0;
    return ckpt;
  }
  std::ifstream in(path);
  if (!in) fail(path, "cannot open checkpoint index");
  nlohmann::json index;
  try {
    index = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail(path, fmt::format("index is not valid JSON ({})", e.what()));
  }
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
    fail(path, "index has no 'weight_map' object");
  }
  std::map<std::string, size_t> shard_index;
  for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
    if (!it.value().is_string()) fail(path, fmt::format("weight_map entry '{}' is not a file name", it.key()));
    const auto shard = it.value().get<std::string>();
    if (shard.empty() || shard.find('/') != std::string::npos || shard == "..") {
      fail(path, fmt::format("weight_map entry '{}' names an invalid shard '{}'", it.key(), shard));
    }
    auto found = shard_index.find(shard);
    if (found == shard_index.end()) {
      found = shard_index.emplace(shard, ckpt.files_.size()).first;
      ckpt.files_.push_back(SafetensorsFile::open(path.parent_path() / shard));
    }
    const auto& file = ckpt.files_[found->second];
    if (!file.contains(it.key())) {
      fail(path, fmt::format("tensor '{}' is listed in the index but missing from shard {}", it.key(), shard));
    }
    ckpt.file_of_[it.key()] = found->second;
  }
  return ckpt;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(file_of_.size());
  for (const auto& [name, _] : file_of_) out.push_back(name);
  return out;
}

bool Checkpoint::contains(std::string_view name) const { return file_of_.find(name) != file_of_.end(); }

const TensorInfo& Checkpoint::info(std::string_view name) const {
  auto it = file_of_.find(name);
  if (it == file_of_.end()) fail(path_, fmt::format("no tensor named '{}'", name));
  return files_[it->second].info(name);
}

at::Tensor Checkpoint::tensor(std::string_view name) const {
  auto it = file_of_.find(name);
  if (it == file_of_.end()) fail(path_, fmt::format("no tensor named '{}'", name));
  return files_[it->second].tensor(name);
}

const std::filesystem::path& Checkpoint::file_of(std::string_view name) const {
  auto it = file_of_.find(name);
  if (it == file_of_.end()) fail(path_, fmt::format("no tensor named '{}'", name));
  return files_[it->second].path();
}

uint64_t Checkpoint::total_bytes() const {
  uint64_t total = 0;
  for (const auto& [name, i] : file_of_) {
    const auto& ti = files_[i].info(name);
    total += ti.end - ti.begin;
  }
  return total;
}

// ---- Writing ---------------------------------------------------------------------------------------------------

void save_safetensors(const std::filesystem::path& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    header["__metadata__"] = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) header["__metadata__"][k] = v;
  }
  std::vector<at::Tensor> data;
  std::set<std::string> seen;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    if (name.empty() || name == "__metadata__") fail(path, fmt::format("invalid tensor name '{}'", name));
    if (!seen.insert(name).second) fail(path, fmt::format("tensor name '{}' appears twice", name));
    if (!tensor.defined()) fail(path, fmt::format("tensor '{}' is undefined", name));
    const DTypeEntry* dt = entry_by_scalar(tensor.scalar_type());
    if (dt == nullptr) fail(path, fmt::format("tensor '{}' has dtype {} which safetensors cannot store", name,
                                              c10::toString(tensor.scalar_type())));
    auto t = tensor.detach().to(at::kCPU).contiguous();
    uint64_t bytes = static_cast<uint64_t>(t.numel()) * dt->size;
    header[name] = {{"dtype", dt->name}, {"shape", t.sizes().vec()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    data.push_back(std::move(t));
  }
  std::string text = header.dump();
  // Pad with spaces so the data section starts 8-byte aligned (zero-copy reads of every dtype).
  text.append((8 - text.size() % 8) % 8, ' ');

  internal::AtomicFile out(path);
  uint64_t len = text.size();
  uint8_t len_bytes[8];
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<uint8_t>(len >> (8 * i));
  out.write(len_bytes, 8);
  out.write(text.data(), text.size());
  for (const auto& t : data) out.write(t.data_ptr(), static_cast<size_t>(t.numel()) * t.element_size());
  out.commit();
}

std::vector<std::pair<std::string, at::Tensor>> load_safetensors(const std::filesystem::path& path) {
  auto file = SafetensorsFile::open(path);
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& ti : file.tensors()) out.emplace_back(ti.name, file.tensor(ti.name).clone());
  return out;
}

}  // namespace stylealigned::io
