"""The OpenAI-compatible backend: any chat-completions endpoint rewrites the prompts.

The instructions follow the paper's appendix C in our own words. Transient failures
(timeouts, refused connections, 429 and 5xx) are retried with exponential backoff; anything
else, or the last failure, raises `UpsamplerError` naming the endpoint and what went wrong,
never the key. There is no fallback to another backend: a caller always knows which one ran.
"""

import os
import time
from collections.abc import Callable, Sequence

import requests

from ml.upsampler.config import ChatConfig

INSTRUCTIONS = (
    "You turn short prompts into captions for a text-to-image model that was trained on long, "
    "descriptive captions of images. Rewrite the user's prompt as one such caption of 15 to 80 "
    "words. Keep every detail the prompt states (each object, its count, colour, size and "
    "position, the background, any quoted text) exactly as stated and contradict none of them. "
    "Where the prompt leaves something open, such as the background, the sizes or where things "
    "are, you may settle it with a plain, likely choice, but add no new subjects. Describe only "
    "what can be seen. Reply with the caption alone."
)
RETRIED_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class UpsamplerError(RuntimeError):
    """The chat endpoint could not upsample a prompt."""


class ChatUpsampler:
    """Prompts -> descriptive prompts through a chat-completions endpoint, one request each."""

    backend = "openai"

    def __init__(
        self,
        cfg: ChatConfig,
        log: Callable[[str], None] = lambda _: None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = (cfg.base_url or os.environ.get("OPENAI_BASE_URL", "")).rstrip("/")
        self.model = cfg.model or os.environ.get("OPENAI_MODEL", "")
        if not self.base_url or not self.model:
            raise UpsamplerError(
                "the openai upsampler needs upsampler_chat.base_url and .model "
                "(or OPENAI_BASE_URL and OPENAI_MODEL)"
            )
        self._key = os.environ.get(cfg.api_key_env, "")
        if not self._key:
            raise UpsamplerError(f"the openai upsampler reads its API key from ${cfg.api_key_env}, "
                                 "which is not set")  # fmt: skip
        self.cfg, self.log, self.sleep = cfg, log, sleep

    def __repr__(self) -> str:  # the key stays out of reprs, tracebacks' locals and logs
        return f"ChatUpsampler(base_url={self.base_url!r}, model={self.model!r})"

    def __call__(self, prompts: Sequence[str], seed: int = 0) -> list[str]:
        return [self._upsample(prompt, seed) for prompt in prompts]

    def _upsample(self, prompt: str, seed: int) -> str:
        url = f"{self.base_url}/chat/completions"
        body = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": INSTRUCTIONS},
                {"role": "user", "content": prompt},
            ],
            "temperature": self.cfg.temperature,
            "seed": seed,
        }
        headers = {"Authorization": f"Bearer {self._key}"}
        attempts, attempt = self.cfg.max_retries + 1, 0
        while True:
            attempt += 1
            try:
                response = requests.post(
                    url, json=body, headers=headers, timeout=self.cfg.timeout_s
                )
            except requests.Timeout:
                failure = f"no answer within {self.cfg.timeout_s} s"
            except requests.ConnectionError as err:
                failure = f"unreachable ({type(err).__name__})"
            else:
                if response.status_code == 200:
                    return _content(response, url)
                failure = f"HTTP {response.status_code}"
                if response.status_code not in RETRIED_STATUS:
                    # a server may echo the request's Authorization header back
                    answer = response.text.replace(self._key, "***")[:200]
                    raise UpsamplerError(f"{url}: {failure}: {answer}")
            if attempt == attempts:
                raise UpsamplerError(f"{url}: {failure}, {attempts} attempt(s)")
            wait = self.cfg.backoff_s * 2 ** (attempt - 1)
            self.log(f"prompt upsampler: {url} {failure}; retry {attempt} in {wait:.1f} s")
            self.sleep(wait)


def _content(response: requests.Response, url: str) -> str:
    try:
        text = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise UpsamplerError(f"{url}: not a chat-completions answer ({err!r})") from err
    if not isinstance(text, str) or not text.strip():
        raise UpsamplerError(f"{url}: the answer holds no text")
    return text.strip()
