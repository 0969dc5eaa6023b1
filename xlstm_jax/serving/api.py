"""The HTTP API of the serving engine: OpenAI-compatible completions over FastAPI.

:func:`create_app` wraps a running :class:`~xlstm_jax.serving.engine.Engine` and a tokenizer in a FastAPI
application; any ASGI server runs it (``xlstm-jax serve`` runs it with uvicorn). The engine knows nothing of
HTTP: this layer turns requests into token ids and :class:`~xlstm_jax.serving.engine.SamplingParams`, reads the
engine's token events back, and turns them into text.

Endpoints:
    ``POST /v1/completions``: ``prompt`` (a string, or a list of token ids), ``max_tokens`` (default 16),
        ``temperature`` (default 1, 0 for greedy), ``top_p`` (default 1), ``top_k`` (an extension; default 0:
        all), ``seed``, ``stop`` (a string or a list of strings, matched on the text: the text ends before the
        first match, which is left out), ``stream``, ``stream_options.include_usage``, ``n`` and ``best_of`` (1
        only), and ``ignore_eos`` (an extension: do not stop at the tokenizer's end-of-sequence id); ``logprobs``
        and ``echo`` are refused (400), other OpenAI fields ignored. The body is read as JSON whatever its
        Content-Type. The response is OpenAI's ``text_completion`` object with ``usage``.
    ``POST /v1/chat/completions``: ``messages`` (``role`` one of system, user, assistant; ``content`` a string)
        rendered with the chat template into one prompt, the same sampling fields (``max_completion_tokens``
        is taken as ``max_tokens``); OpenAI's ``chat.completion`` object.
    ``GET /v1/models``: the one model served.
    ``GET /health``: ``{"status": "ok", "model", "queue_length", "slots_in_use", "running", "num_slots"}``
        (``running``: requests generating); status 503 with ``"status": "error"`` once the engine's loop has failed.
    ``GET /metrics``: Prometheus text: the engine's gauges (``xlstm_engine_queue_length``,
        ``xlstm_engine_slots_in_use``, ``xlstm_engine_running``, ``xlstm_engine_num_slots``, the prefix cache's
        entries and bytes), its counters (``xlstm_engine_tokens_generated_total``, ``..._requests_finished_total``,
        ``..._prefill_tokens_total``, ``..._decode_steps_total``, ``..._prefix_cache_hits_total`` and its misses
        and evictions), its latency histograms (``xlstm_engine_time_to_first_token_seconds``,
        ``xlstm_engine_inter_token_latency_seconds``), and the API's own: ``xlstm_tokens_per_second`` (tokens sent
        over the last 10 s), ``xlstm_http_requests_total`` by endpoint and status, and the histogram
        ``xlstm_request_latency_seconds`` (a completion request from arrival to its last token).

With ``"stream": true`` the response is server-sent events, one ``data: {json}`` chunk per piece of text
(OpenAI's ``text_completion`` / ``chat.completion.chunk`` shapes), ending with ``data: [DONE]``. A client that
disconnects, streaming or not, cancels its request, which frees its engine slot.

Errors are JSON in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with ``param`` naming
the field: 400 for a field of the wrong type or value (a sampling value out of range, ``n`` other than 1, a
prompt that is empty or longer than the engine's ``max_prompt_tokens``) and for a body that is not JSON
(``param`` ``"body"``); 404 for a ``model`` other than the one served; 429 when the engine's queue is full
(with ``Retry-After``). No request can stop the server: anything unexpected is a 500 with the same shape.

Chat template:
    ``chat_template`` is a Python format string with the fields ``{role}`` and ``{content}``, rendered once per
    message and joined; the part before ``{content}``, rendered with ``role="assistant"``, then opens the
    reply. The default, :data:`DEFAULT_CHAT_TEMPLATE` (``"<|{role}|>\\n{content}\\n"``), gives::

        <|system|>
        You are terse.
        <|user|>
        Hi!
        <|assistant|>

    Jinja templates (a ``tokenizer_config.json``'s ``chat_template``) are not rendered: the project does not
    depend on ``jinja2``.

Example:
    >>> engine = Engine(config, params, num_slots=4)
    >>> engine.start()
    >>> app = create_app(engine, load_tokenizer("xLSTM-7b"), model_name="xlstm-7b")
    >>> sys.setswitchinterval(SWITCH_INTERVAL_S)  # as `xlstm-jax serve` does: see the engine's "Threads"
    >>> uvicorn.run(app, port=8000)
    $ curl localhost:8000/v1/completions -d '{"model": "xlstm-7b", "prompt": "The mLSTM", "max_tokens": 8}'
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from xlstm_jax.serving.engine import LATENCY_BUCKETS, EngineOverloaded, SamplingParams

__all__ = ["DEFAULT_CHAT_TEMPLATE", "ChatCompletionRequest", "CompletionRequest", "create_app", "render_chat"]

DEFAULT_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"
# The window of the tokens-per-second gauge, in seconds.
RATE_WINDOW_S = 10.0
# How often a non-streaming request checks whether its client is still there, in seconds.
DISCONNECT_POLL_S = 0.1
# The sampling fields of a request, as SamplingParams names them in its errors.
_SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "seed", "max_tokens")


# ----------------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``: ``include_usage`` adds a last chunk with the usage and no choices."""

    include_usage: bool = False


