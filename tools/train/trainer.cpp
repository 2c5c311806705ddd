#include "trainer.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <fstream>
#include <functional>
#include <iterator>
#include <future>
#include <optional>
#include <nlohmann/json.hpp>
#include <utility>

#include <unistd.h>

#include "checkpoint.h"
#include "data.h"
#include "optim.h"
#include "progress.h"
#include "stylealigned/ddim.h"
#include "stylealigned/error.h"
#include "stylealigned/log.h"
#include "stylealigned/models/clip_text.h"
#include "stylealigned/models/tokenizer.h"
#include "stylealigned/models/unet.h"
#include "stylealigned/models/vae.h"
#include "toy_model_adapter.h"

namespace stylealigned::train {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

std::atomic<bool> g_stop{false};

extern "C" void on_signal(int) { g_stop.store(true); }

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

c10::Device parse_device(const std::string& text) {
  try {
    c10::Device device(text);
    if (device.is_cuda() && !at::hasCUDA()) {
      throw Error(fmt::format("--device {}: this libtorch build has no CUDA (or no GPU is visible)", text));
    }
    return device;
  } catch (const c10::Error&) {
    throw Error(fmt::format("--device '{}' is not a device (use cpu, cuda or cuda:N)", text));
  }
}

void check_common(const CommonOptions& o) {
  if (o.run_dir.empty()) throw Error("--run-dir is required");
  if (o.batch_size <= 0) throw Error(fmt::format("--batch must be positive, got {}", o.batch_size));
  if (o.max_steps < 0) throw Error(fmt::format("--max-steps must be >= 0, got {}", o.max_steps));
  if (o.minutes < 0) throw Error(fmt::format("--minutes must be >= 0, got {}", o.minutes));
  if (o.max_steps == 0 && o.minutes == 0) throw Error("give --max-steps or --minutes (or both): a run must end");
  if (!(o.lr > 0)) throw Error(fmt::format("--lr must be positive, got {}", o.lr));
  if (o.val_size <= 0) throw Error(fmt::format("--val-size must be positive, got {}", o.val_size));
  if (o.image_size < 16) throw Error(fmt::format("--image-size must be at least 16, got {}", o.image_size));
  if (o.warmup_steps < 0) throw Error(fmt::format("--warmup must be >= 0, got {}", o.warmup_steps));
  if (o.lr_schedule != "constant" && o.lr_schedule != "cosine") {
    throw Error(fmt::format("--lr-schedule must be constant or cosine, got '{}'", o.lr_schedule));
  }
  if (o.lr_schedule == "cosine" && o.max_steps <= o.warmup_steps) {
    throw Error(fmt::format("--lr-schedule cosine needs --max-steps above --warmup (got {} and {}): the schedule "
                            "ends at --max-steps",
                            o.max_steps, o.warmup_steps));
  }
  if (o.lr_min < 0 || o.lr_min > o.lr) {
    throw Error(fmt::format("--lr-min must be in [0, --lr], got {} (lr {})", o.lr_min, o.lr));
  }
}

double lr_at(const CommonOptions& o, int64_t step) {
  if (o.warmup_steps > 0 && step < o.warmup_steps) {
    return o.lr * static_cast<double>(step) / static_cast<double>(o.warmup_steps);
  }
  if (o.lr_schedule != "cosine") return o.lr;
  const double progress = std::clamp(static_cast<double>(step - o.warmup_steps) /
                                         static_cast<double>(o.max_steps - o.warmup_steps),
                                     0.0, 1.0);
  return o.lr_min + (o.lr - o.lr_min) * 0.5 * (1.0 + std::cos(M_PI * progress));
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  if (!out) throw Error(fmt::format("cannot write {}", path.string()));
}

// CLIPTextConfig reads files only: give it the JSON text through a file in the run folder (or a temporary one).
models::CLIPTextConfig clip_config_from_json(const std::string& text, const fs::path& file) {
  write_text(file, text);
  return models::CLIPTextConfig::from_file(file);
}

// Loss log --------------------------------------------------------------------------------------------------------

class LossLog {
 public:
  LossLog(fs::path path, std::vector<std::string> columns, bool continuing, int64_t keep_through_step)
      : path_(std::move(path)), columns_(std::move(columns)) {
    std::string kept;
    if (continuing && fs::exists(path_)) {
      // Rows after the checkpoint's step came from an interrupted invocation and are repeated now: drop them.
      std::ifstream in(path_);
      std::string line;
      bool header = true;
      while (std::getline(in, line)) {
        if (header) {
          header = false;
          continue;
        }
        if (line.empty()) continue;
        if (std::stoll(line.substr(0, line.find(','))) <= keep_through_step) kept += line + "\n";
      }
    }
    std::ofstream out(path_, std::ios::trunc);
    out << fmt::format("{}\n", fmt::join(columns_, ",")) << kept;
    if (!out) throw Error(fmt::format("cannot write the loss log {}", path_.string()));
  }

  void row(const std::vector<std::string>& values) {
    std::ofstream out(path_, std::ios::app);
    out << fmt::format("{}\n", fmt::join(values, ","));
  }

