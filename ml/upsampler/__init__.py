"""Prompt upsampling (DALL·E 3 section 3.5): short user prompts rewritten as the descriptive
captions the text-to-image model was trained on.

One call gives either backend, both `(prompts, seed) -> prompts`:

    from ml.upsampler import ChatConfig, load_upsampler
    upsample = load_upsampler("assets/prompt_upsampler")            # the trained local T5
    upsample = load_upsampler(backend="openai", chat=ChatConfig())   # a chat-completions API
    images = pipe(upsample(["a red circle at the top"]), 25, 3.0, seed=0)
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ml.upsampler.config import BACKENDS, ChatConfig


def load_upsampler(
    folder: Path | str | None = None,
    backend: str = "local",
    chat: ChatConfig | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> Any:
    """The local upsampler saved in `folder`, or the chat backend configured by `chat`."""
    if backend not in BACKENDS:
        raise ValueError(f"upsampler backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "openai":
        from ml.upsampler.chat import ChatUpsampler

        return ChatUpsampler(chat or ChatConfig(), log)
    if folder is None:
        raise ValueError("the local upsampler needs its folder (the prompt_upsampler asset)")
    from ml.upsampler.model import LocalUpsampler

    return LocalUpsampler.from_pretrained(Path(folder))
