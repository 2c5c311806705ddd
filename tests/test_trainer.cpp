// The toy model's trainer (tools/train): tiny models overfit a fixed batch, a resumed run continues exactly as the
// uninterrupted one, the export writes a folder our loaders read back, and every model trains through autograd
// (the custom inference kernels fall back to differentiable paths without changing the forward numbers).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "checkpoint.h"
#include "data.h"
#include "stylealigned/error.h"
#include "stylealigned/io/safetensors.h"
#include "stylealigned/models/clip_text.h"
#include "stylealigned/models/tokenizer.h"
#include "stylealigned/models/unet.h"
#include "stylealigned/models/vae.h"
#include "stylealigned/toy/world.h"
#include "support/test_support.h"
#include "toy_model_adapter.h"
#include "trainer.h"

namespace fs = std::filesystem;
namespace train = stylealigned::train;
namespace models = stylealigned::models;
namespace toy = stylealigned::toy;
using nlohmann::json;

namespace {

std::string read(const fs::path& p) {
  std::ifstream in(p);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

fs::path fresh_dir(const std::string& name) {
  fs::path dir = sa_test::scratch_dir("trainer") / name;
  fs::remove_all(dir);
  return dir;
}

std::string tiny_text_encoder_json() {
  json c = json::parse(read(sa_test::data_dir() / "trainer/tiny_text_encoder.json"));
  c["vocab_size"] = toy::tokenizer_vocab_size();
  return c.dump();
}

train::CommonOptions tiny_common(const fs::path& dir, int64_t steps) {
  train::CommonOptions o;
  o.run_dir = dir;
  o.seed = 7;
  o.batch_size = 4;
  o.max_steps = steps;
  o.image_size = 16;
  o.val_size = 4;
  o.val_every = 0;
  o.checkpoint_every = 0;
  o.warmup_steps = 0;
  o.progress = "none";
  return o;
}

train::VaeStageOptions tiny_vae(const fs::path& dir, int64_t steps) {
  train::VaeStageOptions v;
  v.common = tiny_common(dir, steps);
  v.common.lr = 3e-3;
  v.vae_config_json = read(sa_test::data_dir() / "trainer/tiny_vae.json");
  v.stat_images = 8;
  return v;
}

// A vae run the unet tests share (written once per test binary run).
const fs::path& tiny_vae_run() {
  static const fs::path dir = [] {
    fs::path d = fresh_dir("vae_for_unet");
    train::train_vae(tiny_vae(d, 2));
    return d;
  }();
  return dir;
}

train::UnetStageOptions tiny_unet(const fs::path& dir, int64_t steps) {
  train::UnetStageOptions u;
  u.common = tiny_common(dir, steps);
  u.common.lr = 2e-3;
  u.vae_checkpoint = tiny_vae_run();
  u.unet_config_json = read(sa_test::data_dir() / "trainer/tiny_unet.json");
  u.text_encoder_config_json = tiny_text_encoder_json();
  u.ema_decay = 0.9;
  return u;
}

double mean_of_last(const std::vector<double>& v, size_t n) {
  return std::accumulate(v.end() - static_cast<std::ptrdiff_t>(n), v.end(), 0.0) / static_cast<double>(n);
}

}  // namespace

TEST(trainer_data, batches_are_a_function_of_seed_step_and_index) {
  const auto a = train::render_batch(3, train::Stream::train, 5, 0, 3, 16, true);
  const auto b = train::render_batch(3, train::Stream::train, 5, 1, 2, 16, true);  // images 1 and 2 of the same step
  EXPECT_TRUE(at::equal(a.images.narrow(0, 1, 2), b.images));
  EXPECT_EQ(a.captions[1], b.captions[0]);
  const auto c = train::render_batch(3, train::Stream::train, 6, 0, 3, 16, true);
  EXPECT_FALSE(at::equal(a.images, c.images));
  const auto v = train::render_batch(3, train::Stream::validation, 5, 0, 3, 16, true);
  EXPECT_FALSE(at::equal(a.images, v.images));
  EXPECT_GE(a.images.min().item<float>(), -1.0f);
  EXPECT_LE(a.images.max().item<float>(), 1.0f);
  EXPECT_EQ(a.images.sizes(), (std::vector<int64_t>{3, 3, 16, 16}));
}

// The toy tokenizer as the trainer uses it: every caption word is one token, and captions round-trip.
TEST(trainer_tokenizer, every_caption_word_is_one_token) {
  const fs::path dir = fresh_dir("tokenizer");
  toy::write_tokenizer_folder(dir);
  const auto tok = models::ClipTokenizer::from_folder(dir);
  EXPECT_EQ(tok.vocab_size(), toy::tokenizer_vocab_size());
  for (const std::string& word : toy::vocabulary()) {
    EXPECT_EQ(tok.tokenize(word).size(), 1u) << word;
  }
  const std::string caption = "a star in pastel striped style, outlined, on a textured background";
  EXPECT_EQ(tok.tokenize(caption).size(), 13u);
  EXPECT_EQ(tok.decode(tok.tokenize(caption)), caption);
}

TEST(trainer_vae, overfits_a_fixed_batch) {
  auto options = tiny_vae(fresh_dir("vae_overfit"), 40);
  options.common.fixed_batch = true;
  const train::StageResult r = train::train_vae(options);
  ASSERT_EQ(r.losses.size(), 40u);
  const double first = r.losses.front(), last = mean_of_last(r.losses, 5);
  std::printf("vae overfit: loss %.4f -> %.4f (last 5 mean)\n", first, last);
  EXPECT_LT(last, 0.5 * first);
  // Artifacts: checkpoint, loss log (header + one row per step), summary with the latent scale.
  EXPECT_TRUE(fs::exists(options.common.run_dir / "checkpoint.safetensors"));
  const std::string csv = read(options.common.run_dir / "loss.csv");
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 41);
  EXPECT_EQ(csv.substr(0, csv.find('\n')), "step,loss,val_loss,lr,seconds,grad_norm,recon,kl");
  const json summary = json::parse(read(options.common.run_dir / "summary.json"));
  EXPECT_GT(summary.at("scaling_factor").get<double>(), 0.0);
  EXPECT_NEAR(summary.at("scaling_factor").get<double>(), 1.0 / r.latent_std, 1e-9);
  EXPECT_GT(r.images_per_second, 0.0);
}