 private:
  fs::path path_;
  std::vector<std::string> columns_;
};

std::string num(double v) { return fmt::format("{:.6g}", v); }

// The loop both stages share ----------------------------------------------------------------------------------------

struct StepOutcome {
  double loss = 0.0;
  double grad_norm = 0.0;
  std::vector<double> extras;  // stage-specific train columns
};

struct StageHooks {
  std::string name;
  std::vector<std::string> train_columns;  // names of StepOutcome::extras
  std::vector<std::string> val_columns;    // names of validate()'s values after the first (val_loss)
  std::function<StepOutcome(int64_t step, double lr)> step;
  std::function<std::vector<double>()> validate;
  std::function<void(int64_t step, double total_seconds)> save;
};

class SignalScope {
 public:
  SignalScope() {
    g_stop.store(false);
    old_int_ = std::signal(SIGINT, on_signal);
    old_term_ = std::signal(SIGTERM, on_signal);
  }
  ~SignalScope() {
    std::signal(SIGINT, old_int_);
    std::signal(SIGTERM, old_term_);
  }

 private:
  void (*old_int_)(int);
  void (*old_term_)(int);
};

// Renders the batch of a given data step, optionally one step ahead on a background thread. The batch of a step is
// a pure function of the step, so prefetching changes when it is rendered, never what it holds.
class BatchPrefetcher {
 public:
  explicit BatchPrefetcher(std::function<Batch(int64_t)> render) : render_(std::move(render)) {}
  ~BatchPrefetcher() {
    if (pending_.valid()) pending_.wait();
  }
  void start(int64_t data_step) {
    if (pending_.valid()) return;
    pending_step_ = data_step;
    pending_ = std::async(std::launch::async, render_, data_step);
  }
  Batch take(int64_t data_step) {
    if (pending_.valid()) {
      Batch b = pending_.get();
      if (pending_step_ == data_step) return b;
    }
    return render_(data_step);
  }

