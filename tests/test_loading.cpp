// Checkpoint loading: name/shape checks reported all at once, dtype conversion, sharded checkpoints, file lookup.
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "stylealigned/error.h"
#include "stylealigned/io/safetensors.h"
#include "stylealigned/log.h"
#include "stylealigned/models/loading.h"
#include "support/test_support.h"

namespace fs = std::filesystem;
namespace io = stylealigned::io;
namespace models = stylealigned::models;
using stylealigned::Error;

namespace {

// A small module with the shapes loading cares about: nested names, a 1-D norm, an integer buffer.
struct BlockImpl : torch::nn::Module {
  BlockImpl() {
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({3})));
    proj = register_module("proj", torch::nn::Linear(3, 5));
  }
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Linear proj{nullptr};
};
TORCH_MODULE(Block);

struct TinyImpl : torch::nn::Module {
  TinyImpl() {
    fc = register_module("fc", torch::nn::Linear(4, 3));
    block = register_module("block", Block());
    ids = register_buffer("ids", at::arange(6, at::kLong));
    scale = register_parameter("scale", at::randn({2, 2}));
  }
  torch::nn::Linear fc{nullptr};
  Block block{nullptr};
  at::Tensor ids, scale;
};
TORCH_MODULE(Tiny);

using Named = std::vector<std::pair<std::string, at::Tensor>>;

Named state_of(const torch::nn::Module& m) {
  Named out;
  for (const auto& p : m.named_parameters()) out.emplace_back(p.key(), p.value().detach().clone());
  for (const auto& b : m.named_buffers()) out.emplace_back(b.key(), b.value().detach().clone());
  return out;
}

Named converted(Named tensors, at::ScalarType dtype) {
  for (auto& [name, t] : tensors) {
    if (t.is_floating_point()) t = t.to(dtype);
  }
  return tensors;
}

std::string load_error(torch::nn::Module& m, const fs::path& file, const models::LoadOptions& options = {}) {
  try {
    models::load_weights(m, io::Checkpoint::open(file), options);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

void expect_state_equal(const torch::nn::Module& m, const Named& expected) {
  const Named actual = state_of(m);
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < actual.size(); ++i) {
    EXPECT_EQ(actual[i].first, expected[i].first);
    EXPECT_EQ(actual[i].second.scalar_type(), expected[i].second.scalar_type()) << actual[i].first;
    EXPECT_TRUE(actual[i].second.equal(expected[i].second)) << actual[i].first;
  }
}

class LoadingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    at::manual_seed(7);
    dir_ = sa_test::scratch_dir("loading") / ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    source_ = Tiny();
    saved_ = state_of(*source_);
  }
  fs::path dir_;
  Tiny source_{nullptr};
  Named saved_;
};

}  // namespace

TEST_F(LoadingTest, RoundTripLoadsEveryParameterAndBuffer) {
  const auto file = dir_ / "model.safetensors";
  io::save_safetensors(file, saved_);
  Tiny target;
  EXPECT_FALSE(target->fc->weight.equal(source_->fc->weight));
  EXPECT_TRUE(models::check_weights(*target, io::Checkpoint::open(file)).ok());
  models::load_weights(*target, io::Checkpoint::open(file));
  expect_state_equal(*target, saved_);
  // Parameters stay parameters (trainable). fp32 files loaded as fp32 alias the mapping (map_weights, the default).
  EXPECT_TRUE(target->fc->weight.requires_grad());
  EXPECT_FALSE(target->fc->weight.storage().resizable());
  EXPECT_EQ(target->named_parameters().size(), source_->named_parameters().size());

  // map_weights off: every tensor owns its memory.
  Tiny copied;
  models::LoadOptions copy;
  copy.map_weights = false;
  models::load_weights(*copied, io::Checkpoint::open(file), copy);
  expect_state_equal(*copied, saved_);
  EXPECT_TRUE(copied->fc->weight.storage().resizable());
  EXPECT_TRUE(copied->ids.storage().resizable());
}