TEST(trainer_vae, resume_continues_like_an_uninterrupted_run) {
  const train::StageResult straight = train::train_vae(tiny_vae(fresh_dir("vae_straight"), 4));
  const fs::path dir = fresh_dir("vae_resumed");
  train::train_vae(tiny_vae(dir, 3));
  // Without --resume an existing run is refused, naming the flag.
  try {
    train::train_vae(tiny_vae(dir, 4));
    ADD_FAILURE() << "a second run into the same folder was accepted";
  } catch (const stylealigned::Error& e) {
    EXPECT_NE(std::string(e.what()).find("--resume"), std::string::npos) << e.what();
  }
  auto options = tiny_vae(dir, 4);
  options.common.resume = true;
  const train::StageResult resumed = train::train_vae(options);
  ASSERT_EQ(resumed.first_step, 4);
  ASSERT_EQ(resumed.losses.size(), 1u);
  std::printf("vae step 4: uninterrupted %.9g, resumed %.9g\n", straight.losses.back(), resumed.losses.back());
  EXPECT_NEAR(resumed.losses.back(), straight.losses.back(), 1e-6 * std::abs(straight.losses.back()));
  EXPECT_NEAR(resumed.val_loss, straight.val_loss, 1e-6 * straight.val_loss);
  // The log holds each step once.
  const std::string csv = read(dir / "loss.csv");
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 5);
}