 private:
  std::function<Batch(int64_t)> render_;
  std::future<Batch> pending_;
  int64_t pending_step_ = -1;
};

// TF32 tensor cores for fp32 matrix products on CUDA (cuDNN convolutions already use them by default): the
// trainer's weights stay fp32, and the toy model's loss is far above TF32's 1e-3 relative error.
void use_fast_fp32(const c10::Device& device) {
  if (device.is_cuda()) at::globalContext().setFloat32MatmulPrecision("high");
}

// Runs steps start_step + 1, ... until max_steps, the time budget or a stop request. Writes the loss log, progress
// and the periodic checkpoints; the caller writes the final checkpoint (after anything it measures at the end).
StageResult run_loop(const CommonOptions& o, int64_t start_step, double prior_seconds, StageHooks& h) {
  SignalScope signals;
  const auto t0 = Clock::now();
  std::vector<std::string> columns = {"step", "loss", "val_loss", "lr", "seconds", "grad_norm"};
  for (const auto& c : h.train_columns) columns.push_back(c);
  for (const auto& c : h.val_columns) columns.push_back(c);
  LossLog log(o.run_dir / "loss.csv", columns, start_step > 0, start_step);
  ProgressReporter progress(h.name, o.progress, o.progress_every);

  StageResult r;
  r.first_step = start_step + 1;
  int64_t step = start_step;
  double step_avg = 0.0, last_step = 0.0, loss_avg = 0.0, val_seconds = 0.0;
  double steady_seconds = 0.0;
  int64_t steady_steps = 0;
  auto out_of_time = [&] {
    if (o.minutes <= 0) return false;
    const double next = 1.1 * std::max(step_avg, last_step);
    return seconds_since(t0) + next > o.minutes * 60.0;
  };
  auto done = [&] { return (o.max_steps > 0 && step >= o.max_steps) || out_of_time() || g_stop.load(); };

  ProgressState ps;
  ps.max_steps = o.max_steps;
  // The loop ends exactly when a step saw done(): asking done() again at the top could find the time budget spent
  // just after a step that did not know it was the last one, which then went unvalidated.
  bool finished = done();
  while (!finished) {
    ++step;
    const double lr = lr_at(o, step);
    const auto ts = Clock::now();
    StepOutcome out = h.step(step, lr);
    last_step = seconds_since(ts);
    if (!std::isfinite(out.loss)) {
      throw Error(fmt::format("{} stage: the loss became {} at step {} (the last checkpoint is in {})", h.name,
                              out.loss, step, o.run_dir.string()));
    }
    r.losses.push_back(out.loss);
    // The first step of an invocation pays for allocator and kernel warm-up: leave it out of the throughput.
    if (step > r.first_step) {
      steady_seconds += last_step;
      ++steady_steps;
    }
    step_avg = step_avg == 0.0 ? last_step : 0.9 * step_avg + 0.1 * last_step;
    loss_avg = r.losses.size() == 1 ? out.loss : 0.95 * loss_avg + 0.05 * out.loss;

    const bool last = done();
    std::vector<double> val;
    if ((o.val_every > 0 && step % o.val_every == 0) || last) {
      const auto tv = Clock::now();
      val = h.validate();
      val_seconds += seconds_since(tv);
      r.val_loss = val[0];
      ps.val_loss = val[0];
    }
    const double total_seconds = prior_seconds + seconds_since(t0);
    std::vector<std::string> row = {std::to_string(step), num(out.loss), val.empty() ? "" : num(val[0]), num(lr),
                                    fmt::format("{:.2f}", total_seconds), num(out.grad_norm)};
    for (double e : out.extras) row.push_back(num(e));
    for (size_t i = 1; i <= h.val_columns.size(); ++i) row.push_back(i < val.size() ? num(val[i]) : "");
    log.row(row);

    ps.step = step;
    ps.loss = loss_avg;
    ps.lr = lr;
    ps.step_seconds = step_avg;
    ps.images_per_second = step_avg > 0 ? static_cast<double>(o.batch_size) / step_avg : 0.0;
    ps.eta_seconds = -1;
    if (o.max_steps > 0) ps.eta_seconds = static_cast<double>(o.max_steps - step) * step_avg;
    if (o.minutes > 0) {
      const double left = std::max(0.0, o.minutes * 60.0 - seconds_since(t0));
      ps.eta_seconds = ps.eta_seconds < 0 ? left : std::min(ps.eta_seconds, left);
    }
    progress.update(ps, last || !val.empty());
    if (!last && o.checkpoint_every > 0 && step % o.checkpoint_every == 0) h.save(step, total_seconds);
    finished = last;
  }
  progress.finish();
  r.last_step = step;
  r.seconds = seconds_since(t0);
  r.stopped_by_time = (o.max_steps == 0 || step < o.max_steps);
  if (g_stop.load()) progress.message(fmt::format("[{}] stop requested: finishing at step {}", h.name, step));
  r.images_per_second = steady_steps > 0   ? static_cast<double>(o.batch_size * steady_steps) / steady_seconds
                        : last_step > 0.0 ? static_cast<double>(o.batch_size) / last_step
                                          : 0.0;
  return r;
}

// Opens the run folder: the checkpoint to continue from, if any.
std::optional<CheckpointData> open_run(const CommonOptions& o, const std::string& stage) {
  fs::create_directories(o.run_dir);
  const fs::path ckpt = o.run_dir / "checkpoint.safetensors";
  if (!fs::exists(ckpt)) {
    if (o.resume) fmt::print(stderr, "[{}] --resume: no checkpoint in {} yet, starting a new run\n", stage,
                             o.run_dir.string());
    return std::nullopt;
  }
  if (!o.resume) {
    throw Error(fmt::format("{} already holds a checkpoint: pass --resume to continue that run, or choose another "
                            "--run-dir",
                            o.run_dir.string()));
  }
  CheckpointData data = read_checkpoint(ckpt);
  if (data.meta.value("stage", "") != stage) {
    throw Error(fmt::format("{}: a '{}' checkpoint, not a '{}' one", ckpt.string(), data.meta.value("stage", "?"),
                            stage));
  }
  if (data.meta.value("seed", uint64_t{0}) != o.seed) {
    warn(fmt::format("{}: the run was started with --seed {}; continuing with its seed", ckpt.string(),
                     data.meta.value("seed", uint64_t{0})));
  }
  return data;
}

json common_meta(const CommonOptions& o, const std::string& stage, int64_t step, double seconds) {
  return json{{"stage", stage},       {"step", step},         {"seconds", seconds},
              {"seed", o.seed},       {"batch_size", o.batch_size}, {"lr", o.lr},
              {"warmup_steps", o.warmup_steps}, {"weight_decay", o.weight_decay}, {"grad_clip", o.grad_clip},
              {"image_size", o.image_size}, {"lr_schedule", o.lr_schedule}, {"lr_min", o.lr_min}};
}

void write_summary(const CommonOptions& o, const std::string& stage, const StageResult& r, json extra) {
  json s = {{"stage", stage},
            {"first_step", r.first_step},
            {"last_step", r.last_step},
            {"steps_run", static_cast<int64_t>(r.losses.size())},
            {"final_loss", r.losses.empty() ? json(nullptr) : json(r.losses.back())},
            {"val_loss", r.val_loss >= 0 ? json(r.val_loss) : json(nullptr)},
            {"images_per_second", r.images_per_second},
            {"seconds", r.seconds},
            {"data_seconds", r.data_seconds},
            {"stopped_by_time", r.stopped_by_time},
            {"batch_size", o.batch_size},
            {"threads", at::get_num_threads()},
            {"device", o.device}};
  s.update(extra);
  write_text(o.run_dir / "summary.json", s.dump(2) + "\n");
}

at::Tensor recon_loss(const std::string& kind, const at::Tensor& a, const at::Tensor& b) {
  return kind == "mse" ? (a - b).pow(2).mean() : (a - b).abs().mean();
}

// The frozen VAE of the unet stage and of export.
struct LoadedVae {
  models::AutoencoderKL vae{nullptr};
  CheckpointData checkpoint;
};

LoadedVae load_vae(const fs::path& where) {
  LoadedVae out;
  out.checkpoint = read_checkpoint(checkpoint_path(where));
  const auto& meta = out.checkpoint.meta;
  if (meta.value("stage", "") != "vae") {
    throw Error(fmt::format("{}: not a vae checkpoint (stage '{}')", out.checkpoint.path.string(),
                            meta.value("stage", "?")));
  }
  const auto config = models::VAEConfig::from_json(meta.at("config").get<std::string>(),
                                                   out.checkpoint.path.string() + " (config)");
  out.vae = models::AutoencoderKL::from_config(config);
  load_module(*out.vae, out.checkpoint, "vae.");
  return out;
}

}  // namespace

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(fmt::format("cannot read {}", path.string()));
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

fs::path checkpoint_path(const fs::path& path) {
  return fs::is_directory(path) ? path / "checkpoint.safetensors" : path;
}

void request_stop() { g_stop.store(true); }

// Stage vae ---------------------------------------------------------------------------------------------------------

