// The toy model's trainer: stages `vae` and `unet`, and `export` to a diffusers folder.
//
// A run lives in one folder (`run_dir`): checkpoint.safetensors (weights, optimizer state, EMA, step and the run's
// settings in the metadata; rewritten atomically), loss.csv (step, loss, val_loss, lr, seconds, ...), summary.json
// (written at the end of every invocation) and, for the unet stage, the tokenizer folder it trains with.
//
//   train::VaeStageOptions vae;
//   vae.common.run_dir = "runs/vae";
//   vae.common.max_steps = 2000;
//   train::StageResult r = train::train_vae(vae);     // r.scaling_factor = 1 / std of the latents
//   train::UnetStageOptions unet;
//   unet.common.run_dir = "runs/unet";
//   unet.vae_checkpoint = "runs/vae";
//   train::train_unet(unet);
//   train::export_model({"runs/vae", "runs/unet", "models/toy"});
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace stylealigned::train {

/// Settings every stage shares.
struct CommonOptions {
  std::filesystem::path run_dir;
  uint64_t seed = 0;
  int64_t batch_size = 16;
  int64_t max_steps = 0;     ///< total steps of the run (a resumed run counts from its checkpoint); 0: no limit
  double minutes = 0.0;      ///< wall-clock budget of this invocation; stops cleanly with a checkpoint; 0: none
  double lr = 2e-4;
  int64_t warmup_steps = 200;  ///< linear warm-up from 0 to lr
  /// After the warm-up: "constant" (lr) or "cosine" (lr down to lr_min at max_steps, which must then be set). A
  /// cool-down lets an under-trained model settle into a lower loss than a constant rate reaches.
  std::string lr_schedule = "constant";
  double lr_min = 0.0;  ///< end of the cosine schedule
  double weight_decay = 1e-2;
  double grad_clip = 1.0;      ///< max global gradient norm; <= 0: no clipping
  int64_t checkpoint_every = 250;
  int64_t val_every = 100;     ///< validation loss every N steps (and at the end); 0: only at the end
  int64_t val_size = 64;       ///< images in the fixed held-out validation set
  std::string device = "cpu";  ///< "cpu", "cuda", "cuda:1", ...
  bool resume = false;         ///< continue from run_dir/checkpoint.safetensors (required if it exists)
  int64_t image_size = 64;     ///< rendered image side (tests use smaller images)
  std::string progress = "auto";  ///< "auto", "bar", "lines", "none"
  int64_t progress_every = 20;    ///< steps between progress lines when not drawing a bar
  /// Train on the batch of step 1 at every step (overfit check); the loss must then fall.
  bool fixed_batch = false;
};

struct VaeStageOptions {
  CommonOptions common;
  std::string recon = "l1";     ///< reconstruction loss: "l1" or "mse" (mean over pixels)
  double kl_weight = 1e-6;      ///< times the KL to N(0, 1), summed over latent elements and averaged over images
  int64_t stat_images = 2048;   ///< images whose posterior means give the latent std at the end; 0: skip
  std::string vae_config_json;  ///< empty: toy::vae_config_json(1.0)
};

struct UnetStageOptions {
  CommonOptions common;
  /// The frozen VAE: a vae run folder or its checkpoint file.
  std::filesystem::path vae_checkpoint;
  /// Latent scale; 0: the scaling_factor measured at the end of the vae stage (from its checkpoint).
  double scaling_factor = 0.0;
  std::string latents = "mean";     ///< "mean" or "sample" of the VAE posterior
  double caption_dropout = 0.1;     ///< share of captions replaced by "" (for classifier-free guidance)
  double ema_decay = 0.999;         ///< 0: no EMA
  /// Steps that train on each rendered batch (with fresh noise, timesteps and dropout each time). A GPU trains
  /// faster than the CPU renders; 1 (every step new images) keeps a CPU run's data as before.
  int64_t data_reuse = 1;
  std::string unet_config_json;     ///< empty: toy::unet_config_json()
  /// A fresh run starts from this diffusers folder's text_encoder/ and unet/ (weights and configs; the EMA starts
  /// from the same weights) instead of random weights: how training continues from a shipped model whose trainer
  /// checkpoint is gone (its AdamW moments start at zero). Empty: random initialisation. Ignored by a resume.
  /// With unet_config_json / text_encoder_config_json set as well, those configs must *grow* the folder's (e.g.
  /// transformer_layers_per_block 1 -> 2): every folder tensor loads into the same-named one, the new layers keep
  /// their random init except the last projection of each residual branch, which is zeroed, so training starts
  /// from the folder's function with extra capacity (net2net-style). A config in which some folder tensor has no
  /// same-shaped home is refused, naming it.
  std::filesystem::path init_from;
  std::string text_encoder_config_json;  ///< empty: toy::text_encoder_config_json()
};

struct ExportOptions {
  std::filesystem::path vae_checkpoint;   ///< vae run folder or checkpoint file
  std::filesystem::path unet_checkpoint;  ///< unet run folder or checkpoint file
  std::filesystem::path out;
  std::string dtype = "fp16";  ///< weights in the files: "fp16", "bf16" or "fp32"
  bool use_ema = true;         ///< export the EMA UNet weights when the checkpoint has them
  bool overwrite = false;
};

struct StageResult {
  int64_t first_step = 0;  ///< first step this invocation ran (1 for a fresh run)
  int64_t last_step = 0;   ///< the step of the checkpoint written at the end
  std::vector<double> losses;  ///< training loss of every step this invocation ran
  double val_loss = -1.0;      ///< at the end (< 0: none)
  double images_per_second = 0.0;  ///< training throughput (steady state, validation excluded)
  double seconds = 0.0;            ///< wall time of this invocation
  double data_seconds = 0.0;       ///< part of the training steps spent rendering images (and encoding latents)
  bool stopped_by_time = false;    ///< the --minutes budget or a signal ended it
  double latent_mean = 0.0, latent_std = 0.0, scaling_factor = 0.0;  ///< vae stage (stat_images > 0)
};

StageResult train_vae(const VaeStageOptions& options);
StageResult train_unet(const UnetStageOptions& options);
/// Builds the three models from the checkpoints' configs and weights and writes the diffusers folder through
/// toy::export_model_folder with those configs (scaling_factor: the one the unet stage trained with).
void export_model(const ExportOptions& options);

/// The whole file as text; throws stylealigned::Error naming it if it cannot be read.
std::string read_text(const std::filesystem::path& path);

/// `path` itself if it is a file, else `path`/checkpoint.safetensors.
std::filesystem::path checkpoint_path(const std::filesystem::path& path);

/// Asks a running stage to stop after the current step and write its checkpoint (what SIGINT/SIGTERM do).
void request_stop();

}  // namespace stylealigned::train