TEST(trainer_vae, a_time_budget_ends_the_run_with_a_checkpoint) {
  auto options = tiny_vae(fresh_dir("vae_minutes"), 0);
  options.common.minutes = 0.5 / 60.0;  // half a second, no step limit
  const train::StageResult r = train::train_vae(options);
  EXPECT_TRUE(r.stopped_by_time);
  EXPECT_GE(r.losses.size(), 1u);
  const auto ckpt = train::read_checkpoint(train::checkpoint_path(options.common.run_dir));
  EXPECT_EQ(ckpt.meta.at("step").get<int64_t>(), r.last_step);
  EXPECT_GT(r.val_loss, 0.0);  // validated at the end
}

TEST(trainer_unet, overfits_a_fixed_batch) {
  auto options = tiny_unet(fresh_dir("unet_overfit"), 40);
  options.common.fixed_batch = true;
  options.caption_dropout = 0.0;
  const train::StageResult r = train::train_unet(options);
  ASSERT_EQ(r.losses.size(), 40u);
  const double first = r.losses.front(), last = mean_of_last(r.losses, 5);
  std::printf("unet overfit: loss %.4f -> %.4f (last 5 mean)\n", first, last);
  EXPECT_LT(last, 0.5 * first);
  const std::string csv = read(options.common.run_dir / "loss.csv");
  EXPECT_EQ(csv.substr(0, csv.find('\n')), "step,loss,val_loss,lr,seconds,grad_norm,val_loss_ema");
  EXPECT_TRUE(fs::exists(options.common.run_dir / "tokenizer" / "vocab.json"));
}

TEST(trainer_unet, resume_continues_like_an_uninterrupted_run) {
  const fs::path straight_dir = fresh_dir("unet_straight");
  const train::StageResult straight = train::train_unet(tiny_unet(straight_dir, 4));
  const fs::path dir = fresh_dir("unet_resumed");
  train::train_unet(tiny_unet(dir, 2));
  auto options = tiny_unet(dir, 4);
  options.common.resume = true;
  const train::StageResult resumed = train::train_unet(options);
  ASSERT_EQ(resumed.first_step, 3);
  ASSERT_EQ(resumed.losses.size(), 2u);
  std::printf("unet step 4: uninterrupted %.9g, resumed %.9g\n", straight.losses.back(), resumed.losses.back());
  EXPECT_NEAR(resumed.losses.back(), straight.losses.back(), 1e-6 * std::abs(straight.losses.back()));
  EXPECT_NEAR(resumed.val_loss, straight.val_loss, 1e-6 * straight.val_loss);
  // Weights, optimizer state and EMA of both checkpoints agree.
  const auto a = train::read_checkpoint(train::checkpoint_path(straight_dir));
  const auto b = train::read_checkpoint(train::checkpoint_path(dir));
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  double worst = 0.0;
  for (const auto& [name, t] : a.tensors) {
    ASSERT_TRUE(b.tensors.count(name)) << name;
    worst = std::max(worst, sa_test::max_abs_diff(t, b.tensors.at(name)));
  }
  std::printf("unet checkpoints after 4 steps: max |difference| %.3g over %zu tensors\n", worst, a.tensors.size());
  EXPECT_LT(worst, 1e-6);
}

