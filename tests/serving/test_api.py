"""The HTTP API on a real uvicorn server over the engine on the tiny fixture model, talked to with httpx.

Completions and chat completions, streaming and not, alone and concurrent, equal the greedy text of
``generate`` run alone; stop strings cut the text; a client that goes away frees its slot; a repeated prompt
hits the prefix cache; every bad request gets its 4xx with OpenAI's error naming the field, and the server
answers afterwards; a full queue answers 429; /health and /metrics report the engine.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

from tests.models.fixture import FIXTURE, load
from xlstm_jax.generation import generate
from xlstm_jax.serving.api import DEFAULT_CHAT_TEMPLATE, ChatMessage, create_app, render_chat
from xlstm_jax.serving.engine import Engine
from xlstm_jax.training.data import load_tokenizer

MODEL = "xlstm-tiny"
NUM_SLOTS = 2
MAX_QUEUE = 4
MAX_PROMPT_TOKENS = 40
PROMPT = "the forget gate decays the memory"
# Prompts of one token count (6), so that generate compiles one prefill for all of them.
PROMPTS = [
    "the quick brown fox jumps over",
    "each cell writes a new word",
    "the model predicts the next word",
    "it keeps the matrix memory and",
]
LONG = 100_000  # max_tokens of requests that are cancelled long before they could finish


def _wait_for(condition, what: str, timeout: float = 60.0) -> None:
    """Polls ``condition`` until it holds; a minute allows for a first compilation on a busy 2-CPU machine."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def served():
    """A uvicorn server on a free port in a background thread, over a started engine on the fixture."""
    config, params, runtime = load()
    tokenizer = load_tokenizer(FIXTURE, bos_id=config.bos_token_id, eos_id=config.eos_token_id)
    engine = Engine(
        config,
        params,
        num_slots=NUM_SLOTS,
        runtime=runtime,
        max_prompt_tokens=MAX_PROMPT_TOKENS,
        prefill_chunk_tokens=16,
        max_queue=MAX_QUEUE,
        prefix_cache_bytes=1 << 24,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with engine:
        app = create_app(engine, tokenizer, model_name=MODEL)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        _wait_for(lambda: server.started, "the server to start")
        with httpx.Client(base_url=url, timeout=60) as client:
            yield SimpleNamespace(
                url=url, client=client, engine=engine, tokenizer=tokenizer, config=config, params=params,
                runtime=runtime,
            )  # fmt: skip
        server.should_exit = True
        thread.join(timeout=30)
    sock.close()


@functools.cache
def _greedy_ids(prompt_ids: tuple[int, ...], n: int) -> tuple[int, ...]:
    config, params, runtime = load()
    out = generate(config, params, [list(prompt_ids)], n, stop_tokens=(), runtime=runtime)
    return tuple(np.asarray(out.tokens[0]).tolist())


@functools.cache
def _reference_tokenizer() -> Tokenizer:
    """The fixture's tokenizer as ``tokenizers`` reads it: its decode skips the special ids and the ids past its
    vocabulary (the model's is larger), as the API's text must."""
    return Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))


def _decode(ids) -> str:
    return _reference_tokenizer().decode(list(ids))


def _greedy_text(s, prompt: str, n: int) -> str:
    return _decode(_greedy_ids(tuple(int(t) for t in s.tokenizer.encode(prompt)), n))


def _completion(prompt, max_tokens: int = 8, **fields) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return body | fields


def _events(lines) -> list:
    """The JSON payloads of an SSE stream's ``data:`` lines, up to ``[DONE]`` (which must come last)."""
    out = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            return out
        out.append(json.loads(data))
    raise AssertionError("the stream ended without data: [DONE]")


def _metrics(s) -> dict[str, float]:
    """The samples of /metrics, by name and labels."""
    response = s.client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


def _idle(s) -> bool:
    stats = s.engine.stats()
    return stats["slots_in_use"] == 0 and stats["queue_length"] == 0


# ----------------------------------------------------------------------------------------------------------
# Completions
# ----------------------------------------------------------------------------------------------------------


def test_completion_equals_generate(served):
    s = served
    response = s.client.post("/v1/completions", json=_completion(PROMPT, 8))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL and body["id"].startswith("cmpl-")
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["text"] == _greedy_text(s, PROMPT, 8)
    n_prompt = len(s.tokenizer.encode(PROMPT))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 8, "total_tokens": n_prompt + 8}

    ids = [int(t) for t in s.tokenizer.encode(PROMPT)]  # the prompt as token ids gives the same text
    by_ids = s.client.post("/v1/completions", json=_completion(ids, 8)).json()
    assert by_ids["choices"][0]["text"] == choice["text"]


