// Safetensors reader/writer: round trips, sharded checkpoints and a catalogue of malformed files.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "stylealigned/error.h"
#include "stylealigned/io/safetensors.h"
#include "support/test_support.h"

namespace fs = std::filesystem;
using stylealigned::Error;
using namespace stylealigned::io;

namespace {

fs::path scratch() { return sa_test::scratch_dir("io"); }

// Writes a raw safetensors file: 8-byte length, header text, then `data_bytes` bytes.
fs::path write_raw(const std::string& name, const std::string& header, size_t data_bytes, int64_t declared_len = -1) {
  auto path = scratch() / name;
  std::ofstream out(path, std::ios::binary);
  uint64_t len = declared_len >= 0 ? static_cast<uint64_t>(declared_len) : header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((len >> (8 * i)) & 0xff));
  out << header;
  std::string data(data_bytes, '\x01');
  out << data;
  return path;
}

// Expects SafetensorsFile::open to throw an Error whose message names the file and contains `needle`.
void expect_open_error(const fs::path& path, const std::string& needle) {
  try {
    SafetensorsFile::open(path);
    ADD_FAILURE() << "opening " << path << " did not fail";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find(path.string()), std::string::npos) << msg;
    EXPECT_NE(msg.find(needle), std::string::npos) << "expected '" << needle << "' in: " << msg;
  }
}

}  // namespace

TEST(safetensors, round_trip_every_dtype) {
  std::vector<std::pair<std::string, at::Tensor>> tensors = {
      {"f64", at::randn({3, 2}, at::kDouble)},
      {"f32", at::randn({2, 3, 4})},
      {"f16", at::randn({5}).to(at::kHalf)},
      {"bf16", at::randn({4, 1}).to(at::kBFloat16)},
      {"i64", at::arange(0, 7, at::kLong)},
      {"i32", at::arange(-3, 3, at::kInt)},
      {"i16", at::arange(-2, 2, at::kShort)},
      {"i8", at::arange(-5, 5, at::kChar)},
      {"u8", at::arange(0, 255, at::kByte)},
      {"bool", at::randn({6}).gt(0)},
      {"scalar", at::scalar_tensor(3.5)},
      {"empty", at::empty({0, 4})},
      {"strided", at::randn({4, 6}).t()},  // non-contiguous input is written contiguously
  };
  auto path = scratch() / "all.safetensors";
  save_safetensors(path, tensors, {{"format", "pt"}, {"note", "round trip"}});
  auto file = SafetensorsFile::open(path);
  EXPECT_EQ(file.tensors().size(), tensors.size());
  EXPECT_EQ(file.metadata().at("note"), "round trip");
  for (const auto& [name, t] : tensors) {
    auto back = file.tensor(name);
    EXPECT_EQ(back.scalar_type(), t.scalar_type()) << name;
    EXPECT_EQ(back.sizes(), t.sizes()) << name;
    EXPECT_TRUE(back.equal(t.contiguous())) << name;
  }
  EXPECT_EQ(file.info("f32").numel(), 24);
  EXPECT_EQ(dtype_name(file.info("bf16").dtype), "BF16");
}

TEST(safetensors, tensors_alias_the_mapping_and_outlive_the_file_object) {
  auto path = scratch() / "alias.safetensors";
  auto src = at::randn({64, 64});
  save_safetensors(path, {{"w", src}});
  at::Tensor w;
  {
    auto file = SafetensorsFile::open(path);
    w = file.tensor("w");
    auto w2 = file.tensor("w");
    EXPECT_EQ(w.data_ptr(), w2.data_ptr());  // no copy per access
  }
  EXPECT_TRUE(w.equal(src));  // the mapping stays alive with the tensor
  w.mul_(2);                  // copy-on-write: in-place use never touches the file
  EXPECT_TRUE(SafetensorsFile::open(path).tensor("w").equal(src));
}

TEST(safetensors, unaligned_data_is_copied_not_misread) {
  // Header of odd length and a tensor at data offset 1: valid per the format, misaligned for F32.
  std::string header = R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"F32","shape":[2],"data_offsets":[1,9]}})";
  auto path = scratch() / "unaligned.safetensors";
  {
    std::ofstream out(path, std::ios::binary);
    uint64_t len = header.size();
    for (int i = 0; i < 8; ++i) out.put(static_cast<char>((len >> (8 * i)) & 0xff));
    out << header;
    out.put(7);
    float v[2] = {1.5f, -2.25f};
    out.write(reinterpret_cast<const char*>(v), sizeof v);
  }
  auto file = SafetensorsFile::open(path);
  auto b = file.tensor("b");
  EXPECT_FLOAT_EQ(b[0].item<float>(), 1.5f);
  EXPECT_FLOAT_EQ(b[1].item<float>(), -2.25f);
  EXPECT_EQ(file.tensor("a").item<uint8_t>(), 7);
}