// The cosine cool-down: lr * step / warmup during the warm-up, then lr_min + (lr - lr_min) (1 + cos(pi p)) / 2
// with p running from 0 after the warm-up to 1 at max_steps; loss.csv logs the rate each step used.
TEST(trainer_schedule, cosine_decays_from_the_peak_to_lr_min_at_max_steps) {
  auto options = tiny_unet(fresh_dir("unet_cosine"), 5);
  options.common.lr = 1e-3;
  options.common.lr_min = 1e-4;
  options.common.warmup_steps = 1;
  options.common.lr_schedule = "cosine";
  train::train_unet(options);
  std::vector<double> lrs;
  std::istringstream csv(read(options.common.run_dir / "loss.csv"));
  std::string line;
  std::getline(csv, line);
  while (std::getline(csv, line)) {
    std::vector<std::string> cells;
    std::stringstream row(line);
    for (std::string c; std::getline(row, c, ',');) cells.push_back(c);
    lrs.push_back(std::stod(cells.at(3)));
  }
  ASSERT_EQ(lrs.size(), 5u);
  for (int step = 1; step <= 5; ++step) {
    const double p = (step - 1) / 4.0;
    const double expected = 1e-4 + 0.9e-3 * 0.5 * (1.0 + std::cos(M_PI * p));
    EXPECT_NEAR(lrs[static_cast<size_t>(step - 1)], expected, 1e-5 * expected) << "step " << step;
  }
  // The schedule ends at max_steps: a run without one, or an lr_min above the peak, is refused.
  auto endless = options;
  endless.common.run_dir = fresh_dir("unet_cosine_endless");
  endless.common.max_steps = 0;
  endless.common.minutes = 1.0;
  EXPECT_THROW(train::train_unet(endless), stylealigned::Error);
  auto inverted = options;
  inverted.common.run_dir = fresh_dir("unet_cosine_inverted");
  inverted.common.lr_min = 2e-3;
  EXPECT_THROW(train::train_unet(inverted), stylealigned::Error);
}

// --init-from: a new run starts from an exported folder's text encoder and UNet (fp32 export here, so the start is
// exact), with the folder's configs; one step at a negligible rate leaves the weights where the folder had them,
// which random initialisation is far from.
TEST(trainer_unet, init_from_starts_from_an_exported_folder) {
  auto source = tiny_unet(fresh_dir("init_source"), 3);
  source.common.lr = 2e-2;  // move the weights well away from the seed's random initialisation
  train::train_unet(source);
  const fs::path folder = fresh_dir("init_folder");
  train::ExportOptions exp{tiny_vae_run(), source.common.run_dir, folder};
  exp.dtype = "fp32";
  exp.use_ema = false;
  train::export_model(exp);

  const auto distance_to_folder = [&](const fs::path& run) {
    const auto ckpt = train::read_checkpoint(train::checkpoint_path(run));
    auto unet = models::UNet2DConditionModel::from_pretrained(folder / "unet");
    auto te = models::CLIPTextModel::from_pretrained(folder / "text_encoder");
    double worst = 0.0;
    for (const auto& p : unet->named_parameters()) {
      worst = std::max(worst, sa_test::max_abs_diff(p.value(), ckpt.tensors.at("unet." + p.key())));
    }
    for (const auto& p : te->named_parameters()) {
      worst = std::max(worst, sa_test::max_abs_diff(p.value(), ckpt.tensors.at("text_encoder." + p.key())));
    }
    return worst;
  };
  auto init = tiny_unet(fresh_dir("init_run"), 1);
  init.common.lr = 1e-9;
  init.common.weight_decay = 0.0;
  init.unet_config_json.clear();
  init.text_encoder_config_json.clear();
  init.init_from = folder;
  train::train_unet(init);
  auto scratch = init;
  scratch.common.run_dir = fresh_dir("init_scratch");
  scratch.init_from.clear();
  scratch.unet_config_json = read(folder / "unet" / "config.json");
  scratch.text_encoder_config_json = read(folder / "text_encoder" / "config.json");
  train::train_unet(scratch);
  const double from_folder = distance_to_folder(init.common.run_dir);
  const double from_scratch = distance_to_folder(scratch.common.run_dir);
  std::printf("init-from: max |weight - folder| %.3g (random start: %.3g)\n", from_folder, from_scratch);
  EXPECT_LT(from_folder, 1e-6);
  EXPECT_GT(from_scratch, 1e-2);
  EXPECT_EQ(train::read_checkpoint(train::checkpoint_path(init.common.run_dir)).meta.value("init_from", ""),
            folder.string());
  // A config in which some folder tensor has no same-shaped home does not grow the folder's model: refused.
  auto other = init;
  other.common.run_dir = fresh_dir("init_other");
  json wider = sa_test::read_json(folder / "unet" / "config.json");
  wider["block_out_channels"] = {16, 48};
  other.unet_config_json = wider.dump();
  try {
    train::train_unet(other);
    ADD_FAILURE() << "a config that does not grow the folder's model was accepted";
  } catch (const stylealigned::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("does not grow"), std::string::npos) << what;
    EXPECT_NE(what.find("unet.down_blocks.1.resnets.0.conv1.weight"), std::string::npos) << what;  // names a tensor at fault
  }

  // A grown config (a second transformer layer per attention): the folder's tensors load by name, the new layers
  // start as identities, so the grown model computes what the folder's does (probe deviation 0, the same first
  // loss on the same data as a plain --init-from run) and only the new tensors are extra.
  auto grown = init;
  grown.common.run_dir = fresh_dir("init_grown");
  json deeper = sa_test::read_json(folder / "unet" / "config.json");
  deeper["transformer_layers_per_block"] = 2;
  grown.unet_config_json = deeper.dump();
  const train::StageResult grown_result = train::train_unet(grown);
  auto plain = init;
  plain.common.run_dir = fresh_dir("init_plain");
  const train::StageResult plain_result = train::train_unet(plain);
  const auto ckpt = train::read_checkpoint(train::checkpoint_path(grown.common.run_dir));
  const json growth = ckpt.meta.at("growth");
  std::printf("grown: %s; first loss %.9g (plain init-from %.9g)\n", growth.dump().c_str(),
              grown_result.losses.front(), plain_result.losses.front());
  EXPECT_EQ(growth.at("text_encoder_new_tensors").get<int>(), 0);
  EXPECT_GT(growth.at("unet_new_tensors").get<int>(), 0);
  EXPECT_LT(growth.at("probe_max_abs_unet").get<double>(), 1e-6);
  EXPECT_NEAR(grown_result.losses.front(), plain_result.losses.front(), 1e-5 * plain_result.losses.front());
  auto folder_unet = models::UNet2DConditionModel::from_pretrained(folder / "unet");
  double worst = 0.0;
  for (const auto& p : folder_unet->named_parameters()) {
    worst = std::max(worst, sa_test::max_abs_diff(p.value(), ckpt.tensors.at("unet." + p.key())));
  }
  EXPECT_LT(worst, 1e-6);
  const std::string added = "unet.down_blocks.0.attentions.0.transformer_blocks.1.";
  ASSERT_TRUE(ckpt.tensors.count(added + "attn1.to_out.0.weight"));
  EXPECT_LT(ckpt.tensors.at(added + "attn1.to_out.0.weight").abs().max().item<double>(), 1e-6);
  EXPECT_GT(ckpt.tensors.at(added + "attn1.to_q.weight").abs().max().item<double>(), 1e-2);  // random, not zero
}

