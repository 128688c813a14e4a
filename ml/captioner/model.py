"""The captioner: a small GPT-2 that reads a CLIP image representation as a prefix (ClipCap).

The frozen CLIP is not part of it. It takes precomputed features, one row per image (see
`ml.captioner.features`): the pooled embedding F(i), optionally followed by a grid of image
tokens from inside the CLIP's image tower. F(i) goes through an MLP to `prefix_length`
embeddings, as in ClipCap; the tokens are merged by a strided convolution into a coarser grid
of more prefix embeddings, so the LM can attend to each part of the image.

Why the tokens (a toy CLIP's F(i) holds little beyond colours): docs/benchmarks.md,
"Design measurements".
"""

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from ml.captioner.config import CaptionerConfig
from ml.files import check_weights

CONFIG_FILE = "captioner_config.json"
PROJECTOR_FILE = "projector.safetensors"


class TokenProjector(nn.Module):
    """Patch tokens to LM embeddings, each from a neighbourhood of tokens (stride s, 2s-1 wide).

    A shape is spread over several patch tokens and must be read from them together: no
    single token (nor a linear map of a few) tells a star from a cross. Merging neighbours
    also shortens the prefix, which is most of the LM's compute.
    """

    def __init__(self, config: CaptionerConfig) -> None:
        super().__init__()
        self.grid = config.token_grid
        stride = config.token_stride
        self.merge = nn.Conv2d(
            config.token_dim, config.n_embd, 2 * stride - 1, stride=stride, padding=stride - 1
        )
        self.out = nn.Sequential(nn.GELU(), nn.Linear(config.n_embd, config.n_embd))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, grid * grid, token_dim) in row-major order -> (batch, positions, n_embd)."""
        grid = tokens.transpose(1, 2).unflatten(2, (self.grid, self.grid))
        return self.out(self.merge(grid).flatten(2).transpose(1, 2))


class Captioner(nn.Module):
    """A causal LM over [image prefix, bos, caption tokens, eos]."""

    def __init__(self, config: CaptionerConfig, tokenizer: PreTrainedTokenizerFast) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        lm_config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=config.condition_length + config.max_caption_tokens,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            resid_pdrop=0.0,  # no dropout: the toy captioners underfit rather than overfit
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        self.lm = GPT2LMHeadModel(lm_config)
        hidden = config.n_embd * config.prefix_length
        self.projector = nn.Sequential(
            nn.Linear(config.clip_dim, hidden // 2), nn.Tanh(), nn.Linear(hidden // 2, hidden)
        )
        self.token_projector = TokenProjector(config) if config.token_grid else None

    def prefix(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, condition_length, n_embd) LM input embeddings for (batch, feature_dim)."""
        cfg = self.config
        if features.shape[-1] != cfg.feature_dim:
            raise ValueError(f"expected features of width {cfg.feature_dim}, got {features.shape}")
        pooled = self.projector(features[:, : cfg.clip_dim])
        prefix = pooled.view(len(features), cfg.prefix_length, cfg.n_embd)
        if self.token_projector is None:
            return prefix
        tokens = features[:, cfg.clip_dim :].view(len(features), cfg.patch_tokens, cfg.token_dim)
        return torch.cat([prefix, self.token_projector(tokens)], dim=1)

    def forward(
        self, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits at the caption positions only: (batch, len(input_ids), vocab).

        `input_ids` starts with bos; the logits at position t predict token t + 1.
        """
        prefix = self.prefix(features)
        embeds = torch.cat([prefix, self.lm.get_input_embeddings()(input_ids)], dim=1)
        mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
        hidden = self.lm.transformer(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return self.lm.lm_head(hidden[:, prefix.shape[1] :])

    def save_pretrained(self, directory: str | Path) -> None:
        """The LM and tokenizer in their transformers formats, the projectors as safetensors."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        projectors = {
            name: tensor.contiguous()
            for name, tensor in self.state_dict().items()
            if not name.startswith("lm.")
        }
        save_file(projectors, directory / PROJECTOR_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Captioner":
        """Loads what `save_pretrained` wrote, in eval mode."""
        directory = check_weights(Path(directory))
        config = CaptionerConfig(**json.loads((directory / CONFIG_FILE).read_text()))
        model = cls(config, PreTrainedTokenizerFast.from_pretrained(directory))
        model.lm = GPT2LMHeadModel.from_pretrained(directory)
        model.load_state_dict(load_file(directory / PROJECTOR_FILE), strict=False)
        return model.eval()