TEST(safetensors, malformed_files_give_clear_errors) {
  const std::string ok_entry = R"("t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]})";
  struct Case {
    std::string name, header;
    size_t data;
    int64_t declared_len;
    std::string needle;
  };
  std::vector<Case> cases = {
      {"huge_header_len.st", "{" + ok_entry + "}", 16, int64_t{1} << 40, "exceeds"},
      {"header_past_end.st", "{" + ok_entry + "}", 0, 5000, "runs past the end"},
      {"invalid_json.st", "{\"t\":{\"dtype\":", 16, -1, "not valid JSON"},
      {"not_object.st", "[1,2,3]", 0, -1, "not a JSON object"},
      {"bad_dtype.st", R"({"t":{"dtype":"F8","shape":[2],"data_offsets":[0,2]}})", 2, -1, "unsupported dtype 'F8'"},
      {"missing_dtype.st", R"({"t":{"shape":[2],"data_offsets":[0,8]}})", 8, -1, "dtype"},
      {"negative_shape.st", R"({"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4, -1, "invalid shape"},
      {"shape_size_mismatch.st", R"({"t":{"dtype":"F32","shape":[3,2],"data_offsets":[0,16]}})", 16, -1,
       "needs 24 bytes"},
      {"offsets_out_of_range.st", R"({"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})", 8, -1,
       "exceed the 8 byte data section"},
      {"reversed_offsets.st", R"({"t":{"dtype":"U8","shape":[0],"data_offsets":[8,0]}})", 8, -1, "reversed"},
      {"overlapping.st",
       R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
       12, -1, "overlap"},
      {"bad_offsets_type.st", R"({"t":{"dtype":"F32","shape":[1],"data_offsets":"0-4"}})", 4, -1, "data_offsets"},
      {"overflowing_shape.st",
       R"({"t":{"dtype":"F64","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}})", 8, -1, "overflowing"},
      {"bad_metadata.st", R"({"__metadata__":{"k":1},)" + ok_entry + "}", 16, -1, "__metadata__"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    expect_open_error(write_raw(c.name, c.header, c.data, c.declared_len), c.needle);
  }
  // A file shorter than the 8-byte length prefix, and one cut inside the data section.
  {
    auto path = scratch() / "tiny.st";
    std::ofstream(path, std::ios::binary) << "abc";
    expect_open_error(path, "too small");
  }
  {
    auto good = scratch() / "good.safetensors";
    save_safetensors(good, {{"w", at::randn({32, 32})}});
    auto cut = scratch() / "truncated.safetensors";
    fs::copy_file(good, cut, fs::copy_options::overwrite_existing);
    fs::resize_file(cut, fs::file_size(good) - 100);
    expect_open_error(cut, "truncated");
  }
  expect_open_error(scratch() / "does_not_exist.safetensors", "cannot open");
}

TEST(safetensors, missing_tensor_is_named) {
  auto path = scratch() / "one.safetensors";
  save_safetensors(path, {{"present", at::ones({1})}});
  auto file = SafetensorsFile::open(path);
  try {
    file.tensor("absent");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'absent'"), std::string::npos);
  }
}

TEST(safetensors, writer_rejects_bad_input_and_keeps_existing_file) {
  auto path = scratch() / "keep.safetensors";
  save_safetensors(path, {{"x", at::ones({2})}});
  auto before = fs::file_size(path);
  EXPECT_THROW(save_safetensors(path, {{"x", at::ones({1})}, {"x", at::ones({1})}}), Error);
  EXPECT_THROW(save_safetensors(path, {{"", at::ones({1})}}), Error);
  EXPECT_THROW(save_safetensors(path, {{"c", at::ones({1}, at::kComplexFloat)}}), Error);
  EXPECT_EQ(fs::file_size(path), before);
  EXPECT_TRUE(SafetensorsFile::open(path).tensor("x").equal(at::ones({2})));
  for (const auto& entry : fs::directory_iterator(scratch())) {
    EXPECT_EQ(entry.path().filename().string().find(".tmp-"), std::string::npos) << "left over " << entry.path();
  }
  EXPECT_THROW(save_safetensors("/nonexistent-dir/x.safetensors", {{"x", at::ones({1})}}), Error);
}

TEST(safetensors, sharded_checkpoint) {
  auto dir = scratch() / "sharded";
  fs::create_directories(dir);
  auto a = at::randn({3, 3}), b = at::randn({4}), c = at::arange(5, at::kLong);
  save_safetensors(dir / "model-00001-of-00002.safetensors", {{"layer.a", a}, {"layer.b", b}});
  save_safetensors(dir / "model-00002-of-00002.safetensors", {{"layer.c", c}});
  nlohmann::json index = {{"metadata", {{"total_size", 0}}},
                          {"weight_map",
                           {{"layer.a", "model-00001-of-00002.safetensors"},
                            {"layer.b", "model-00001-of-00002.safetensors"},
                            {"layer.c", "model-00002-of-00002.safetensors"}}}};
  std::ofstream(dir / "model.safetensors.index.json") << index.dump();
  auto ckpt = Checkpoint::open(dir / "model.safetensors.index.json");
  EXPECT_EQ(ckpt.names(), (std::vector<std::string>{"layer.a", "layer.b", "layer.c"}));
  EXPECT_TRUE(ckpt.tensor("layer.a").equal(a));
  EXPECT_TRUE(ckpt.tensor("layer.c").equal(c));
  EXPECT_EQ(ckpt.file_of("layer.c").filename(), "model-00002-of-00002.safetensors");
  EXPECT_EQ(ckpt.total_bytes(), 9u * 4 + 4u * 4 + 5u * 8);

  index["weight_map"]["layer.d"] = "model-00002-of-00002.safetensors";
  std::ofstream(dir / "bad.safetensors.index.json") << index.dump();
  try {
    Checkpoint::open(dir / "bad.safetensors.index.json");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'layer.d'"), std::string::npos) << e.what();
  }
}

TEST(safetensors, reads_golden_files) {
  auto file = SafetensorsFile::open(sa_test::fixture("data/style_aligned_ops.safetensors"));
  EXPECT_GT(file.tensors().size(), 0u);
  auto feat = file.tensor("style_aligned_ops/tensor_ops/in/feat");
  EXPECT_EQ(feat.sizes(), (std::vector<int64_t>{4, 2, 12, 8}));
  EXPECT_EQ(feat.scalar_type(), at::kFloat);
}