TEST(trainer_export, writes_a_folder_the_loaders_read) {
  // Tiny configs: export writes the checkpoints' own configs beside the weights.
  auto vae_options = tiny_vae(fresh_dir("export_vae"), 1);
  vae_options.stat_images = 2;
  const auto vae_result = train::train_vae(vae_options);
  auto unet_options = tiny_unet(fresh_dir("export_unet"), 2);
  unet_options.vae_checkpoint = vae_options.common.run_dir;
  train::train_unet(unet_options);

  const fs::path out = fresh_dir("export_model");
  train::export_model({vae_options.common.run_dir, unet_options.common.run_dir, out});
  const json index = sa_test::read_json(out / "model_index.json");
  EXPECT_EQ(index.at("_class_name"), "StableDiffusionPipeline");
  auto unet = models::UNet2DConditionModel::from_pretrained(out / "unet");
  auto vae = models::AutoencoderKL::from_pretrained(out / "vae");
  auto te = models::CLIPTextModel::from_pretrained(out / "text_encoder");
  auto tok = models::ClipTokenizer::from_folder(out / "tokenizer");
  EXPECT_NEAR(vae->config().scaling_factor, vae_result.scaling_factor, 1e-6 * vae_result.scaling_factor);
  EXPECT_EQ(te->config().vocab_size, tok.vocab_size());
  EXPECT_EQ(unet->config().block_out_channels, (std::vector<int64_t>{16, 32}));
  // The exported UNet is the EMA one, rounded to fp16.
  const auto ckpt = train::read_checkpoint(train::checkpoint_path(unet_options.common.run_dir));
  for (const auto& p : unet->named_parameters()) {
    const at::Tensor expected = ckpt.tensors.at("ema.unet." + p.key()).to(at::kHalf).to(at::kFloat);
    ASSERT_TRUE(at::equal(p.value(), expected)) << p.key();
  }
  // Exporting again into a non-empty folder needs overwrite.
  EXPECT_THROW(train::export_model({vae_options.common.run_dir, unet_options.common.run_dir, out}),
               stylealigned::Error);
}