def test_streaming_completion_equals_non_streaming(served):
    s = served
    fields = {"stream": True, "stream_options": {"include_usage": True}}
    with s.client.stream("POST", "/v1/completions", json=_completion(PROMPT, 8, **fields)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events(response.iter_lines())
    *chunks, usage = events
    assert len({e["id"] for e in events}) == 1 and all(e["object"] == "text_completion" for e in events)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(chunks) > 2  # the text came in pieces
    assert "".join(c["choices"][0]["text"] for c in chunks) == _greedy_text(s, PROMPT, 8)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8


def test_stop_at_eos_and_at_stop_strings(served):
    s = served
    expected = _greedy_text(s, PROMPT, 12)
    words = expected.split()
    stop = " ".join(words[3:5])  # two words in the middle of the greedy text
    cut = expected[: expected.index(stop)]
    for stream in (False, True):
        body = _completion(PROMPT, 12, stop=["zzz", stop], stream=stream)
        if stream:
            with s.client.stream("POST", "/v1/completions", json=body) as response:
                chunks = _events(response.iter_lines())
            text = "".join(c["choices"][0]["text"] for c in chunks)
            finish = chunks[-1]["choices"][0]["finish_reason"]
        else:
            choice = s.client.post("/v1/completions", json=body).json()["choices"][0]
            text, finish = choice["text"], choice["finish_reason"]
        assert (text, finish) == (cut, "stop"), stream
    # Without ignore_eos the tokenizer's eos_id ends the text: the fixture's greedy text holds none, so the same.
    response = s.client.post("/v1/completions", json=_completion(PROMPT, 12, ignore_eos=False)).json()
    greedy = _greedy_ids(tuple(int(t) for t in s.tokenizer.encode(PROMPT)), 12)
    eos = s.tokenizer.eos_id
    expected_finish = "stop" if eos in greedy else "length"
    expected_ids = greedy[: greedy.index(eos) + 1] if eos in greedy else greedy
    assert response["choices"][0]["finish_reason"] == expected_finish
    assert response["choices"][0]["text"] == _decode(expected_ids)
    _wait_for(lambda: _idle(s), "the slots to free")


def test_concurrent_requests_equal_generate_alone(served):
    """More requests than slots at once, streaming and not: each one's text is generate's on its prompt alone."""
    s = served

    async def one(client: httpx.AsyncClient, prompt: str, stream: bool) -> str:
        body = _completion(prompt, 10, stream=stream)
        if not stream:
            response = await client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"]
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = [line async for line in response.aiter_lines()]
        return "".join(c["choices"][0]["text"] for c in _events(lines))

    async def main() -> list[str]:
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as client:
            jobs = [one(client, p, i % 2 == 1) for i, p in enumerate(PROMPTS)]
            return await asyncio.gather(*jobs)

    # More requests than slots, and none refused even if all arrive before the engine admits the first (the queue
    # holds every request not yet in a slot).
    assert NUM_SLOTS < len(PROMPTS) <= MAX_QUEUE
    texts = asyncio.run(main())
    assert texts == [_greedy_text(s, p, 10) for p in PROMPTS]
    _wait_for(lambda: _idle(s), "the slots to free")


# ----------------------------------------------------------------------------------------------------------
# Chat
# ----------------------------------------------------------------------------------------------------------


def test_chat_completions(served):
    s = served
    messages = [{"role": "system", "content": "the model"}, {"role": "user", "content": "the forget gate"}]
    prompt = render_chat([ChatMessage(**m) for m in messages])
    assert prompt == "<|system|>\nthe model\n<|user|>\nthe forget gate\n<|assistant|>\n"
    expected = _greedy_text(s, prompt, 6)
    body = {"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    response = s.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["choices"] == [
        {"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": expected}}
    ]
    assert out["usage"]["prompt_tokens"] == len(s.tokenizer.encode(prompt))

    with s.client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as response:
        chunks = _events(response.iter_lines())
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected

    # max_completion_tokens stands for max_tokens.
    body = {k: v for k, v in body.items() if k != "max_tokens"} | {"max_completion_tokens": 3}
    assert s.client.post("/v1/chat/completions", json=body).json()["usage"]["completion_tokens"] == 3


