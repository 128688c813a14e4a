"""The OpenAI-compatible upsampler backend against a real HTTP server on 127.0.0.1 that speaks
the chat-completions protocol: normal, slow, failing then recovering, refusing, unreachable;
and the API key never shows in what it logs, raises or records."""

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ml.config import to_dict
from ml.upsampler import load_upsampler
from ml.upsampler.chat import INSTRUCTIONS, ChatUpsampler, UpsamplerError
from ml.upsampler.config import ChatConfig

KEY = "sk-test-0123456789-secret"
ANSWER = "A plain white background with a large red circle in the top left corner."


@dataclass
class Behaviour:
    """What the server does next: `failures` 500s first, then `delay_s` before each answer."""

    failures: int = 0
    delay_s: float = 0.0
    status: int = 200
    requests: list[dict[str, Any]] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Behaviour]]:
    behaviour = Behaviour()
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def complete(request: Request) -> JSONResponse:
        body = await request.json()
        behaviour.requests.append({"body": body, "auth": request.headers.get("authorization")})
        if behaviour.failures:
            behaviour.failures -= 1
            return JSONResponse({"error": "overloaded"}, status_code=500)
        if behaviour.status == 401:  # as some servers do: the rejected header echoed back
            auth = request.headers.get("authorization")
            return JSONResponse({"error": {"message": f"invalid: {auth}"}}, status_code=401)
        if behaviour.status != 200:
            return JSONResponse({"error": {"message": "bad model"}}, status_code=behaviour.status)
        await asyncio.sleep(behaviour.delay_s)
        prompt = body["messages"][-1]["content"]
        message = {"role": "assistant", "content": f" {ANSWER} ({prompt}) "}
        return JSONResponse({"choices": [{"index": 0, "message": message}]})

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not running.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1", behaviour
    running.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def chat(server, monkeypatch) -> tuple[ChatConfig, Behaviour, list[str]]:
    url, behaviour = server
    behaviour.failures, behaviour.delay_s, behaviour.status = 0, 0.0, 200
    behaviour.requests.clear()
    monkeypatch.setenv("TEST_UPSAMPLER_KEY", KEY)
    for name in ("OPENAI_BASE_URL", "OPENAI_MODEL"):  # a user's own endpoint stays out
        monkeypatch.delenv(name, raising=False)
    cfg = ChatConfig(base_url=url, model="toy-gpt", api_key_env="TEST_UPSAMPLER_KEY",
                     timeout_s=1.0, max_retries=2, backoff_s=0.01)  # fmt: skip
    return cfg, behaviour, []


def test_a_prompt_is_sent_with_the_instructions_and_the_answer_returned(chat) -> None:
    cfg, behaviour, logged = chat
    upsample = load_upsampler(backend="openai", chat=cfg, log=logged.append)
    assert upsample(["a red circle", "a star"], seed=7) == [
        f"{ANSWER} (a red circle)", f"{ANSWER} (a star)"
    ]
    first = behaviour.requests[0]
    assert first["auth"] == f"Bearer {KEY}"
    assert first["body"]["model"] == "toy-gpt" and first["body"]["seed"] == 7
    assert first["body"]["messages"] == [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "user", "content": "a red circle"},
    ]
    assert "15 to 80 words" in INSTRUCTIONS and logged == []


def test_a_server_error_is_retried_with_backoff_then_succeeds(chat) -> None:
    cfg, behaviour, logged = chat
    behaviour.failures = 2
    waits: list[float] = []
    upsample = ChatUpsampler(cfg, logged.append, sleep=waits.append)
    assert upsample(["a red circle"]) == [f"{ANSWER} (a red circle)"]
    assert len(behaviour.requests) == 3 and waits == [0.01, 0.02]
    assert ["HTTP 500" in line for line in logged] == [True, True]


def test_a_slow_server_times_out_and_the_error_says_so(chat) -> None:
    cfg, behaviour, logged = chat
    behaviour.delay_s = 1.5
    started = time.monotonic()
    with pytest.raises(UpsamplerError, match=r"no answer within 1.0 s, 3 attempt\(s\)"):
        ChatUpsampler(cfg, logged.append)(["a red circle"])
    assert time.monotonic() - started < 3 * 1.0 + 2  # each attempt cut at the timeout
    assert len(logged) == 2


def test_a_client_error_is_not_retried(chat) -> None:
    cfg, behaviour, _ = chat
    behaviour.status = 404
    with pytest.raises(UpsamplerError, match="HTTP 404.*bad model"):
        ChatUpsampler(cfg)(["a red circle"])
    assert len(behaviour.requests) == 1


def test_a_key_the_server_echoes_back_is_redacted(chat) -> None:
    cfg, behaviour, _ = chat
    behaviour.status = 401
    with pytest.raises(UpsamplerError, match=r"HTTP 401.*invalid: Bearer \*\*\*") as err:
        ChatUpsampler(cfg)(["a red circle"])
    assert KEY not in str(err.value)


def test_an_unreachable_endpoint_is_a_clear_error(chat) -> None:
    cfg, _, logged = chat
    cfg.base_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with pytest.raises(UpsamplerError, match=r"127\.0\.0\.1.*unreachable.*3 attempt") as err:
        ChatUpsampler(cfg, logged.append)(["a red circle"])
    assert KEY not in str(err.value) and KEY not in repr(err.value)


def test_the_key_is_read_from_the_environment_only_and_never_shown(chat, monkeypatch) -> None:
    cfg, behaviour, logged = chat
    behaviour.failures = 1
    upsample = ChatUpsampler(cfg, logged.append, sleep=lambda _: None)
    upsample(["a red circle"])
    assert logged and not any(KEY in line for line in logged)
    assert KEY not in repr(upsample) and KEY not in str(to_dict(cfg))
    monkeypatch.delenv("TEST_UPSAMPLER_KEY")
    with pytest.raises(UpsamplerError, match=r"\$TEST_UPSAMPLER_KEY, which is not set"):
        ChatUpsampler(cfg)
    with pytest.raises(UpsamplerError, match="base_url and .model"):
        ChatUpsampler(ChatConfig(api_key_env="TEST_UPSAMPLER_KEY"))