StageResult train_vae(const VaeStageOptions& options) {
  const CommonOptions& o = options.common;
  check_common(o);
  if (options.recon != "l1" && options.recon != "mse") {
    throw Error(fmt::format("--recon must be l1 or mse, got '{}'", options.recon));
  }
  if (options.kl_weight < 0) throw Error(fmt::format("--kl-weight must be >= 0, got {}", options.kl_weight));
  const c10::Device device = parse_device(o.device);
  use_fast_fp32(device);
  auto resumed = open_run(o, "vae");

  std::string config_json = options.vae_config_json.empty() ? toy::vae_config_json(1.0) : options.vae_config_json;
  if (resumed) config_json = resumed->meta.at("config").get<std::string>();
  const auto config = models::VAEConfig::from_json(config_json, "vae config");
  if (o.image_size % config.scale_factor() != 0) {
    throw Error(fmt::format("--image-size {} is not a multiple of the VAE factor {}", o.image_size,
                            config.scale_factor()));
  }
  at::manual_seed(mix_seed(o.seed, Stream::train, -1));  // initial weights
  auto vae = models::AutoencoderKL::from_config(config);
  int64_t start_step = 0;
  double prior_seconds = 0.0;
  json previous_stats = json::object();
  if (resumed) {
    load_module(*vae, *resumed, "vae.");
    start_step = resumed->meta.at("step").get<int64_t>();
    prior_seconds = resumed->meta.value("seconds", 0.0);
    for (const char* k : {"scaling_factor", "latent_mean", "latent_std", "stats_step", "stats_images"}) {
      if (resumed->meta.contains(k)) previous_stats[k] = resumed->meta[k];
    }
  }
  vae->to(device);
  AdamW opt(named_parameters(*vae, "vae."), {0.9, 0.999, 1e-8, o.weight_decay});
  if (resumed) opt.load_state(resumed->tensors);
  resumed.reset();  // free the CPU copies

  const at::Tensor val_images =
      render_batch(o.seed, Stream::validation, 0, 0, o.val_size, o.image_size, false).images.to(device);

  json meta_extra = previous_stats;
  auto save = [&](int64_t step, double seconds) {
    NamedTensors tensors = named_state(*vae, "vae.");
    for (auto& t : opt.state()) tensors.push_back(std::move(t));
    json meta = common_meta(o, "vae", step, seconds);
    meta["config"] = config_json;
    meta["recon"] = options.recon;
    meta["kl_weight"] = options.kl_weight;
    meta.update(meta_extra);
    write_checkpoint(o.run_dir / "checkpoint.safetensors", tensors, meta);
  };

  double data_seconds = 0.0;
  StageHooks hooks;
  hooks.name = "vae";
  hooks.train_columns = {"recon", "kl"};
  hooks.step = [&](int64_t step, double lr) {
    const int64_t data_step = o.fixed_batch ? 1 : step;
    const auto td = Clock::now();
    const at::Tensor x = render_batch(o.seed, Stream::train, data_step, 0, o.batch_size, o.image_size, false)
                             .images.to(device);
    data_seconds += seconds_since(td);
    auto gen = generator_for(o.seed, Stream::noise, data_step);
    const auto posterior = vae->encode(x);
    const at::Tensor eps = at::randn(posterior.mean.sizes(), gen, at::kFloat).to(device);
    const at::Tensor z = posterior.mean + posterior.std * eps;
    const at::Tensor rec = vae->decode(z);
    const at::Tensor recon = recon_loss(options.recon, rec, x);
    const at::Tensor kl =
        0.5 * (posterior.mean.pow(2) + posterior.logvar.exp() - 1.0 - posterior.logvar).sum() / x.size(0);
    const at::Tensor loss = recon + options.kl_weight * kl;
    opt.zero_grad();
    loss.backward();
    StepOutcome out;
    out.grad_norm = clip_grad_norm(opt.params(), o.grad_clip);
    opt.step(lr);
    out.loss = loss.item<double>();
    out.extras = {recon.item<double>(), kl.item<double>()};
    return out;
  };
  hooks.validate = [&] {
    at::NoGradGuard no_grad;
    double total = 0.0;
    for (int64_t s = 0; s < o.val_size; s += o.batch_size) {
      const at::Tensor x = val_images.narrow(0, s, std::min(o.batch_size, o.val_size - s));
      total += recon_loss(options.recon, vae->decode(vae->encode(x).mean), x).item<double>() * x.size(0);
    }
    return std::vector<double>{total / static_cast<double>(o.val_size)};
  };
  hooks.save = save;

  StageResult r = run_loop(o, start_step, prior_seconds, hooks);
  r.data_seconds = data_seconds;

  // Latent statistics of the final weights: the scaling_factor that gives the UNet unit-variance latents.
  if (options.stat_images > 0 && (r.last_step > start_step || !previous_stats.contains("scaling_factor"))) {
    at::NoGradGuard no_grad;
    double sum = 0.0, sumsq = 0.0, count = 0.0;
    const int64_t chunk = 64;
    for (int64_t s = 0; s < options.stat_images; s += chunk) {
      const int64_t n = std::min(chunk, options.stat_images - s);
      const at::Tensor x = render_batch(o.seed, Stream::statistics, 0, s, n, o.image_size, false).images.to(device);
      const at::Tensor z = vae->encode(x).mean.to(at::kDouble);
      sum += z.sum().item<double>();
      sumsq += z.pow(2).sum().item<double>();
      count += static_cast<double>(z.numel());
    }
    const double mean = sum / count;
    const double std = std::sqrt(std::max(0.0, sumsq / count - mean * mean));
    r.latent_mean = mean;
    r.latent_std = std;
    r.scaling_factor = std > 0 ? 1.0 / std : 1.0;
    meta_extra = {{"scaling_factor", r.scaling_factor},
                  {"latent_mean", mean},
                  {"latent_std", std},
                  {"stats_step", r.last_step},
                  {"stats_images", options.stat_images}};
    fmt::print(stderr, "[vae] latents over {} images: mean {:.4f}, std {:.4f} -> scaling_factor {:.5f}\n",
               options.stat_images, mean, std, r.scaling_factor);
  } else if (previous_stats.contains("scaling_factor")) {
    r.scaling_factor = previous_stats["scaling_factor"].get<double>();
  }
  if (r.last_step > start_step || !meta_extra.empty()) save(r.last_step, prior_seconds + r.seconds);
  write_summary(o, "vae", r,
                {{"recon", options.recon},
                 {"kl_weight", options.kl_weight},
                 {"scaling_factor", r.scaling_factor},
                 {"latent_mean", r.latent_mean},
                 {"latent_std", r.latent_std}});
  fmt::print(stderr, "[vae] step {}: loss {:.5f}, val {:.5f}, {:.2f} images/s; checkpoint {}\n", r.last_step,
             r.losses.empty() ? 0.0 : r.losses.back(), r.val_loss, r.images_per_second,
             (o.run_dir / "checkpoint.safetensors").string());
  return r;
}