TEST_F(LoadingTest, WritingAMappedParameterLeavesTheFileAlone) {
  // A training step (or any in-place edit) on mapped weights copies the touched pages privately; the file, and a
  // second model loaded from it, keep the saved values.
  const auto file = dir_ / "model.safetensors";
  io::save_safetensors(file, saved_);
  Tiny trained;
  models::load_weights(*trained, io::Checkpoint::open(file));
  ASSERT_FALSE(trained->fc->weight.storage().resizable()) << "the weight should alias the mapping";
  const at::Tensor loss = trained->fc->forward(at::ones({2, 4})).sum();
  loss.backward();
  ASSERT_TRUE(trained->fc->weight.grad().defined());
  {
    at::NoGradGuard no_grad;
    trained->fc->weight.sub_(trained->fc->weight.grad(), 0.5);
    trained->scale.add_(1.0);
  }
  EXPECT_FALSE(trained->fc->weight.equal(source_->fc->weight));
  Tiny fresh;
  models::load_weights(*fresh, io::Checkpoint::open(file));
  expect_state_equal(*fresh, saved_);
  EXPECT_TRUE(io::Checkpoint::open(file).tensor("scale").equal(source_->scale));
}

TEST_F(LoadingTest, ReleasedFilePagesStayReadable) {
  // Tensors spanning many pages: loading drops their file pages from memory after copying; the checkpoint must
  // still read back the same values afterwards (the kernel re-reads them from the file).
  torch::nn::Linear big(300, 200);
  const Named state = state_of(*big);
  const auto file = dir_ / "big.safetensors";
  io::save_safetensors(file, state);
  const auto checkpoint = io::Checkpoint::open(file);
  // How the loader recognises a tensor that aliases the mapping (and may drop its pages): a non-resizable storage
  // without allocator, as at::from_blob makes.
  EXPECT_EQ(checkpoint.tensor("weight").storage().allocator(), nullptr);
  EXPECT_FALSE(checkpoint.tensor("weight").storage().resizable());
  torch::nn::Linear target(300, 200);
  models::LoadOptions copy;  // the copying path is the one that drops pages
  copy.map_weights = false;
  models::load_weights(*target, checkpoint, copy);
  expect_state_equal(*target, state);
  EXPECT_TRUE(checkpoint.tensor("weight").equal(state[0].second));
  EXPECT_TRUE(checkpoint.tensor("bias").equal(state[1].second));
}

TEST_F(LoadingTest, RenamedTensorIsReportedMissingAndUnexpected) {
  Named renamed = saved_;
  for (auto& [name, t] : renamed) {
    if (name == "block.proj.weight") name = "block.proj.weights";
  }
  const auto file = dir_ / "renamed.safetensors";
  io::save_safetensors(file, renamed);
  Tiny target;
  const Named before = state_of(*target);
  const std::string msg = load_error(*target, file);
  ASSERT_FALSE(msg.empty());
  EXPECT_TRUE(contains(msg, file.string())) << msg;
  EXPECT_TRUE(contains(msg, "missing from the checkpoint (1)")) << msg;
  EXPECT_TRUE(contains(msg, "block.proj.weight [5, 3]")) << msg;
  EXPECT_TRUE(contains(msg, "unexpected in the checkpoint (1)")) << msg;
  EXPECT_TRUE(contains(msg, "block.proj.weights [5, 3]")) << msg;
  EXPECT_FALSE(contains(msg, "mismatch")) << msg;
  expect_state_equal(*target, before);  // nothing was copied

  const auto report = models::check_weights(*target, io::Checkpoint::open(file));
  EXPECT_EQ(report.missing, std::vector<std::string>{"block.proj.weight [5, 3]"});
  EXPECT_EQ(report.unexpected, std::vector<std::string>{"block.proj.weights [5, 3]"});
  EXPECT_TRUE(report.mismatched.empty());
}

TEST_F(LoadingTest, ReshapedTensorIsReportedWithBothShapes) {
  Named reshaped = saved_;
  for (auto& [name, t] : reshaped) {
    if (name == "fc.weight") t = t.t().contiguous();
  }
  const auto file = dir_ / "reshaped.safetensors";
  io::save_safetensors(file, reshaped);
  Tiny target;
  const Named before = state_of(*target);
  const std::string msg = load_error(*target, file);
  ASSERT_FALSE(msg.empty());
  EXPECT_TRUE(contains(msg, file.string())) << msg;
  EXPECT_TRUE(contains(msg, "shape or dtype mismatch (1)")) << msg;
  EXPECT_TRUE(contains(msg, "fc.weight: checkpoint F32 [4, 3] vs model Float [3, 4]")) << msg;
  EXPECT_FALSE(contains(msg, "missing")) << msg;
  EXPECT_FALSE(contains(msg, "unexpected")) << msg;
  expect_state_equal(*target, before);
}

