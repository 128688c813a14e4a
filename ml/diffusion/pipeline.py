"""The text-to-image model as a diffusers pipeline: T5 encoder -> U-Net denoiser (-> VAE decoder).

Saved in diffusers' layout (`model_index.json`, `unet/`, `text_encoder/`, `tokenizer/`,
`scheduler/`, and `vae/` for latent diffusion), so diffusers and transformers tooling read it
unchanged. The saved `unet/` (and `text_encoder/` when it trained) hold the EMA weights, which
are what the paper samples with.

The two calls every sampler and trainer shares are module-level functions, `encode_prompts`
and `predict_noise`, so a distillation stage (a 2-step consistency student) can reuse them
with its own scheduler.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    LCMScheduler,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image
from transformers import (
    AutoTokenizer,
    ByT5Tokenizer,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
)

from ml.diffusion.config import DiffusionConfig
from ml.files import check_weights
from ml.tokenizer import caption_tokenizer

# Samplers over the training noise schedule. DDIM and DPM-Solver are deterministic (no noise
# per step) and serve a diffusion model; "lcm" is the multistep consistency sampler of a
# distilled model (`ml.diffusion.distill`), which re-noises between its few steps.
SAMPLERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "lcm": LCMScheduler,
}


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, text_encoder: T5EncoderModel, prompts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states, attention mask) of the prompts, padded to the longest one.

    The mask goes on to the U-Net's cross-attention, so padding never conditions the image and
    a prompt's embedding does not depend on what else is in its batch. Prompts longer than
    the tokenizer's `model_max_length` are cut.
    """
    tokens = tokenizer(
        list(prompts),
        padding="longest",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device  # also works through a DDP wrapper
    mask = tokens.attention_mask.to(device)
    states = text_encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask)
    return states.last_hidden_state, mask


