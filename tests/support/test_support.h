// Shared helpers of the test executables: fixture lookup and tensor comparison with readable failures.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace sa_test {

/// tests/data in the source tree.
std::filesystem::path data_dir();
/// The shared golden folder (../shared/golden next to the clone unless configured otherwise). May not exist.
std::filesystem::path golden_dir();
/// A scratch folder for this test binary, created on demand, under the build tree.
std::filesystem::path scratch_dir(const std::string& name);

/// `tests/data/golden/<relative>` when present, else `<golden>/<relative>`; throws std::runtime_error naming both when
/// neither exists (so a test fails instead of skipping).
std::filesystem::path fixture(const std::string& relative);

nlohmann::json read_json(const std::filesystem::path& path);

/// A complete CLIP tokenizer folder, assembled in the scratch tree from the one committed copy of vocab.json and
/// merges.txt (tests/data/clip/) and the folder's own small JSON files (`fixture(relative + "/...json")`), so tests
/// load it through from_folder as a real model folder. `relative` is e.g. "models/sdxl_tiny/tokenizer_2".
std::filesystem::path tokenizer_folder(const std::string& relative);
/// A complete diffusers folder of golden model `model` (e.g. "sd15_tiny") assembled in the build tree from symlinks:
/// committed copies under tests/data/golden first, else the shared golden folder; vocab.json and merges.txt always
/// from the one copy in tests/data/clip.
std::filesystem::path model_folder(const std::string& model);
/// The same for any golden folder below the golden root, e.g. "eval/models/clip_tiny" (a CLIP folder with its
/// tokenizer files).
std::filesystem::path assembled_folder(const std::string& relative);

/// The golden manifest (`fixture("manifest.json")`), read once per test binary.
const nlohmann::json& golden_manifest();
/// The manifest's cases of one `kind`, in manifest order. Throws std::runtime_error naming the kind when there are
/// none, so a renamed or missing kind fails its tests instead of letting a loop over nothing pass.
std::vector<nlohmann::json> golden_cases(const std::string& kind);
/// The tensor a case refers to: `ref` is one entry of its "inputs" or "outputs" (`{"key": ...}`), read from the case's
/// safetensors "file"; each file is opened (mapped) once per test binary.
at::Tensor golden_tensor(const nlohmann::json& c, const nlohmann::json& ref);

/// `s` as one single-quoted shell word.
std::string shell_quote(const std::string& s);

/// What a shell command printed on stdout (append " 2>&1" to capture stderr too) and its exit code (-1 when it did
/// not exit normally or could not start).
struct CommandResult {
  int code = -1;
  std::string output;
};
CommandResult run_command(const std::string& command);

/// Element-wise |actual - expected| <= atol + rtol * |expected| (NaN never passes; shapes must match).
::testing::AssertionResult AllClose(const at::Tensor& actual, const at::Tensor& expected, double atol,
                                    double rtol = 0.0);
/// max |a - b| as double (both converted to float64).
double max_abs_diff(const at::Tensor& a, const at::Tensor& b);

}  // namespace sa_test

#define EXPECT_ALLCLOSE(actual, expected, atol) EXPECT_TRUE(::sa_test::AllClose((actual), (expected), (atol)))
#define ASSERT_ALLCLOSE(actual, expected, atol) ASSERT_TRUE(::sa_test::AllClose((actual), (expected), (atol)))