def test_render_chat_and_templates():
    messages = [ChatMessage(role="user", content="hi {there}")]
    assert render_chat(messages) == DEFAULT_CHAT_TEMPLATE.format(role="user", content="hi {there}") + "<|assistant|>\n"
    assert render_chat(messages, "[{role}] {content} | ") == "[user] hi {there} | [assistant] "
    for bad in ("{role} only", "{content} only", "{role} {content} {other}", "{role} {content} {", 5):
        with pytest.raises((TypeError, ValueError), match="chat_template"):
            render_chat(messages, bad)


# ----------------------------------------------------------------------------------------------------------
# Cancellation, prefix cache, overload
# ----------------------------------------------------------------------------------------------------------


def test_client_that_leaves_mid_stream_frees_its_slot(served):
    s = served
    _wait_for(lambda: _idle(s), "the slots to free")
    before = s.engine.stats()
    with s.client.stream("POST", "/v1/completions", json=_completion(PROMPT, LONG, stream=True)) as response:
        lines = response.iter_lines()
        first = [next(lines) for _ in range(4)]  # two chunks and the blank lines after them
        assert json.loads(first[0].removeprefix("data: "))["choices"][0]["finish_reason"] is None
        assert s.engine.stats()["slots_in_use"] == 1
    _wait_for(lambda: _idle(s), "the slot of the closed stream to free")
    after = s.engine.stats()
    cancelled = [stats["requests_finished_by_reason"].get("cancelled", 0) for stats in (before, after)]
    assert cancelled[1] == cancelled[0] + 1
    assert after["tokens_generated_total"] - before["tokens_generated_total"] < LONG


def test_client_that_leaves_before_a_non_streaming_answer_frees_its_slot(served):
    s = served
    _wait_for(lambda: _idle(s), "the slots to free")
    cancelled = s.engine.stats()["requests_finished_by_reason"].get("cancelled", 0)
    with pytest.raises(httpx.ReadTimeout):
        s.client.post("/v1/completions", json=_completion(PROMPT, LONG), timeout=1.0)
    _wait_for(lambda: _idle(s), "the slot of the abandoned request to free")
    assert s.engine.stats()["requests_finished_by_reason"].get("cancelled", 0) == cancelled + 1


def test_repeated_prompt_hits_the_prefix_cache(served):
    s = served
    prompt = "the lazy dog feeds back into the input gate and the normaliser"
    first = s.client.post("/v1/completions", json=_completion(prompt, 5)).json()
    before = _metrics(s)
    second = s.client.post("/v1/completions", json=_completion(prompt, 5)).json()
    after = _metrics(s)
    assert second["choices"][0]["text"] == first["choices"][0]["text"] == _greedy_text(s, prompt, 5)
    hits = "xlstm_engine_prefix_cache_hits_total"
    assert after[hits] == before[hits] + 1
    # The whole prompt came from the cache: no prompt token ran through the model again.
    assert after["xlstm_engine_prefill_tokens_total"] == before["xlstm_engine_prefill_tokens_total"]


def test_full_queue_answers_429_and_every_stream_is_freed(served):
    """Streams that never end hold both slots and fill the queue; the next request gets 429 at once."""
    s = served
    _wait_for(lambda: _idle(s), "the slots to free")
    held = []
    try:
        for i in range(NUM_SLOTS + MAX_QUEUE):
            request = s.client.build_request("POST", "/v1/completions", json=_completion(PROMPT, LONG, stream=True))
            response = s.client.send(request, stream=True)
            held.append(response)
            assert response.status_code == 200, response.read()
            _wait_for(lambda n=i + 1: s.engine.stats()["slots_in_use"] == min(n, NUM_SLOTS), "admission")
        assert s.engine.stats()["queue_length"] == MAX_QUEUE
        for path, body in (
            ("/v1/completions", _completion(PROMPT, 4)),
            ("/v1/completions", _completion(PROMPT, 4, stream=True)),
            ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a"}]}),
        ):
            response = s.client.post(path, json=body)
            assert response.status_code == 429, response.text
            error = response.json()["error"]
            assert error["type"] == "rate_limit_error" and "max_queue" in error["message"]
            assert response.headers["retry-after"] == "1"
        assert s.client.get("/health").json()["queue_length"] == MAX_QUEUE
        _wait_for(lambda: s.client.get("/health").json()["running"] == NUM_SLOTS, "both held streams to generate")
    finally:
        for response in held:
            response.close()
    _wait_for(lambda: _idle(s), "every held stream's slot and queue place to free")
    assert s.client.post("/v1/completions", json=_completion(PROMPT, 2)).status_code == 200


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------

