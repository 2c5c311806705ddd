// stylealigned_train: trains the embedded toy model (VAE, then text encoder + UNet) and exports it as a diffusers
// folder. See tools/train/README.md for the stage commands and their measured cost.
#include <CLI/CLI.hpp>
#include <dlfcn.h>
#include <fmt/format.h>

#include <exception>
#include <string>

#include "stylealigned/error.h"
#include "stylealigned/runtime.h"
#include "trainer.h"

namespace {

namespace train = stylealigned::train;

// OpenBLAS (Debian's libtorch runs its GEMMs there) keeps its own thread pool next to ATen's: limit both, so
// `--threads 1` really leaves the other cores alone.
void limit_blas_threads(int threads) {
  using SetThreads = void (*)(int);
  if (auto* set = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) set(threads);
}

void add_common(CLI::App& cmd, train::CommonOptions& o) {
  cmd.add_option("--run-dir", o.run_dir, "Folder of this run: checkpoint, loss.csv, summary.json")->required();
  cmd.add_option("--seed", o.seed, "Seed of the weights, data, noise and timesteps")->capture_default_str();
  cmd.add_option("--batch", o.batch_size, "Images per step")->capture_default_str();
  cmd.add_option("--max-steps", o.max_steps, "Total steps of the run, counted across resumes (0: no limit)")
      ->capture_default_str();
  cmd.add_option("--minutes", o.minutes,
                 "Stop cleanly (with a checkpoint) before this many minutes of wall time (0: no limit)")
      ->capture_default_str();
  cmd.add_option("--lr", o.lr, "Peak learning rate (AdamW)")->capture_default_str();
  cmd.add_option("--warmup", o.warmup_steps, "Linear warm-up steps")->capture_default_str();
  cmd.add_option("--lr-schedule", o.lr_schedule, "After the warm-up: constant, or cosine down to --lr-min at --max-steps")
      ->check(CLI::IsMember({"constant", "cosine"}))
      ->capture_default_str();
  cmd.add_option("--lr-min", o.lr_min, "Final learning rate of the cosine schedule")->capture_default_str();
  cmd.add_option("--weight-decay", o.weight_decay, "AdamW decoupled weight decay")->capture_default_str();
  cmd.add_option("--grad-clip", o.grad_clip, "Max global gradient norm (0: off)")->capture_default_str();
  cmd.add_option("--checkpoint-every", o.checkpoint_every, "Steps between checkpoints (also written at the end)")
      ->capture_default_str();
  cmd.add_option("--val-every", o.val_every, "Steps between validation losses (also at the end)")
      ->capture_default_str();
  cmd.add_option("--val-size", o.val_size, "Images in the fixed held-out validation set")->capture_default_str();
  cmd.add_option("--device", o.device, "cpu, cuda or cuda:N")->capture_default_str();
  cmd.add_flag("--resume", o.resume, "Continue the run in --run-dir from its checkpoint");
  cmd.add_option("--image-size", o.image_size, "Rendered image side in pixels")->capture_default_str();
  cmd.add_option("--progress", o.progress, "auto (bar on a terminal), bar, lines or none")
      ->check(CLI::IsMember({"auto", "bar", "lines", "none"}))
      ->capture_default_str();
  cmd.add_option("--progress-every", o.progress_every, "Steps between progress lines (when not drawing a bar)")
      ->capture_default_str();
  cmd.add_flag("--fixed-batch", o.fixed_batch, "Train on one batch over and over (overfit check)");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"stylealigned_train: train the embedded toy text-to-image model on CPU or GPU, stage by stage"};
  app.require_subcommand(1);
  app.fallthrough();
  int threads = 0;
  app.add_option("--threads", threads, "CPU threads for libtorch and OpenBLAS (default: all cores)");

