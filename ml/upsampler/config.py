"""The prompt upsampler's config: light, so the Dagster code location imports it cheaply."""

from dataclasses import dataclass, field

from ml.config import TrainConfig

BACKENDS = ("local", "openai")
PAIR_SOURCES = ("labelled", "recaptioned")
UPSAMPLER_CHAT = "upsampler_chat"  # the params.yaml section of `ChatConfig`


@dataclass
class T5Shape:
    """The toy seq2seq T5 built from config (encoder and decoder alike)."""

    d_model: int = 128
    d_kv: int = 32
    d_ff: int = 256
    num_layers: int = 2
    num_heads: int = 4


@dataclass
class ChatConfig:
    """params.yaml's `upsampler_chat`: an OpenAI-compatible chat-completions endpoint. The API
    key is read from the environment variable `api_key_env` only, so it is never in
    params.yaml, a run's config or its logs; `base_url` and `model` fall back to
    OPENAI_BASE_URL and OPENAI_MODEL."""

    base_url: str = ""
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 30.0
    max_retries: int = 3  # after the first attempt, for timeouts, 429 and 5xx
    backoff_s: float = 1.0  # doubled after each retry
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"ChatConfig.timeout_s must be > 0, got {self.timeout_s}")
        if self.max_retries < 0 or self.backoff_s < 0:
            raise ValueError("ChatConfig.max_retries and backoff_s must be >= 0")


@dataclass
class UpsamplerConfig:
    """`prompt_upsampler`: a seq2seq model trained on (alt-text or short caption ->
    descriptive caption) pairs. The chat backend it can be swapped for at inference has its own
    section (`upsampler_chat`: `ChatConfig`), so its settings never retrain the model.

    `pretrained` fine-tunes a local T5 folder (e.g. flan-t5-small) instead of the toy one.
    A pair is kept when at least `min_overlap` of its source's words are in its target, which
    drops alt-text the description does not bear out (junk, wrong objects).
    """

    pretrained: str = ""
    vocab_size: int = 512
    model: T5Shape = field(default_factory=T5Shape)
    sources: tuple[str, ...] = PAIR_SOURCES
    min_overlap: float = 1.0
    max_source_tokens: int = 64
    max_new_tokens: int = 96
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.sources) - set(PAIR_SOURCES))
        if unknown or not self.sources:
            raise ValueError(f"UpsamplerConfig.sources: {unknown or 'none'}; known {PAIR_SOURCES}")
        if not 0 <= self.min_overlap <= 1:
            raise ValueError(f"UpsamplerConfig.min_overlap must be in [0, 1]: {self.min_overlap}")
        for name in ("max_source_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"UpsamplerConfig.{name} must be at least 1")