class _SamplingFields(BaseModel):
    """The fields that completions and chat completions share. Their ranges are checked by SamplingParams."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False
    # Accepted so that their absence can be checked: the server computes no log-probabilities.
    logprobs: bool | int | None = None
    best_of: int | None = None


class CompletionRequest(_SamplingFields):
    """The body of ``POST /v1/completions``: ``prompt`` is a string or a list of token ids."""

    prompt: str | list[int]
    echo: bool = False


class ChatMessage(BaseModel):
    """One message of a chat."""

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_SamplingFields):
    """The body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class APIError(Exception):
    """A request the server answers with ``status`` and OpenAI's error object naming ``param``."""

    def __init__(
        self, status: int, message: str, *, param: str | None, kind: str = "invalid_request_error", code=None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


# ----------------------------------------------------------------------------------------------------------
# Chat template
# ----------------------------------------------------------------------------------------------------------


def _check_template(chat_template: Any) -> str:
    if not isinstance(chat_template, str):
        raise TypeError(f"chat_template must be a str or None, got {type(chat_template).__name__}")
    try:
        rendered = chat_template.format(role="\0r", content="\0c")
    except (IndexError, KeyError, ValueError) as e:
        raise ValueError(
            f"chat_template must be a format string with the fields {{role}} and {{content}} only, got "
            f"{chat_template!r} ({type(e).__name__}: {e})"
        ) from None
    if "\0r" not in rendered or "\0c" not in rendered:
        raise ValueError(f"chat_template must hold both {{role}} and {{content}}, got {chat_template!r}")
    return chat_template


def render_chat(messages: Sequence[ChatMessage], chat_template: str = DEFAULT_CHAT_TEMPLATE) -> str:
    """The prompt of a chat: each message rendered with ``chat_template``, then the assistant's opening.

    Args:
        messages: the chat so far (objects with ``role`` and ``content``).
        chat_template: a format string with the fields ``{role}`` and ``{content}``.

    Returns:
        The prompt text, ending with the part of the template before ``{content}`` for ``role="assistant"``.
    """
    chat_template = _check_template(chat_template)
    opening = chat_template.format(role="assistant", content="\0").split("\0")[0]
    return "".join(chat_template.format(role=m.role, content=m.content) for m in messages) + opening


# ----------------------------------------------------------------------------------------------------------
# From token events to text
# ----------------------------------------------------------------------------------------------------------


class _Text:
    """The text of the generated ids so far, and how much of it may be sent.

    The text grows by decoding a window of the last ids, not all of them, so each token costs the same however
    long the text is: the window runs from the ids before the last piece of text to the newest id, and the
    text is extended by what decoding the newest ids adds to it. Text is held back while the window ends in an
    incomplete UTF-8 character or adds nothing yet, and while the text's end could be the start of a stop
    string. ``finished`` is set once a stop string appears; the text then ends before it. Ids outside the
    tokenizer's ``vocab_size`` (a model's vocabulary padded past its tokenizer's) add no text.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = getattr(tokenizer, "vocab_size", None)
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.start = 0  # the window: ids[start:] decode to ...
        self.read = 0  # ... the text of ids[start:read] (already in self.text) and what the newer ids add
        self.text = ""  # the decoded text that is stable
        self.sent = 0  # characters of self.text handed out
        self.finished = False

    def _extend(self, *, final: bool) -> None:
        """Adds to ``self.text`` what the ids after ``read`` add to the window's text."""
        if self.read == len(self.ids):
            return
        before = self.tokenizer.decode(self.ids[self.start : self.read]) if self.read > self.start else ""
        after = self.tokenizer.decode(self.ids[self.start :])
        if final or (len(after) > len(before) and not after.endswith("\ufffd")):
            self.text += after[len(before) :]
            self.start, self.read = self.read, len(self.ids)

    def push(self, token: int) -> str:
        """Adds a token id; returns the text that may now be sent."""
        if self.vocab_size is not None and not 0 <= token < self.vocab_size:
            return ""
        self.ids.append(token)
        self._extend(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """The text not sent yet, at the end of the generation."""
        if not self.finished:
            self._extend(final=True)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        if self.finished:
            return ""
        start = max(0, self.sent - max((len(s) for s in self.stops), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            self.finished = True
        elif final:
            end = len(self.text)
        else:
            held = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end = len(self.text) - held
        piece = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return piece


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------


class _EngineCollector:
    """Prometheus metrics read from ``engine.stats()`` at each scrape, and the recent tokens per second."""

    _GAUGES = {
        "queue_length": "requests waiting for a slot",
        "slots_in_use": "slots held by a request (prefilling or generating)",
        "running": "requests generating (their slots decode)",
        "num_slots": "decode slots of the engine",
        "prefix_cache_entries": "prompt prefixes whose states the prefix cache holds",
        "prefix_cache_bytes": "bytes held by the prefix cache",
        "prefix_cache_max_bytes": "the byte budget of the prefix cache",
    }
    _COUNTERS = {
        "tokens_generated_total": "tokens generated",
        "requests_finished_total": "requests finished",
        "prefill_tokens_total": "prompt tokens run through the model (prefix-cache hits excluded)",
        "decode_steps_total": "decode steps over all slots",
        "prefix_cache_hits_total": "prompts that started from cached states",
        "prefix_cache_misses_total": "prompts that found no cached prefix",
        "prefix_cache_evictions_total": "prefix-cache entries evicted",
    }
    _HISTOGRAMS = {
        "time_to_first_token_seconds": "from a request's submission to its first token",
        "inter_token_latency_seconds": "between a request's consecutive tokens",
    }

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self.tokens: collections.deque[float] = collections.deque()

    def record_token(self) -> None:
        with self.lock:
            self.tokens.append(time.monotonic())

    def tokens_per_second(self) -> float:
        cutoff = time.monotonic() - RATE_WINDOW_S
        with self.lock:
            while self.tokens and self.tokens[0] < cutoff:
                self.tokens.popleft()
            return len(self.tokens) / RATE_WINDOW_S

    def describe(self) -> list:
        """Nothing to describe ahead of a scrape (so that registering does not read the engine)."""
        return []

    def collect(self):
        stats = self.engine.stats()
        for key, doc in self._GAUGES.items():
            if key in stats:
                yield GaugeMetricFamily(f"xlstm_engine_{key}", doc, value=float(stats[key]))
        for key, doc in self._COUNTERS.items():
            if key in stats:
                yield CounterMetricFamily(f"xlstm_engine_{key.removesuffix('_total')}", doc, value=float(stats[key]))
        for key, doc in self._HISTOGRAMS.items():
            if key in stats:  # the engine counts per bucket; Prometheus wants cumulative counts
                h = stats[key]
                bounds = [*(f"{b:g}" for b in h["buckets"]), "+Inf"]
                cumulative = itertools.accumulate(float(c) for c in h["counts"])
                yield HistogramMetricFamily(
                    f"xlstm_engine_{key}", doc, buckets=list(zip(bounds, cumulative, strict=True)), sum_value=h["sum"]
                )
        yield GaugeMetricFamily(
            "xlstm_tokens_per_second", f"tokens sent to clients per second over the last {RATE_WINDOW_S:g} s",
            value=self.tokens_per_second(),
        )  # fmt: skip


class _Metrics:
    """The app's Prometheus registry."""

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.engine = _EngineCollector(engine)
        self.registry.register(self.engine)
        self.requests = Counter(
            "xlstm_http_requests", "HTTP requests answered", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "xlstm_request_latency_seconds", "from a completion request's arrival to its last token",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------


class _CountRequests:
    """ASGI middleware: counts the HTTP requests by endpoint and status (any other path counted as "other")."""

    PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"})

    def __init__(self, app: Any, counter: Counter) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [0]

        async def send_and_note(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = scope["path"] if scope["path"] in self.PATHS else "other"
            self.counter.labels(path, str(status[0])).inc()


def _invalid(errors: Sequence[Any]) -> APIError:
    """The 400 of pydantic's (or FastAPI's) first validation error, naming the field."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg', '')}", param="body")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    where = ".".join(loc) or "body"
    return APIError(400, f"{where}: {first.get('msg', 'invalid value')}", param=loc[0] if loc else "body")


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    """The request's body as ``model``: JSON whatever the Content-Type says (``curl -d`` sends a form's)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", param="body") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}", param="body")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _invalid(e.errors()) from None


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI description of a JSON body of ``model`` (the endpoints parse the body themselves)."""
    schema = {"application/json": {"schema": model.model_json_schema()}}
    return {"requestBody": {"content": schema, "required": True}}


def _error_param(message: str, default: str) -> str:
    """The request field that a SamplingParams error names (its first word), else ``default``."""
    words = message.replace("=", " ").replace(":", " ").split()
    for name in _SAMPLING_FIELDS:
        if words and words[0] == name:
            return name
    named = [name for name in _SAMPLING_FIELDS if name in message]
    return named[0] if named else default


class _Generation:
    """One submitted request: its engine stream, its text and its timings."""

    def __init__(self, stream: Any, text: _Text, metrics: _Metrics, arrival: float, prompt_tokens: int) -> None:
        self.stream, self.text, self.metrics = stream, text, metrics
        self.arrival = arrival
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    async def pieces(self) -> AsyncIterator[str]:
        """The text as it comes (pieces may be empty); ``finish_reason`` is set at the end."""
        try:
            async for event in self.stream:
                if event.token_id is not None and self.finish_reason is None:
                    self.completion_tokens += 1
                    self.metrics.engine.record_token()
                    piece = self.text.push(int(event.token_id))
                    if self.text.finished:  # a stop string: the engine need not go on
                        self.finish_reason = "stop"
                        self.stream.cancel()
                        yield piece
                        break
                    yield piece
                if event.finish_reason is not None:
                    self.finish_reason = self.finish_reason or event.finish_reason
                    break
            yield self.text.flush()
            self.metrics.latency.observe(time.monotonic() - self.arrival)
        finally:
            if self.finish_reason is None:  # the client went away (the generator was cancelled or closed)
                self.stream.cancel()

    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}


@contextlib.asynccontextmanager
async def _cancel_on_disconnect(request: Request, stream: Any):
    """Cancels ``stream`` as soon as the client of ``request`` disconnects, while the body runs."""

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        stream.cancel()

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()


def create_app(
    engine: Any, tokenizer: Any, *, model_name: str, chat_template: str | None = None, add_bos: bool = False
) -> FastAPI:
    """An OpenAI-compatible FastAPI app over a started engine (see the module docstring for the endpoints).

    Args:
        engine: a started :class:`~xlstm_jax.serving.engine.Engine` (the app neither starts nor stops it).
        tokenizer: ``encode(text) -> ids`` and ``decode(ids) -> str``, e.g. :class:`~xlstm_jax.training.data.
            HFTokenizer` or ``ByteTokenizer``; its ``eos_id`` (when it has one that is not None) ends a
            generation unless the request sets ``ignore_eos``.
        model_name: the name requests must give as ``model``.
        chat_template: a format string with ``{role}`` and ``{content}`` (see the module docstring), or None
            for :data:`DEFAULT_CHAT_TEMPLATE`.
        add_bos: start the token ids of each text prompt (and chat) with ``tokenizer.bos_id``; prompts given as
            token ids are taken as they are.

    Returns:
        The FastAPI application.

    Raises:
        TypeError / ValueError: an engine without ``submit``/``stats``, a tokenizer without ``encode``/``decode``,
            an empty ``model_name``, a ``chat_template`` that is not such a format string, or ``add_bos`` without
            the tokenizer's ``bos_id``.
    """
    if not all(callable(getattr(engine, name, None)) for name in ("submit", "stats")):
        raise TypeError(f"engine must be an Engine (with submit and stats), got {type(engine).__name__}")
    if not (callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "decode", None))):
        raise TypeError(f"tokenizer must have encode and decode, got {type(tokenizer).__name__}")
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be a non-empty str, got {model_name!r}")
    template = DEFAULT_CHAT_TEMPLATE if chat_template is None else _check_template(chat_template)
    eos_id = getattr(tokenizer, "eos_id", None)
    if not isinstance(add_bos, bool):
        raise TypeError(f"add_bos must be a bool, got {add_bos!r}")
    if add_bos and getattr(tokenizer, "bos_id", None) is None:
        raise ValueError(f"add_bos=True needs a tokenizer with a bos_id, got {tokenizer!r}")
    bos = [int(tokenizer.bos_id)] if add_bos else []
    metrics = _Metrics(engine)
    created = int(time.time())
    app = FastAPI(title="xlstm-jax", summary=f"OpenAI-compatible completions of {model_name}")
    app.state.engine, app.state.metrics = engine, metrics

    app.add_middleware(_CountRequests, counter=metrics.requests)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return e.response(headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return _invalid(e.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail), param=None).response(getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, e: Exception) -> JSONResponse:
        message = f"internal error: {type(e).__name__}: {e}"
        return APIError(500, message, param=None, kind="server_error").response()

    def check_model(body: _SamplingFields) -> None:
        if body.model != model_name:
            raise APIError(
                404, f"model {body.model!r} does not exist; this server serves {model_name!r}", param="model",
                code="model_not_found",
            )  # fmt: skip
        if body.n != 1:
            raise APIError(400, f"n must be 1 (one choice per request), got {body.n}", param="n")
        if body.best_of not in (None, 1):
            raise APIError(
                400, f"best_of must be 1 or absent (one choice per request), got {body.best_of}", param="best_of"
            )
        if body.logprobs not in (None, False, 0):
            raise APIError(400, f"logprobs are not supported, got logprobs={body.logprobs}", param="logprobs")
        if getattr(body, "echo", False):
            raise APIError(400, "echo is not supported", param="echo")

    def sampling(body: _SamplingFields, max_tokens: int | None) -> SamplingParams:
        stop_ids = () if body.ignore_eos or eos_id is None else (int(eos_id),)
        fields = {"temperature": body.temperature, "top_k": body.top_k, "top_p": body.top_p, "seed": body.seed}
        if max_tokens is not None:
            fields["max_tokens"] = max_tokens
        try:
            return SamplingParams(**fields, stop_token_ids=stop_ids)
        except (TypeError, ValueError) as e:
            raise APIError(400, str(e), param=_error_param(str(e), "body")) from None

    def submit(prompt_ids: list[int], params: SamplingParams, body: _SamplingFields, param: str) -> _Generation:
        arrival = time.monotonic()
        try:
            stream = engine.submit(prompt_ids, params)
        except EngineOverloaded as e:
            raise APIError(429, f"the server is busy: {e}", param=None, kind="rate_limit_error") from None
        except (TypeError, ValueError) as e:
            raise APIError(400, str(e), param=param) from None
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
        return _Generation(stream, _Text(tokenizer, stops), metrics, arrival, len(prompt_ids))

    def encode(text: str, param: str) -> list[int]:
        ids = [int(t) for t in tokenizer.encode(text)]
        if not ids:
            raise APIError(400, f"{param} encodes to no tokens", param=param)
        return bos + ids

    def engine_error() -> str:
        error = getattr(engine, "error", None)
        return "unknown error" if error is None else f"{type(error).__name__}: {error}"

    def envelope(kind: str, request_id: str) -> dict[str, Any]:
        return {"id": request_id, "object": kind, "created": int(time.time()), "model": model_name}

    def sse(data: dict[str, Any] | str) -> str:
        return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"

    async def respond(request: Request, gen: _Generation, body: _SamplingFields, chat: bool) -> Response:
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if not body.stream:
            async with _cancel_on_disconnect(request, gen.stream):
                text = "".join([piece async for piece in gen.pieces()])
            if gen.finish_reason == "error":
                raise APIError(500, f"the engine failed: {engine_error()}", param=None, kind="server_error")
            if gen.finish_reason == "cancelled":  # not by this client, who is still there: the engine stopped
                raise APIError(503, "the engine stopped before the request finished", param=None, kind="server_error")
            choice: dict[str, Any] = {"index": 0, "finish_reason": gen.finish_reason}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice.update(text=text, logprobs=None)
            kind = "chat.completion" if chat else "text_completion"
            return JSONResponse({**envelope(kind, request_id), "choices": [choice], "usage": gen.usage()})

        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish_reason: str | None, role: bool = False) -> str:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
            if chat:
                choice["delta"] = ({"role": "assistant"} if role else {}) | ({} if text is None else {"content": text})
            else:
                choice.update(text=text or "", logprobs=None)
            return sse({**envelope(kind, request_id), "choices": [choice]})

        async def events() -> AsyncIterator[str]:
            if chat:
                yield chunk("", None, role=True)
            try:
                async for piece in gen.pieces():
                    if piece:
                        yield chunk(piece, None)
            except Exception as e:  # noqa: BLE001 - the status is sent already: report in the stream, end it
                yield sse({"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error", "param": None}})
                yield sse("[DONE]")
                return
            if gen.finish_reason == "error":
                yield sse({"error": {"message": f"the engine failed: {engine_error()}", "type": "server_error"}})
                yield sse("[DONE]")
                return
            yield chunk(None if chat else "", gen.finish_reason)
            if body.stream_options is not None and body.stream_options.include_usage:
                yield sse({**envelope(kind, request_id), "choices": [], "usage": gen.usage()})
            yield sse("[DONE]")

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request) -> Response:
        body = await _parse(request, CompletionRequest)
        check_model(body)
        params = sampling(body, body.max_tokens)
        if isinstance(body.prompt, str):
            prompt_ids = encode(body.prompt, "prompt")
        elif not body.prompt:
            raise APIError(400, "prompt is an empty list of token ids", param="prompt")
        else:
            prompt_ids = list(body.prompt)
        return await respond(request, submit(prompt_ids, params, body, "prompt"), body, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        body = await _parse(request, ChatCompletionRequest)
        check_model(body)
        params = sampling(body, body.max_completion_tokens if body.max_tokens is None else body.max_tokens)
        prompt_ids = encode(render_chat(body.messages, template), "messages")
        return await respond(request, submit(prompt_ids, params, body, "messages"), body, chat=True)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "xlstm-jax"}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> JSONResponse:
        stats = engine.stats()
        failed = getattr(engine, "error", None) is not None
        body = {"status": "error" if failed else "ok", "model": model_name}
        body |= {k: stats[k] for k in ("queue_length", "slots_in_use", "running", "num_slots") if k in stats}
        if failed:
            body["error"] = engine_error()
        return JSONResponse(body, status_code=503 if failed else 200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