// Stage unet --------------------------------------------------------------------------------------------------------

namespace {

// A grown model's new layers start as identities: the last projection of every residual branch they add (attention
// and feed-forward outputs, a new Transformer2DModel's proj_out, CLIP's out_proj and fc2) is zero, so the grown
// network computes what the folder's did and training only has to find a use for them.
bool is_residual_output(const std::string& name) {
  for (const char* key : {".to_out.0.", ".ff.net.2.", "proj_out.", ".out_proj.", ".fc2."}) {
    if (name.find(key) != std::string::npos) return true;
  }
  return false;
}

size_t grow_from(torch::nn::Module& module, const CheckpointData& init, const std::string& prefix) {
  const NamedTensors added = load_module_grown(module, init, prefix);
  at::NoGradGuard no_grad;
  for (const auto& [name, t] : added) {
    if (is_residual_output(name)) t.detach().zero_();
  }
  return added.size();
}

struct GrowthCheck {
  double text_encoder = 0.0;
  double unet = 0.0;
};

// How far the grown model's outputs are from the folder's on one fixed random input: 0 up to rounding when the new
// config only adds layers; a config that changes what existing layers compute (more heads, new resnets in a block
// that concatenates skips) shows here instead of silently throwing the start away.
GrowthCheck check_growth(models::CLIPTextModelImpl& old_te, models::CLIPTextModelImpl& te,
                         models::UNet2DConditionModelImpl& old_unet, models::UNet2DConditionModelImpl& unet, const models::CLIPTextConfig& te_config,
                         const models::UNetConfig& unet_config) {
  at::NoGradGuard no_grad;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1234);
  const at::Tensor ids = at::randint(te_config.vocab_size, {1, 8}, gen, at::kLong);
  GrowthCheck check;
  const at::Tensor hidden = te.forward(ids).last_hidden_state;
  check.text_encoder = (hidden - old_te.forward(ids).last_hidden_state).abs().max().item<double>();
  const int64_t side = unet_config.sample_size > 0 ? unet_config.sample_size : 16;
  const at::Tensor x = at::randn({1, unet_config.in_channels, side, side}, gen, at::kFloat);
  const at::Tensor t = at::full({1}, 500, at::kLong);
  const at::Tensor context = at::randn({1, 8, unet_config.cross_attention_dim.at(0)}, gen, at::kFloat);
  check.unet = (unet.forward(x, t, context) - old_unet.forward(x, t, context)).abs().max().item<double>();
  return check;
}

}  // namespace