// Every model trains through our own modules: gradients reach every parameter, and the forward numbers under
// autograd (differentiable fallbacks) match the inference kernels.
TEST(trainer_autograd, every_parameter_gets_a_gradient_and_forwards_agree) {
  at::manual_seed(0);
  auto unet = models::UNet2DConditionModel::from_config(
      models::UNetConfig::from_json(read(sa_test::data_dir() / "trainer/tiny_unet.json")));
  const fs::path te_file = fresh_dir("autograd") / "te.json";
  fs::create_directories(te_file.parent_path());
  std::ofstream(te_file) << tiny_text_encoder_json();
  models::CLIPTextModel te(std::make_shared<models::CLIPTextModelImpl>(models::CLIPTextConfig::from_file(te_file)));
  auto vae = models::AutoencoderKL::from_config(
      models::VAEConfig::from_json(read(sa_test::data_dir() / "trainer/tiny_vae.json")));

  const at::Tensor ids = at::randint(0, toy::tokenizer_vocab_size() - 2, {2, 77}, at::kLong);
  const at::Tensor x = at::randn({2, 4, 8, 8});
  const at::Tensor t = at::tensor({10, 900}, at::kLong);
  const at::Tensor img = at::rand({2, 3, 16, 16}) * 2 - 1;

  at::Tensor eps_inference, rec_inference;
  {
    at::NoGradGuard no_grad;
    eps_inference = unet->forward(x, t, te->forward(ids).last_hidden_state);
    rec_inference = vae->decode(vae->encode(img).mean);
  }
  const at::Tensor eps = unet->forward(x, t, te->forward(ids).last_hidden_state);
  const at::Tensor rec = vae->decode(vae->encode(img).mean);
  const double eps_diff = sa_test::max_abs_diff(eps, eps_inference);
  const double rec_diff = sa_test::max_abs_diff(rec, rec_inference);
  std::printf("forward under autograd vs inference: unet %.3g, vae %.3g\n", eps_diff, rec_diff);
  EXPECT_LT(eps_diff, 1e-5);
  EXPECT_LT(rec_diff, 1e-5);
  (eps.pow(2).mean() + rec.pow(2).mean()).backward();
  for (const torch::nn::Module* m : std::vector<const torch::nn::Module*>{&*unet, &*te, &*vae}) {
    for (const auto& p : m->named_parameters()) {
      ASSERT_TRUE(p.value().grad().defined()) << p.key();
      EXPECT_TRUE(at::isfinite(p.value().grad()).all().item<bool>()) << p.key();
    }
  }
  // The token embedding gets gradient only in the rows of used ids; every other parameter must move.
  int64_t zero = 0, total = 0;
  for (const torch::nn::Module* m : std::vector<const torch::nn::Module*>{&*unet, &*te, &*vae}) {
    for (const auto& p : m->named_parameters()) {
      ++total;
      if (p.value().grad().abs().sum().item<double>() == 0.0) {
        ++zero;
        ADD_FAILURE() << p.key() << " got an all-zero gradient";
      }
    }
  }
  std::printf("%lld parameters, %lld with an all-zero gradient\n", static_cast<long long>(total),
              static_cast<long long>(zero));
}
