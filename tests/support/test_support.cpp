#include "support/test_support.h"

#include "stylealigned/io/safetensors.h"

#include <fmt/format.h>

#include <fstream>
#include <map>
#include <set>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <stdexcept>

namespace sa_test {

std::filesystem::path data_dir() { return STYLEALIGNED_TEST_DATA; }
std::filesystem::path golden_dir() { return STYLEALIGNED_GOLDEN_DIR; }

std::filesystem::path scratch_dir(const std::string& name) {
  auto dir = std::filesystem::path(STYLEALIGNED_TEST_BINARY_DIR) / "scratch" / name;
  std::filesystem::create_directories(dir);
  return dir;
}

std::filesystem::path fixture(const std::string& relative) {
  auto local = data_dir() / "golden" / relative;
  if (std::filesystem::exists(local)) return local;
  auto golden = golden_dir() / relative;
  if (std::filesystem::exists(golden)) return golden;
  throw std::runtime_error(fmt::format("test fixture '{}' found neither at {} nor at {}", relative, local.string(),
                                       golden.string()));
}

nlohmann::json read_json(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path.string());
  return nlohmann::json::parse(in);
}

const nlohmann::json& golden_manifest() {
  static const nlohmann::json m = read_json(fixture("manifest.json"));
  return m;
}

std::vector<nlohmann::json> golden_cases(const std::string& kind) {
  std::vector<nlohmann::json> out;
  for (const auto& c : golden_manifest().at("cases")) {
    if (c.at("kind") == kind) out.push_back(c);
  }
  if (out.empty()) throw std::runtime_error(fmt::format("golden manifest.json has no case of kind '{}'", kind));
  return out;
}

at::Tensor golden_tensor(const nlohmann::json& c, const nlohmann::json& ref) {
  static std::map<std::string, stylealigned::io::SafetensorsFile> files;
  const std::string file = c.at("file");
  auto it = files.find(file);
  if (it == files.end()) it = files.emplace(file, stylealigned::io::SafetensorsFile::open(fixture(file))).first;
  return it->second.tensor(ref.at("key").get<std::string>());
}

std::filesystem::path tokenizer_folder(const std::string& relative) {
  namespace fs = std::filesystem;
  fs::path folder = scratch_dir("folders") / relative;
  fs::create_directories(folder);
  auto copy = [&](const fs::path& from, const char* name) {
    // Copy under a private name, then rename (atomic): test binaries running in parallel assemble the same folders.
    fs::path tmp = folder / name;
    tmp += ".tmp" + std::to_string(::getpid());
    fs::copy_file(from, tmp, fs::copy_options::overwrite_existing);
    // Sources may be read-only (the shared golden folder); the next run must be able to overwrite the copy.
    fs::permissions(tmp, fs::perms::owner_write, fs::perm_options::add);
    fs::rename(tmp, folder / name);
  };
  for (const char* name : {"vocab.json", "merges.txt"}) copy(data_dir() / "clip" / name, name);
  for (const char* name : {"special_tokens_map.json", "tokenizer_config.json"}) {
    copy(fixture(relative + "/" + name), name);
  }
  return folder;
}

std::filesystem::path model_folder(const std::string& model) { return assembled_folder("models/" + model); }

std::filesystem::path assembled_folder(const std::string& rel) {
  namespace fs = std::filesystem;
  fs::path folder = scratch_dir("model_folders") / rel;
  // Every file of the model, from the committed copies first, then the shared golden folder; linked, not copied.
  std::set<fs::path> files;
  for (const auto& root : {data_dir() / "golden" / rel, golden_dir() / rel}) {
    if (!fs::is_directory(root)) continue;
    for (const auto& e : fs::recursive_directory_iterator(root)) {
      if (e.is_regular_file()) files.insert(fs::relative(e.path(), root));
    }
  }
  if (files.empty()) throw std::runtime_error("no model fixture " + rel);
  // A tokenizer folder gets the one committed vocabulary even where no golden folder holds it.
  for (const auto& f : std::set<fs::path>(files)) {
    if (f.filename() == "tokenizer_config.json") {
      files.insert(f.parent_path() / "vocab.json");
      files.insert(f.parent_path() / "merges.txt");
    }
  }
  for (const auto& f : files) {
    const auto name = f.filename().string();
    const bool vocab = name == "vocab.json" || name == "merges.txt";
    const fs::path source = vocab ? data_dir() / "clip" / name : fixture(rel + "/" + f.string());
    fs::create_directories((folder / f).parent_path());
    // Test binaries run in parallel and may assemble the same folder: link under a private name, then rename
    // (atomic) over whatever is there.
    fs::path tmp = folder / f;
    tmp += ".tmp" + std::to_string(::getpid());
    fs::remove(tmp);
    fs::create_symlink(fs::absolute(source), tmp);
    fs::rename(tmp, folder / f);
  }
  return folder;
}

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

CommandResult run_command(const std::string& command) {
  CommandResult r;
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return r;
  char buffer[4096];
  while (size_t n = std::fread(buffer, 1, sizeof buffer, pipe)) r.output.append(buffer, n);
  const int status = ::pclose(pipe);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

::testing::AssertionResult AllClose(const at::Tensor& actual, const at::Tensor& expected, double atol, double rtol) {
  if (!actual.defined() || !expected.defined()) return ::testing::AssertionFailure() << "undefined tensor";
  if (actual.sizes() != expected.sizes()) {
    return ::testing::AssertionFailure() << "shape " << actual.sizes() << " != expected " << expected.sizes();
  }
  if (actual.numel() == 0) return ::testing::AssertionSuccess();
  auto a = actual.detach().to(at::kCPU).to(at::kDouble).contiguous();
  auto e = expected.detach().to(at::kCPU).to(at::kDouble).contiguous();
  auto diff = (a - e).abs();
  auto bound = atol + rtol * e.abs();
  auto bad = diff.gt(bound).logical_or(diff.isnan());
  double max_diff = diff.masked_fill(diff.isnan(), INFINITY).max().item<double>();
  int64_t n_bad = bad.sum().item<int64_t>();
  if (n_bad == 0) return ::testing::AssertionSuccess() << "max abs diff " << max_diff;
  int64_t worst = diff.masked_fill(diff.isnan(), INFINITY).flatten().argmax().item<int64_t>();
  return ::testing::AssertionFailure() << fmt::format(
             "{} of {} elements differ beyond atol {} rtol {}; max abs diff {:.3g} at flat index {} (actual {:.8g}, "
             "expected {:.8g})",
             n_bad, a.numel(), atol, rtol, max_diff, worst, a.flatten()[worst].item<double>(),
             e.flatten()[worst].item<double>());
}

}  // namespace sa_test