_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "the gate"}]}
BAD_REQUESTS = [
    # (path, body, status, param)
    ("/v1/completions", _completion(PROMPT) | {"model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", _CHAT | {"model": "gpt-4"}, 404, "model"),
    ("/v1/completions", _completion("the " * (MAX_PROMPT_TOKENS + 1)), 400, "prompt"),
    ("/v1/completions", _completion([4] * (MAX_PROMPT_TOKENS + 1)), 400, "prompt"),
    ("/v1/chat/completions", _CHAT | {"messages": [{"role": "user", "content": "the " * MAX_PROMPT_TOKENS}]}, 400,
     "messages"),
    ("/v1/completions", _completion([4, 99]), 400, "prompt"),
    ("/v1/completions", _completion([]), 400, "prompt"),
    ("/v1/completions", _completion(""), 400, "prompt"),
    ("/v1/completions", _completion(5), 400, "prompt"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", _completion(PROMPT, temperature=-1), 400, "temperature"),
    ("/v1/completions", _completion(PROMPT, temperature="hot"), 400, "temperature"),
    ("/v1/completions", _completion(PROMPT, top_p=0), 400, "top_p"),
    ("/v1/completions", _completion(PROMPT, top_p=1.5), 400, "top_p"),
    ("/v1/completions", _completion(PROMPT, top_k=-2), 400, "top_k"),
    ("/v1/completions", _completion(PROMPT, 0), 400, "max_tokens"),
    ("/v1/completions", _completion(PROMPT, seed=-1), 400, "seed"),
    ("/v1/completions", _completion(PROMPT, n=2), 400, "n"),
    ("/v1/completions", _completion(PROMPT, stop=5), 400, "stop"),
    ("/v1/completions", _completion(PROMPT, stream=[1]), 400, "stream"),
    ("/v1/completions", _completion(PROMPT, best_of=2), 400, "best_of"),
    ("/v1/completions", _completion(PROMPT, logprobs=2), 400, "logprobs"),
    ("/v1/completions", _completion(PROMPT, echo=True), 400, "echo"),
    ("/v1/chat/completions", _CHAT | {"logprobs": True}, 400, "logprobs"),
    ("/v1/chat/completions", _CHAT | {"n": 3}, 400, "n"),
    ("/v1/chat/completions", _CHAT | {"temperature": -0.5}, 400, "temperature"),
    ("/v1/chat/completions", _CHAT | {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", _CHAT | {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "prompt": "the"}, 400, "messages"),
]  # fmt: skip


def test_bad_requests_get_4xx_naming_the_field_and_the_server_goes_on(served):
    s = served
    for path, body, status, param in BAD_REQUESTS:
        response = s.client.post(path, json=body)
        assert response.status_code == status, (path, body, response.text)
        error = response.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", (body, error)
        assert error["message"], body
    for raw in (b'{"model": "xlstm-tiny", "prompt": ', b"not json", b"\xff\xfe"):
        response = s.client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "body", response.text
    response = s.client.post("/v1/completions", json=[1, 2])  # JSON, but not an object
    assert response.status_code == 400 and response.json()["error"]["param"] == "body"
    assert s.client.get("/v1/nothing").status_code == 404 and "error" in s.client.get("/v1/nothing").json()
    assert s.client.get("/v1/completions").status_code == 405

    # The body is JSON whatever the Content-Type says (curl -d sends a form's).
    form = {"content-type": "application/x-www-form-urlencoded"}
    response = s.client.post("/v1/completions", content=json.dumps(_completion(PROMPT, 2)), headers=form)
    assert response.status_code == 200, response.text

    assert _idle(s)  # no bad request took a slot
    assert s.client.get("/health").json()["status"] == "ok"
    response = s.client.post("/v1/completions", json=_completion(PROMPT, 3))
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == _greedy_text(s, PROMPT, 3)


# ----------------------------------------------------------------------------------------------------------
# Health, models, metrics
# ----------------------------------------------------------------------------------------------------------


def test_health_models_and_metrics(served):
    s = served
    _wait_for(lambda: _idle(s), "the slots to free")
    health = s.client.get("/health")
    assert health.status_code == 200
    want = {"status": "ok", "model": MODEL, "queue_length": 0, "slots_in_use": 0, "running": 0, "num_slots": 2}
    assert health.json() == want
    assert [m["id"] for m in s.client.get("/v1/models").json()["data"]] == [MODEL]

    before = _metrics(s)
    assert s.client.post("/v1/completions", json=_completion(PROMPT, 6)).status_code == 200
    assert s.client.post("/v1/completions", json=_completion(PROMPT, n=2)).status_code == 400
    m = _metrics(s)
    stats = s.engine.stats()
    assert m["xlstm_engine_queue_length"] == 0 and m["xlstm_engine_slots_in_use"] == 0
    assert m["xlstm_engine_running"] == 0
    assert m["xlstm_engine_num_slots"] == NUM_SLOTS
    assert m["xlstm_engine_tokens_generated_total"] == stats["tokens_generated_total"]
    assert m["xlstm_engine_tokens_generated_total"] >= before["xlstm_engine_tokens_generated_total"] + 6
    assert m["xlstm_engine_requests_finished_total"] == stats["requests_finished_total"]
    assert m["xlstm_tokens_per_second"] >= 6 / 10  # at least the 6 tokens just sent, over the 10 s window
    for name in ("xlstm_engine_time_to_first_token_seconds", "xlstm_engine_inter_token_latency_seconds"):
        assert m[f"{name}_count"] == stats[name.removeprefix("xlstm_engine_")]["count"] > 0
        assert m[f"{name}_bucket{{le=+Inf}}"] == m[f"{name}_count"]
    assert m["xlstm_request_latency_seconds_count"] >= before.get("xlstm_request_latency_seconds_count", 0) + 1
    ok, bad = "endpoint=/v1/completions,status=200", "endpoint=/v1/completions,status=400"
    assert m[f"xlstm_http_requests_total{{{ok}}}"] >= before.get(f"xlstm_http_requests_total{{{ok}}}", 0) + 1
    assert m[f"xlstm_http_requests_total{{{bad}}}"] == before.get(f"xlstm_http_requests_total{{{bad}}}", 0) + 1


def test_create_app_checks_its_arguments(served):
    s = served
    with pytest.raises(TypeError, match="engine"):
        create_app(object(), s.tokenizer, model_name=MODEL)
    with pytest.raises(TypeError, match="tokenizer"):
        create_app(s.engine, object(), model_name=MODEL)
    with pytest.raises(ValueError, match="model_name"):
        create_app(s.engine, s.tokenizer, model_name="")
    with pytest.raises(ValueError, match="chat_template"):
        create_app(s.engine, s.tokenizer, model_name=MODEL, chat_template="{role}")
    without_bos = load_tokenizer(FIXTURE)
    with pytest.raises(ValueError, match="add_bos"):
        create_app(s.engine, without_bos, model_name=MODEL, add_bos=True)


def test_text_comes_out_in_pieces_that_join_to_the_whole_decode():
    """Byte-level ids of multi-byte characters (and invalid bytes), fed one at a time: the pieces join to the
    decode of all ids; a stop string, wherever the pieces split it, cuts the text before its first match."""
    from xlstm_jax.serving.api import _Text
    from xlstm_jax.training.data import ByteTokenizer

    tokenizer = ByteTokenizer()
    rng = np.random.default_rng(0)
    alphabet = list("ab é€ö") + ["\U0001f600"]
    for _ in range(50):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(1, 20))))
        ids = tokenizer.encode(text).tolist()
        if rng.random() < 0.3:  # a stray continuation byte and a special id
            ids.insert(int(rng.integers(0, len(ids) + 1)), 0x80)
            ids.insert(int(rng.integers(0, len(ids) + 1)), tokenizer.eos_id)
        whole = tokenizer.decode(ids)
        out = _Text(tokenizer, [])
        pieces = [out.push(i) for i in ids] + [out.flush()]
        assert "".join(pieces) == whole
        stop = whole[len(whole) // 3 : len(whole) // 3 + 2]
        out = _Text(tokenizer, ["never", stop])
        joined = "".join(out.push(i) for i in ids) + out.flush()
        assert joined == whole[: whole.index(stop)] and out.finished


def test_add_bos_starts_text_prompts_with_bos(served):
    """With add_bos, a text prompt runs as [bos_id] + its ids, and a prompt of token ids as it is."""
    s = served
    app = create_app(s.engine, s.tokenizer, model_name=MODEL, add_bos=True)
    ids = [int(t) for t in s.tokenizer.encode(PROMPT)]

    async def main() -> list[dict]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=60) as client:
            bodies = (_completion(PROMPT, 4), _completion([s.tokenizer.bos_id, *ids], 4), _completion(ids, 4))
            return [(await client.post("/v1/completions", json=body)).json() for body in bodies]

    text, with_bos, without = asyncio.run(main())
    assert text["usage"]["prompt_tokens"] == len(ids) + 1
    assert (
        text["choices"][0]["text"]
        == with_bos["choices"][0]["text"]
        == _decode(_greedy_ids((s.tokenizer.bos_id, *ids), 4))
    )
    assert without["choices"][0]["text"] == _decode(_greedy_ids(tuple(ids), 4))