StageResult train_unet(const UnetStageOptions& options) {
  const CommonOptions& o = options.common;
  check_common(o);
  if (options.latents != "mean" && options.latents != "sample") {
    throw Error(fmt::format("--latents must be mean or sample, got '{}'", options.latents));
  }
  if (options.caption_dropout < 0 || options.caption_dropout > 1) {
    throw Error(fmt::format("--caption-dropout must be in [0, 1], got {}", options.caption_dropout));
  }
  if (options.ema_decay < 0 || options.ema_decay >= 1) {
    throw Error(fmt::format("--ema-decay must be in [0, 1), got {}", options.ema_decay));
  }
  if (options.vae_checkpoint.empty()) throw Error("--vae (the vae run folder or checkpoint) is required");
  if (options.data_reuse < 1) throw Error(fmt::format("--data-reuse must be >= 1, got {}", options.data_reuse));
  const c10::Device device = parse_device(o.device);
  use_fast_fp32(device);
  auto resumed = open_run(o, "unet");
  const std::string init_from =
      resumed ? resumed->meta.value("init_from", std::string()) : options.init_from.string();
  // How a grown start was made (new tensors, probe deviation), kept in every checkpoint of the run.
  json growth = resumed ? resumed->meta.value("growth", json()) : json();

  // The frozen VAE and the latent scale.
  LoadedVae frozen = load_vae(options.vae_checkpoint);
  const json& vae_meta = frozen.checkpoint.meta;
  double scaling = options.scaling_factor;
  if (resumed) scaling = resumed->meta.at("scaling_factor").get<double>();
  if (scaling <= 0) {
    if (!vae_meta.contains("scaling_factor")) {
      throw Error(fmt::format("{} has no measured scaling_factor: finish the vae stage with --stat-images > 0 or "
                              "pass --scaling-factor",
                              frozen.checkpoint.path.string()));
    }
    scaling = vae_meta["scaling_factor"].get<double>();
    if (vae_meta.value("stats_step", int64_t{-1}) != vae_meta.value("step", int64_t{0})) {
      warn(fmt::format("{}: scaling_factor was measured at step {}, the weights are from step {}",
                       frozen.checkpoint.path.string(), vae_meta.value("stats_step", int64_t{-1}),
                       vae_meta.value("step", int64_t{0})));
    }
  }
  const int64_t vae_step = vae_meta.value("step", int64_t{0});
  if (resumed && resumed->meta.value("vae_step", vae_step) != vae_step) {
    warn(fmt::format("the vae checkpoint is now at step {}, this run started with step {}", vae_step,
                     resumed->meta.value("vae_step", int64_t{0})));
  }
  models::AutoencoderKL vae = frozen.vae;
  frozen.checkpoint.tensors.clear();
  vae->to(device);
  vae->eval();
  for (auto& p : vae->parameters()) p.set_requires_grad(false);
  if (o.image_size % vae->config().scale_factor() != 0) {
    throw Error(fmt::format("--image-size {} is not a multiple of the VAE factor {}", o.image_size,
                            vae->config().scale_factor()));
  }

  // Tokenizer, text encoder and UNet.
  toy::write_tokenizer_folder(o.run_dir / "tokenizer");
  const auto tokenizer = models::ClipTokenizer::from_folder(o.run_dir / "tokenizer");
  std::string te_json =
      options.text_encoder_config_json.empty() ? toy::text_encoder_config_json() : options.text_encoder_config_json;
  std::string unet_json = options.unet_config_json.empty() ? toy::unet_config_json() : options.unet_config_json;
  if (resumed) {
    te_json = resumed->meta.at("text_encoder_config").get<std::string>();
    unet_json = resumed->meta.at("unet_config").get<std::string>();
  } else if (!options.init_from.empty()) {
    // The folder's configs, unless a given one grows it (see the loading below).
    if (options.text_encoder_config_json.empty()) te_json = read_text(options.init_from / "text_encoder" / "config.json");
    if (options.unet_config_json.empty()) unet_json = read_text(options.init_from / "unet" / "config.json");
  }
  const auto te_config = clip_config_from_json(te_json, o.run_dir / "text_encoder_config.json");
  const auto unet_config = models::UNetConfig::from_json(unet_json, "unet config");
  if (te_config.vocab_size < tokenizer.vocab_size()) {
    throw Error(fmt::format("text encoder vocab_size {} is smaller than the tokenizer's {}", te_config.vocab_size,
                            tokenizer.vocab_size()));
  }
  if (unet_config.in_channels != vae->config().latent_channels) {
    throw Error(fmt::format("unet in_channels {} != the VAE's latent_channels {}", unet_config.in_channels,
                            vae->config().latent_channels));
  }
  at::manual_seed(mix_seed(o.seed, Stream::train, -1));
  models::CLIPTextModel te(std::make_shared<models::CLIPTextModelImpl>(te_config));
  auto unet = models::UNet2DConditionModel::from_config(unet_config);
  int64_t start_step = 0;
  double prior_seconds = 0.0;
  if (resumed) {
    load_module(*te, *resumed, "text_encoder.");
    load_module(*unet, *resumed, "unet.");
    start_step = resumed->meta.at("step").get<int64_t>();
    prior_seconds = resumed->meta.value("seconds", 0.0);
  } else if (!options.init_from.empty()) {
    // The folder's fp16/bf16 files load as fp32 copies (never mapped: training writes them).
    models::LoadOptions load;
    load.map_weights = false;
    CheckpointData init;
    init.path = options.init_from;
    const auto add = [&](const torch::nn::Module& m, const std::string& prefix) {
      for (auto& [name, t] : named_state(m, prefix)) init.tensors[name] = t;  // the loads below copy them
    };
    auto folder_te = models::CLIPTextModel::from_pretrained(options.init_from / "text_encoder", load);
    auto folder_unet = models::UNet2DConditionModel::from_pretrained(options.init_from / "unet", load);
    add(*folder_te, "text_encoder.");
    add(*folder_unet, "unet.");
    if (options.unet_config_json.empty() && options.text_encoder_config_json.empty()) {
      load_module(*te, init, "text_encoder.");
      load_module(*unet, init, "unet.");
      fmt::print(stderr, "[unet] starting from the weights of {}\n", options.init_from.string());
    } else {
      const size_t added_te = grow_from(*te, init, "text_encoder.");
      const size_t added_unet = grow_from(*unet, init, "unet.");
      const GrowthCheck check = check_growth(*folder_te, *te, *folder_unet, *unet, te_config, unet_config);
      fmt::print(stderr,
                 "[unet] grown from the weights of {}: {} new text-encoder and {} new UNet tensors (residual "
                 "outputs zeroed); on a probe input the grown model differs from the folder's by max {:.3g} "
                 "(text encoder) and {:.3g} (UNet)\n",
                 options.init_from.string(), added_te, added_unet, check.text_encoder, check.unet);
      growth = {{"text_encoder_new_tensors", added_te},
                {"unet_new_tensors", added_unet},
                {"probe_max_abs_text_encoder", check.text_encoder},
                {"probe_max_abs_unet", check.unet}};
    }
  }
  te->to(device);
  unet->to(device);
  NamedTensors params = named_parameters(*te, "text_encoder.");
  const NamedTensors unet_params = named_parameters(*unet, "unet.");
  params.insert(params.end(), unet_params.begin(), unet_params.end());
  AdamW opt(params, {0.9, 0.999, 1e-8, o.weight_decay});
  std::optional<Ema> ema;
  if (options.ema_decay > 0) ema.emplace(unet_params, options.ema_decay);
  if (resumed) {
    opt.load_state(resumed->tensors);
    if (ema) ema->load_state(resumed->tensors);
    resumed.reset();
  }

  const NoiseSchedule schedule(SchedulerConfig::from_json(toy::scheduler_config_json(), "toy scheduler"));
  const at::Tensor alphas_cumprod = schedule.alphas_cumprod().to(device);
  const int64_t num_timesteps = schedule.config().num_train_timesteps;

  auto encode_latents = [&](const at::Tensor& images, at::Generator* gen) {
    at::NoGradGuard no_grad;
    const auto posterior = vae->encode(images);
    at::Tensor z = posterior.mean;
    if (options.latents == "sample" && gen != nullptr) {
      z = z + posterior.std * at::randn(z.sizes(), *gen, at::kFloat).to(device);
    }
    return z * scaling;
  };
  auto predict_loss = [&](const at::Tensor& latents, const at::Tensor& t, const at::Tensor& noise,
                          const at::Tensor& ids) {
    const at::Tensor a = alphas_cumprod.index_select(0, t).view({-1, 1, 1, 1});
    const at::Tensor noisy = a.sqrt() * latents + (1.0 - a).sqrt() * noise;
    const at::Tensor context = te->forward(ids).last_hidden_state;
    return (unet->forward(noisy, t, context) - noise).pow(2).mean();
  };

  // Fixed held-out set: its own images and captions (no dropout), timesteps spread evenly, fixed noise.
  Batch val_batch = render_batch(o.seed, Stream::validation, 0, 0, o.val_size, o.image_size, true);
  at::Tensor val_latents;
  {
    std::vector<at::Tensor> parts;
    for (int64_t s = 0; s < o.val_size; s += 64) {
      parts.push_back(
          encode_latents(val_batch.images.narrow(0, s, std::min<int64_t>(64, o.val_size - s)).to(device), nullptr));
    }
    val_latents = at::cat(parts, 0);
  }
  auto val_gen = generator_for(o.seed, Stream::validation, 0, 1);
  const at::Tensor val_noise = at::randn(val_latents.sizes(), val_gen, at::kFloat).to(device);
  const at::Tensor val_t = at::arange(o.val_size, at::kLong).mul(num_timesteps).div(o.val_size, "floor")
                               .add(num_timesteps / (2 * o.val_size)).clamp_max(num_timesteps - 1).to(device);
  const at::Tensor val_ids = tokenizer.encode_batch(val_batch.captions).to(device);
  val_batch.images = at::Tensor();

  auto save = [&](int64_t step, double seconds) {
    NamedTensors tensors = named_state(*te, "text_encoder.");
    for (auto& t : named_state(*unet, "unet.")) tensors.push_back(std::move(t));
    for (auto& t : opt.state()) tensors.push_back(std::move(t));
    if (ema) {
      for (auto& t : ema->state()) tensors.push_back(std::move(t));
    }
    json meta = common_meta(o, "unet", step, seconds);
    meta["text_encoder_config"] = te_json;
    meta["unet_config"] = unet_json;
    meta["vae_config"] = vae_meta.at("config");
    meta["vae_checkpoint"] = fs::absolute(checkpoint_path(options.vae_checkpoint)).string();
    meta["vae_step"] = vae_step;
    meta["scaling_factor"] = scaling;
    meta["latents"] = options.latents;
    meta["caption_dropout"] = options.caption_dropout;
    meta["ema_decay"] = options.ema_decay;
    meta["data_reuse"] = options.data_reuse;
    meta["init_from"] = init_from;
    if (!growth.is_null()) meta["growth"] = growth;
    write_checkpoint(o.run_dir / "checkpoint.safetensors", tensors, meta);
  };

  double data_seconds = 0.0;
  // On a GPU the next batch renders on the CPU while this one trains; on the CPU that would only fight the
  // training for the same cores, so there each batch renders when it is needed.
  BatchPrefetcher prefetch([&](int64_t data_step) {
    return render_batch(o.seed, Stream::train, data_step, 0, o.batch_size, o.image_size, true);
  });
  StageHooks hooks;
  hooks.name = "unet";
  if (ema) hooks.val_columns = {"val_loss_ema"};
  // With data_reuse = K, steps (d-1)K+1 .. dK train on the images of data step d, each with its own noise,
  // timesteps and caption dropout: the latents are encoded once per data step and kept.
  const int64_t reuse = options.data_reuse;
  int64_t cached_step = -1;
  at::Tensor cached_latents;
  std::vector<std::string> cached_captions;
  hooks.step = [&](int64_t step, double lr) {
    const int64_t data_step = o.fixed_batch ? 1 : (step - 1) / reuse + 1;
    auto gen = generator_for(o.seed, Stream::noise, data_step);
    if (data_step != cached_step) {
      const auto td = Clock::now();
      Batch fresh = prefetch.take(data_step);
      if (device.is_cuda() && !o.fixed_batch) prefetch.start(data_step + 1);
      cached_latents = encode_latents(fresh.images.to(device), &gen);
      cached_captions = std::move(fresh.captions);
      cached_step = data_step;
      data_seconds += seconds_since(td);
    }
    if (reuse > 1) gen = generator_for(o.seed, Stream::noise, step, 1);
    const at::Tensor& latents = cached_latents;
    std::vector<std::string> captions = cached_captions;  // dropout below clears some
    const at::Tensor t = at::randint(0, num_timesteps, {o.batch_size}, gen, at::kLong).to(device);
    const at::Tensor noise = at::randn(latents.sizes(), gen, at::kFloat).to(device);
    const at::Tensor drop = at::rand({o.batch_size}, gen, at::kDouble);
    for (int64_t i = 0; i < o.batch_size; ++i) {
      if (drop[i].item<double>() < options.caption_dropout) captions[static_cast<size_t>(i)].clear();
    }
    const at::Tensor ids = tokenizer.encode_batch(captions).to(device);
    const at::Tensor loss = predict_loss(latents, t, noise, ids);
    opt.zero_grad();
    loss.backward();
    StepOutcome out;
    out.grad_norm = clip_grad_norm(opt.params(), o.grad_clip);
    opt.step(lr);
    if (ema) ema->update(unet_params);
    out.loss = loss.item<double>();
    return out;
  };
  auto val_loss = [&] {
    at::NoGradGuard no_grad;
    double total = 0.0;
    for (int64_t s = 0; s < o.val_size; s += o.batch_size) {
      const int64_t n = std::min(o.batch_size, o.val_size - s);
      total += predict_loss(val_latents.narrow(0, s, n), val_t.narrow(0, s, n), val_noise.narrow(0, s, n),
                            val_ids.narrow(0, s, n))
                   .item<double>() *
               static_cast<double>(n);
    }
    return total / static_cast<double>(o.val_size);
  };
  hooks.validate = [&] {
    std::vector<double> v = {val_loss()};
    if (ema) {
      ema->swap_into(unet_params);
      v.push_back(val_loss());
      ema->swap_into(unet_params);
    }
    return v;
  };
  hooks.save = save;

  StageResult r = run_loop(o, start_step, prior_seconds, hooks);
  r.data_seconds = data_seconds;
  if (r.last_step > start_step) save(r.last_step, prior_seconds + r.seconds);
  write_summary(o, "unet", r,
                {{"scaling_factor", scaling},
                 {"caption_dropout", options.caption_dropout},
                 {"ema_decay", options.ema_decay},
                 {"data_reuse", options.data_reuse},
                 {"latents", options.latents}});
  fmt::print(stderr, "[unet] step {}: loss {:.5f}, val {:.5f}, {:.2f} images/s; checkpoint {}\n", r.last_step,
             r.losses.empty() ? 0.0 : r.losses.back(), r.val_loss, r.images_per_second,
             (o.run_dir / "checkpoint.safetensors").string());
  return r;
}