  train::VaeStageOptions vae;
  vae.common.lr = 5e-4;
  vae.common.batch_size = 8;
  vae.common.warmup_steps = 100;
  std::string vae_config_file;
  auto* vae_cmd = app.add_subcommand("vae", "Stage 1: train the AutoencoderKL on freshly rendered world images; at "
                                            "the end measure the latent std and report scaling_factor = 1/std");
  add_common(*vae_cmd, vae.common);
  vae_cmd->add_option("--recon", vae.recon, "Reconstruction loss")
      ->check(CLI::IsMember({"l1", "mse"}))
      ->capture_default_str();
  vae_cmd->add_option("--kl-weight", vae.kl_weight, "Weight of the KL term")->capture_default_str();
  vae_cmd->add_option("--stat-images", vae.stat_images, "Images for the latent statistics at the end (0: skip)")
      ->capture_default_str();
  vae_cmd->add_option("--vae-config", vae_config_file, "vae config.json to train instead of the toy model's");

  train::UnetStageOptions unet;
  unet.common.lr = 3e-4;
  unet.common.batch_size = 32;
  std::string unet_config_file, te_config_file;
  auto* unet_cmd = app.add_subcommand(
      "unet", "Stage 2: freeze the VAE, train the CLIP text encoder and the UNet from scratch (DDPM epsilon MSE, "
              "caption dropout for classifier-free guidance, EMA)");
  add_common(*unet_cmd, unet.common);
  unet_cmd->add_option("--vae", unet.vae_checkpoint, "The vae run folder (or its checkpoint file)")->required();
  unet_cmd->add_option("--scaling-factor", unet.scaling_factor, "Latent scale (0: the vae stage's measurement)")
      ->capture_default_str();
  unet_cmd->add_option("--latents", unet.latents, "VAE posterior mean or sample")
      ->check(CLI::IsMember({"mean", "sample"}))
      ->capture_default_str();
  unet_cmd->add_option("--caption-dropout", unet.caption_dropout, "Share of empty captions")->capture_default_str();
  unet_cmd->add_option("--ema-decay", unet.ema_decay, "EMA of the UNet weights (0: off)")->capture_default_str();
  unet_cmd->add_option("--data-reuse", unet.data_reuse,
                       "Steps per rendered batch, each with new noise and timesteps (GPU: the renderer is the limit)")
      ->capture_default_str();
  unet_cmd->add_option("--init-from", unet.init_from,
                       "Start a new run from this diffusers folder's text_encoder and unet (e.g. models/toy); with "
                       "--unet-config / --text-encoder-config, a grown config: the folder's tensors load by name, "
                       "new layers start as identities")
      ->check(CLI::ExistingDirectory);
  unet_cmd->add_option("--unet-config", unet_config_file, "unet config.json instead of the toy model's");
  unet_cmd->add_option("--text-encoder-config", te_config_file, "text_encoder config.json instead of the toy model's");

  train::ExportOptions exp;
  auto* export_cmd =
      app.add_subcommand("export", "Write the diffusers folder (fp16 weights) from the latest vae and unet checkpoints");
  export_cmd->add_option("--vae", exp.vae_checkpoint, "The vae run folder (or checkpoint)")->required();
  export_cmd->add_option("--unet", exp.unet_checkpoint, "The unet run folder (or checkpoint)")->required();
  export_cmd->add_option("--out", exp.out, "Output model folder")->required();
  export_cmd->add_option("--dtype", exp.dtype, "Weight dtype in the files")
      ->check(CLI::IsMember({"fp16", "bf16", "fp32"}))
      ->capture_default_str();
  bool no_ema = false;
  export_cmd->add_flag("--no-ema", no_ema, "Export the live UNet weights instead of the EMA");
  export_cmd->add_flag("--overwrite", exp.overwrite, "Replace an existing --out folder");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  try {
    const int used = stylealigned::configure_threads(threads);
    stylealigned::configure_large_tensor_pages();
    limit_blas_threads(used);
    if (vae_cmd->parsed()) {
      if (!vae_config_file.empty()) vae.vae_config_json = train::read_text(vae_config_file);
      train::train_vae(vae);
    } else if (unet_cmd->parsed()) {
      if (!unet_config_file.empty()) unet.unet_config_json = train::read_text(unet_config_file);
      if (!te_config_file.empty()) unet.text_encoder_config_json = train::read_text(te_config_file);
      train::train_unet(unet);
    } else if (export_cmd->parsed()) {
      exp.use_ema = !no_ema;
      train::export_model(exp);
    }
  } catch (const std::exception& e) {
    fmt::print(stderr, "stylealigned_train: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