def guidance_embedding(guidance_scale: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of each sample's guidance scale, (batch, dim): how a distilled model
    is told the classifier-free guidance it should imitate in a single evaluation (LCM, after
    VDM's embedding; scaled by 1000 like a timestep)."""
    half = dim // 2
    frequencies = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half) / (half - 1))
    angles = 1000.0 * guidance_scale.float().cpu()[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(embedding, (0, dim % 2)).to(guidance_scale.device)


def predict_noise(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    text_states: torch.Tensor,
    text_mask: torch.Tensor,
    guidance: torch.Tensor | None = None,
) -> torch.Tensor:
    """The U-Net's output for noisy `latents` at `timesteps`: the noise, or v for
    `prediction_type="v_prediction"`, as the scheduler's config says.

    The prompt conditions the U-Net twice, as in Imagen: token by token through
    cross-attention, and as the masked mean of its token states added to the timestep
    embedding (diffusers' "projection" class embedding), a global path that learns fast.
    A distilled U-Net (one with `time_cond_proj_dim`) also takes each sample's `guidance`
    scale, embedded into its timestep embedding.
    """
    mask = text_mask.unsqueeze(-1).to(text_states.dtype)
    pooled = (text_states * mask).sum(dim=1) / mask.sum(dim=1)
    guidance_dim = getattr(unet, "module", unet).config.time_cond_proj_dim  # DDP wraps it
    if (guidance is None) != (guidance_dim is None):
        raise ValueError("pass a guidance scale exactly when the U-Net is a distilled one")
    condition = None if guidance is None else guidance_embedding(guidance, guidance_dim)
    return unet(
        latents,
        timesteps,
        encoder_hidden_states=text_states,
        encoder_attention_mask=text_mask,
        class_labels=pooled,
        timestep_cond=None if condition is None else condition.to(latents.dtype),
    ).sample


def guided(prediction: torch.Tensor, guidance_scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance on a batch stacked as [unconditional; conditional]; the scale
    may be a tensor that broadcasts over one half (one scale per sample)."""
    unconditional, conditional = prediction.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB image as a (3, size, size) float tensor in [-1, 1]: `to_pil`'s inverse."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).float() / 127.5 - 1


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """A (batch, 3, h, w) tensor in [-1, 1] as PIL images."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


class TextToImagePipeline(DiffusionPipeline):
    """T5-conditioned U-Net diffusion in pixel space, or in a VAE's latent space when `vae` is set.

    `scheduler` is the training noise schedule (DDPM); sampling builds DDIM or DPM-Solver from
    its config, so one saved model serves every sampler. A consistency-distilled model (its
    U-Net takes a guidance embedding) samples with the LCM scheduler in a few steps and gets
    guidance in its single U-Net call per step instead of a second, unconditional one.
    """

    _optional_components = ["vae"]
    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder: T5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | None = None,
    ) -> None:
        super().__init__()
        if not torch.cuda.is_available():
            # The same maths as SDPA, faster on CPU at the toy's few, small heads
            # (docs/benchmarks.md); GPUs keep diffusers' default.
            unet.set_attn_processor(AttnProcessor())
        self.register_modules(
            unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs) -> "TextToImagePipeline":
        """diffusers' loader, after every weights file of the saved folder is checked (named
        if truncated or corrupt)."""
        return super().from_pretrained(check_weights(Path(folder)), **kwargs)

    def encode_images(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Pixels in [-1, 1] -> what the U-Net denoises: the scaled VAE latents, or the pixels."""
        return self.draw_latents(self.image_moments(pixels), generator)

    def image_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """What `draw_latents` draws from: the VAE posterior's mean and log-variance stacked on
        the channels, or the pixels without a VAE. Deterministic, so training computes it once
        per image (`ml.diffusion.caches`)."""
        if self.vae is None:
            return pixels
        return self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.parameters

    def draw_latents(
        self, moments: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A posterior sample from `image_moments`' output, scaled as the U-Net sees it."""
        if self.vae is None:
            return moments
        shift, scale = self._latent_normalization()
        return (DiagonalGaussianDistribution(moments).sample(generator) - shift) * scale

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of `encode_images`: pixels in [-1, 1] (unclamped)."""
        if self.vae is None:
            return latents
        shift, scale = self._latent_normalization()
        return self.vae.decode((latents / scale + shift).to(self.vae.dtype)).sample

    def _latent_normalization(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(shift, scale) taking the VAE's latents to what the U-Net sees: per channel where
        its config has `latents_mean`/`latents_std` (SDXL's convention, our toy VAE's), else
        SD's one `scaling_factor`."""
        config = self.vae.config
        if getattr(config, "latents_mean", None) is None:
            return 0.0, config.scaling_factor
        device, dtype = self.vae.device, self.vae.dtype
        channels = (1, -1, 1, 1)
        mean = torch.tensor(config.latents_mean, device=device, dtype=dtype).view(channels)
        std = torch.tensor(config.latents_std, device=device, dtype=dtype).view(channels)
        return mean, config.scaling_factor / std

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | Sequence[str],
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        seed: int = 0,
        sampler: str | None = None,
    ) -> list[Image.Image]:
        """One image per prompt.

        The noise is drawn on the CPU from a generator seeded with `seed`, so a seed gives
        the same images on any device; image i depends on the seed and its place in
        the batch. Guidance uses the empty prompt's embedding, which caption dropout trained;
        `guidance_scale=1` turns it off. `sampler` defaults to "lcm" for a distilled model
        and "ddim" otherwise.
        """
        distilled = self.is_distilled
        sampler = sampler or ("lcm" if distilled else "ddim")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
        if distilled != (sampler == "lcm"):
            raise ValueError(
                f"sampler {sampler!r} does not fit a {'' if distilled else 'non-'}"
                "distilled model; distilled models sample with 'lcm'"
            )
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        generator = torch.Generator().manual_seed(seed)
        scheduler = SAMPLERS[sampler].from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        use_guidance = guidance_scale != 1.0 and not distilled
        guidance = None
        if distilled:
            guidance = torch.full((len(prompts),), float(guidance_scale), device=self.device)
        texts = [""] * len(prompts) + prompts if use_guidance else prompts
        text_states, text_mask = encode_prompts(self.tokenizer, self.text_encoder, texts)
        text_states = text_states.to(self.unet.dtype)

        config = self.unet.config
        shape = (len(prompts), config.in_channels, config.sample_size, config.sample_size)
        latents = torch.randn(shape, generator=generator).to(self.device, self.unet.dtype)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = torch.cat([latents] * 2) if use_guidance else latents
            model_input = scheduler.scale_model_input(model_input, t)
            prediction = predict_noise(self.unet, model_input, t, text_states, text_mask, guidance)
            if use_guidance:
                prediction = guided(prediction, guidance_scale)
            latents = scheduler.step(prediction, t, latents, generator=generator).prev_sample
        return to_pil(self.decode_latents(latents))

    @property
    def image_size(self) -> int:
        """The side of the images in pixels (the U-Net's side times the VAE's downsampling)."""
        if self.vae is None:
            return self.unet.config.sample_size
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def is_distilled(self) -> bool:
        """Whether the U-Net is a consistency-distilled student (it takes a guidance scale)."""
        return self.unet.config.time_cond_proj_dim is not None


def existing_dir(path: str, what: str) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{what} directory not found: {path}")
    return directory


def toy_t5_config(cfg: Any, tokenizer: PreTrainedTokenizerBase, **extra: Any) -> T5Config:
    """The toy T5 of `cfg`'s `text_dim`, `text_heads`, `text_ff_dim` and `text_layers`, the one
    shape the diffusion model's encoder and its pretraining (`ml.diffusion.text_pretraining`,
    which adds its decoder in `extra`) share; dropout off, so training is a function of the
    seed and the step."""
    return T5Config(
        vocab_size=len(tokenizer),
        d_model=cfg.text_dim,
        d_kv=cfg.text_dim // cfg.text_heads,
        d_ff=cfg.text_ff_dim,
        num_layers=cfg.text_layers,
        num_heads=cfg.text_heads,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )


def build_text_encoder(
    cfg: DiffusionConfig, corpus: Sequence[str] = ()
) -> tuple[T5EncoderModel, PreTrainedTokenizerBase]:
    """The pretrained T5 at `text_encoder_path` (frozen unless `train_text_encoder`), or the
    toy: a small random T5 encoder, dropout off so training is a pure function of the seed and
    the step, reading BPE tokens learned from `corpus` or ByT5's bytes (`cfg.tokenizer`)."""
    if cfg.text_encoder_path:
        directory = existing_dir(cfg.text_encoder_path, "text_encoder_path")
        encoder = T5EncoderModel.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    else:
        if cfg.tokenizer == "byte":
            tokenizer = ByT5Tokenizer()
        elif corpus:
            tokenizer = caption_tokenizer(corpus, cfg.vocab_size)
        else:
            raise ValueError(
                "tokenizer 'bpe' learns its vocabulary from the training captions: "
                "pass them as `corpus`, or set tokenizer='byte'"
            )
        encoder = T5EncoderModel(toy_t5_config(cfg, tokenizer))
    tokenizer.model_max_length = cfg.max_text_length
    encoder.requires_grad_(cfg.train_text_encoder)
    return encoder, tokenizer


def build_pipeline(
    cfg: DiffusionConfig, corpus: Sequence[str] = (), vae_dir: str | Path | None = None
) -> TextToImagePipeline:
    """A fresh model for `cfg`, its random weights a function of `cfg.train.seed` alone (and its BPE
    vocabulary of the captions in `corpus`): in the latent space of the frozen `AutoencoderKL`
    saved in `vae_dir` (the `image_autoencoder` asset), or in pixel space without one.

    Cross-attention sits only in the `cross_attention_levels` lowest-resolution levels (and the
    mid block): on CPU, attention at higher resolutions costs most of the throughput.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        text_encoder, tokenizer = build_text_encoder(cfg, corpus)
        vae = None
        channels, size = 3, cfg.image_size
        if vae_dir is not None:
            vae = AutoencoderKL.from_pretrained(existing_dir(str(vae_dir), "image_autoencoder"))
            vae.requires_grad_(False)
            channels = vae.config.latent_channels
            size //= 2 ** (len(vae.config.block_out_channels) - 1)
        attending = cfg.cross_attention_levels
        plain = len(cfg.block_out_channels) - attending
        unet = UNet2DConditionModel(
            sample_size=size,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=cfg.block_out_channels,
            down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * attending,
            up_block_types=("CrossAttnUpBlock2D",) * attending + ("UpBlock2D",) * plain,
            layers_per_block=cfg.layers_per_block,
            attention_head_dim=cfg.attention_head_dim,
            norm_num_groups=cfg.norm_num_groups,
            cross_attention_dim=text_encoder.config.d_model,
            class_embed_type="projection",  # the pooled prompt; see predict_noise
            projection_class_embeddings_input_dim=text_encoder.config.d_model,
        )
    scheduler = DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        timestep_spacing="trailing",
        # DDIM would clamp its x0 estimate but step on the model's unclamped noise estimate;
        # under guidance the two disagree, each step leaves noise behind and the samples grow
        # stray blobs (a toy teacher placed its object right 0.21 of the time with clipping,
        # 0.53 without). Pixels are clamped once, when the sample is decoded to an image.
        clip_sample=False,
    )
    return TextToImagePipeline(unet, text_encoder, tokenizer, scheduler, vae)