// Export ------------------------------------------------------------------------------------------------------------

void export_model(const ExportOptions& options) {
  if (options.out.empty()) throw Error("export: --out is required");
  at::ScalarType dtype = at::kHalf;
  if (options.dtype == "bf16") {
    dtype = at::kBFloat16;
  } else if (options.dtype == "fp32") {
    dtype = at::kFloat;
  } else if (options.dtype != "fp16") {
    throw Error(fmt::format("--dtype must be fp16, bf16 or fp32, got '{}'", options.dtype));
  }
  LoadedVae vae = load_vae(options.vae_checkpoint);
  const CheckpointData unet_ckpt = read_checkpoint(checkpoint_path(options.unet_checkpoint));
  const json& meta = unet_ckpt.meta;
  if (meta.value("stage", "") != "unet") {
    throw Error(fmt::format("{}: not a unet checkpoint (stage '{}')", unet_ckpt.path.string(), meta.value("stage", "?")));
  }
  const int64_t vae_step = vae.checkpoint.meta.value("step", int64_t{0});
  if (meta.value("vae_step", vae_step) != vae_step) {
    warn(fmt::format("export: the unet was trained on the VAE of step {}, {} is at step {}",
                     meta.value("vae_step", int64_t{0}), vae.checkpoint.path.string(), vae_step));
  }
  const double scaling = meta.at("scaling_factor").get<double>();
  const fs::path te_config_file =
      fs::temp_directory_path() / fmt::format("stylealigned_train_te_{}.json", static_cast<long>(::getpid()));
  const auto te_config = clip_config_from_json(meta.at("text_encoder_config").get<std::string>(), te_config_file);
  fs::remove(te_config_file);
  models::CLIPTextModel te(std::make_shared<models::CLIPTextModelImpl>(te_config));
  load_module(*te, unet_ckpt, "text_encoder.");
  auto unet = models::UNet2DConditionModel::from_config(
      models::UNetConfig::from_json(meta.at("unet_config").get<std::string>(), unet_ckpt.path.string()));
  const bool ema = options.use_ema && unet_ckpt.tensors.count("ema.updates") > 0;
  load_module(*unet, unet_ckpt, ema ? "ema.unet." : "unet.");
  export_toy_folder(options.out, te, unet, vae.vae, meta.at("text_encoder_config").get<std::string>(),
                    meta.at("unet_config").get<std::string>(), vae.checkpoint.meta.at("config").get<std::string>(),
                    dtype, scaling, options.overwrite);
  fmt::print(stderr, "exported {} (unet step {}{}, vae step {}, scaling_factor {:.5f}, {})\n", options.out.string(),
             meta.value("step", int64_t{0}), ema ? " EMA" : "", vae_step, scaling, options.dtype);
}

}  // namespace stylealigned::train