TEST_F(LoadingTest, TruncatedFileIsRejectedBeforeLoading) {
  const auto file = dir_ / "truncated.safetensors";
  io::save_safetensors(file, saved_);
  fs::resize_file(file, fs::file_size(file) - 10);
  Tiny target;
  const Named before = state_of(*target);
  const std::string msg = load_error(*target, file);
  ASSERT_FALSE(msg.empty());
  EXPECT_TRUE(contains(msg, file.string())) << msg;
  // A defect of the file, not a model mismatch.
  EXPECT_FALSE(contains(msg, "missing from the checkpoint")) << msg;
  EXPECT_FALSE(contains(msg, "mismatch")) << msg;
  expect_state_equal(*target, before);
}

TEST_F(LoadingTest, EveryProblemIsReportedAtOnce) {
  Named broken;
  for (auto [name, t] : saved_) {
    if (name == "scale") continue;                      // missing
    if (name == "block.norm.bias") t = at::zeros({4});  // mis-shaped
    if (name == "ids") t = t.to(at::kFloat);            // wrong kind: float where the model has int64
    broken.emplace_back(name, t);
  }
  broken.emplace_back("extra.weight", at::zeros({1}));  // unexpected
  const auto file = dir_ / "broken.safetensors";
  io::save_safetensors(file, broken);
  Tiny target;
  const std::string msg = load_error(*target, file);
  EXPECT_TRUE(contains(msg, "scale [2, 2]")) << msg;
  EXPECT_TRUE(contains(msg, "block.norm.bias: checkpoint F32 [4] vs model Float [3]")) << msg;
  EXPECT_TRUE(contains(msg, "ids: checkpoint F32 [6] vs model Long [6]")) << msg;
  EXPECT_TRUE(contains(msg, "extra.weight [1]")) << msg;
  std::printf("%s\n", msg.c_str());  // what a user sees
}

TEST_F(LoadingTest, HalfAndBFloat16FilesLoadIntoFloat32) {
  for (auto dtype : {at::kHalf, at::kBFloat16}) {
    SCOPED_TRACE(c10::toString(dtype));
    const auto file = dir_ / fmt::format("{}.safetensors", c10::toString(dtype));
    const Named stored = converted(saved_, dtype);
    io::save_safetensors(file, stored);
    EXPECT_EQ(io::Checkpoint::open(file).info("fc.weight").dtype,
              dtype == at::kHalf ? io::DType::F16 : io::DType::BF16);
    Tiny target;
    models::load_weights(*target, io::Checkpoint::open(file));
    // Exactly the stored values widened to float32; the integer buffer keeps its dtype.
    expect_state_equal(*target, converted(stored, at::kFloat));
  }
}

TEST_F(LoadingTest, ConvertsToTheRequestedDtype) {
  const auto file = dir_ / "model.safetensors";
  io::save_safetensors(file, saved_);
  Tiny target;
  models::LoadOptions options;
  options.dtype = at::kBFloat16;
  models::load_weights(*target, io::Checkpoint::open(file), options);
  EXPECT_EQ(target->fc->weight.scalar_type(), at::kBFloat16);
  EXPECT_EQ(target->block->norm->weight.scalar_type(), at::kBFloat16);
  EXPECT_EQ(target->ids.scalar_type(), at::kLong);
  expect_state_equal(*target, converted(saved_, at::kBFloat16));

  options.dtype = at::kLong;
  const std::string msg = load_error(*target, file, options);
  EXPECT_TRUE(contains(msg, "floating")) << msg;
}

TEST_F(LoadingTest, ShardedIndexLoads) {
  Named first(saved_.begin(), saved_.begin() + 3), second(saved_.begin() + 3, saved_.end());
  io::save_safetensors(dir_ / "model-00001-of-00002.safetensors", first);
  io::save_safetensors(dir_ / "model-00002-of-00002.safetensors", second);
  nlohmann::json index;
  index["metadata"]["total_size"] = 0;
  for (const auto& [name, t] : first) index["weight_map"][name] = "model-00001-of-00002.safetensors";
  for (const auto& [name, t] : second) index["weight_map"][name] = "model-00002-of-00002.safetensors";
  std::ofstream(dir_ / "model.safetensors.index.json") << index.dump(2);

  const fs::path found = models::find_weights(dir_, {"model"});
  EXPECT_EQ(found.filename(), "model.safetensors.index.json");
  Tiny target;
  models::load_weights(*target, io::Checkpoint::open(found));
  expect_state_equal(*target, saved_);
}

TEST_F(LoadingTest, UnexpectedTensorsErrorWarnOrAreIgnored) {
  Named extra = saved_;
  extra.emplace_back("text_model.embeddings.position_ids", at::arange(77, at::kLong).unsqueeze(0));
  const auto file = dir_ / "extra.safetensors";
  io::save_safetensors(file, extra);

  std::vector<std::string> warnings;
  auto previous = stylealigned::set_warning_handler([&](std::string_view m) { warnings.emplace_back(m); });

  Tiny strict;
  const std::string msg = load_error(*strict, file);
  EXPECT_TRUE(contains(msg, "unexpected in the checkpoint (1)")) << msg;
  EXPECT_TRUE(contains(msg, "text_model.embeddings.position_ids [1, 77]")) << msg;

  Tiny lenient;
  models::LoadOptions allow;
  allow.allow_unexpected = true;
  models::load_weights(*lenient, io::Checkpoint::open(file), allow);
  expect_state_equal(*lenient, saved_);
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_TRUE(contains(warnings[0], "text_model.embeddings.position_ids")) << warnings[0];
  EXPECT_TRUE(contains(warnings[0], file.string())) << warnings[0];

  warnings.clear();
  Tiny ignoring;
  models::LoadOptions ignore;
  ignore.ignore = {"text_model.embeddings.position_ids"};
  EXPECT_TRUE(models::check_weights(*ignoring, io::Checkpoint::open(file), ignore).ok());
  models::load_weights(*ignoring, io::Checkpoint::open(file), ignore);
  expect_state_equal(*ignoring, saved_);
  EXPECT_TRUE(warnings.empty());

  stylealigned::set_warning_handler(previous);
}

TEST_F(LoadingTest, FindWeightsPrefersSingleFilesAndHonoursFp16) {
  const Named small = {{"x", at::zeros({1})}};
  auto touch = [&](const std::string& name) { io::save_safetensors(dir_ / name, small); };

  try {
    models::find_weights(dir_, {"diffusion_pytorch_model"});
    ADD_FAILURE() << "empty folder accepted";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_TRUE(contains(msg, dir_.string())) << msg;
    EXPECT_TRUE(contains(msg, "diffusion_pytorch_model.safetensors")) << msg;
    EXPECT_TRUE(contains(msg, "diffusion_pytorch_model.fp16.safetensors")) << msg;
    EXPECT_TRUE(contains(msg, "diffusion_pytorch_model.safetensors.index.json")) << msg;
  }
  std::ofstream(dir_ / "model.bin") << "pickle";
  try {
    models::find_weights(dir_, {"model"});
    ADD_FAILURE() << "folder with only a .bin accepted";
  } catch (const Error& e) {
    EXPECT_TRUE(contains(e.what(), "model.bin")) << e.what();
  }

  std::ofstream(dir_ / "model.safetensors.index.json") << "{}";
  EXPECT_EQ(models::find_weights(dir_, {"model"}).filename(), "model.safetensors.index.json");
  touch("model.fp16.safetensors");
  EXPECT_EQ(models::find_weights(dir_, {"model"}).filename(), "model.fp16.safetensors");
  touch("model.safetensors");
  EXPECT_EQ(models::find_weights(dir_, {"model"}).filename(), "model.safetensors");
  EXPECT_EQ(models::find_weights(dir_, {"model"}, /*prefer_fp16=*/true).filename(), "model.fp16.safetensors");
  // Stems are tried in order.
  touch("diffusion_pytorch_model.safetensors");
  EXPECT_EQ(models::find_weights(dir_, {"diffusion_pytorch_model", "model"}).filename(),
            "diffusion_pytorch_model.safetensors");
  EXPECT_THROW(models::find_weights(dir_ / "nope", {"model"}), Error);
}
