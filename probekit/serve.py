"""``probekit serve``: a trained probe behind an HTTP API (FastAPI and uvicorn).

``POST /v1/classify`` takes ``{"text": "..."}`` or ``{"texts": [...]}`` and answers with the
probe's `predict` dict per text; ``GET /healthz`` says the server is up; ``GET /metrics`` is
Prometheus' text exposition of the server's own registry. Requests that arrive within
``max_wait_ms`` of each other share one forward pass of at most ``max_batch`` texts, run by one
worker thread (`Batcher`): torch and ONNX Runtime calls block, so they stay off the event loop and
never run at the same time. At most ``queue_size`` texts wait for a forward pass; past that a
request is answered 503 with ``Retry-After`` instead of growing memory.

Every error is a JSON body ``{"error": CODE, "detail": ...}``: 401 (no or a wrong bearer token),
413 (a body over ``max_body_bytes``), 422 (malformed JSON, wrong types, an empty or too long text,
too many texts), 500 (``predict`` failed on this request), 503 (the queue is full, or the server
is stopping).

FastAPI, uvicorn and prometheus_client are the ``serve`` extra: they are imported here only, and
only when an app is built or served, so ``import probekit`` and the command line never load them.
Without them `create_app` and `serve` raise a one-line `UserError` naming the extra.
"""

import asyncio
import hmac
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probekit.errors import UserError

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger("probekit.serve")

EXTRA_MISSING = "probekit serve needs the serve extra: pip install 'probekit-lm[serve]'"
DEFAULT_MAX_TEXT_CHARS = 20_000
"""The longest text served when the probe's run sets no lower ``data.max_text_chars``."""
DEFAULT_MAX_BODY_BYTES = 1 << 20
RETRY_AFTER_S = 1
"""The ``Retry-After`` of a 503: the queue drains within a forward pass or two."""
ENDPOINTS = ("/v1/classify", "/healthz", "/metrics", "/docs", "/openapi.json")
"""The endpoints metrics are labelled with; any other path counts as ``other``."""
PROTECTED = ("/v1/classify", "/metrics")
"""The endpoints a bearer token (``token=...``) guards; ``/healthz`` stays open."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def require_extra() -> None:
    """Raise the one-line `UserError` naming the ``serve`` extra when one of its packages is missing."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError(EXTRA_MISSING) from None


# -- metrics -------------------------------------------------------------------------------------
@dataclass
class Metrics:
    """The server's Prometheus metrics, in a registry of their own (not the global one)."""

    registry: Any
    requests: Any
    latency: Any
    errors: Any
    batch_texts: Any
    batch_requests: Any
    inference: Any
    queue_depth: Any

    @classmethod
    def create(cls) -> "Metrics":
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        registry = CollectorRegistry(auto_describe=True)
        sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
        return cls(
            registry=registry,
            requests=Counter(
                "probekit_serve_requests",
                "HTTP requests answered, by endpoint and status code.",
                ["endpoint", "status"],
                registry=registry,
            ),
            latency=Histogram(
                "probekit_serve_request_duration_seconds",
                "Time from a request's arrival to its response, by endpoint.",
                ["endpoint"],
                registry=registry,
            ),
            errors=Counter(
                "probekit_serve_errors",
                "Requests answered with an error, by endpoint and error code.",
                ["endpoint", "error"],
                registry=registry,
            ),
            batch_texts=Histogram(
                "probekit_serve_batch_texts", "Texts per forward pass.", buckets=sizes, registry=registry
            ),
            batch_requests=Histogram(
                "probekit_serve_batch_requests",
                "Requests sharing one forward pass (above 1: micro-batching at work).",
                buckets=sizes,
                registry=registry,
            ),
            inference=Histogram(
                "probekit_serve_inference_seconds", "Time of one forward pass (predict).", registry=registry
            ),
            queue_depth=Gauge(
                "probekit_serve_queue_texts",
                "Texts accepted and waiting for a forward pass.",
                registry=registry,
            ),
        )


# -- the micro-batcher ---------------------------------------------------------------------------
class QueueFullError(Exception):
    """More texts wait than the queue holds: answer 503."""


class ClosedError(Exception):
    """The batcher is draining for shutdown: answer 503."""


@dataclass
class _Job:
    texts: list[str]
    loop: asyncio.AbstractEventLoop
    future: "asyncio.Future[list[dict[str, Any]]]"


@dataclass
class Batcher:
    """Dynamic micro-batching in one worker thread.

    `submit` queues a request's texts and returns a future of exactly its rows. The worker takes
    the oldest request, then waits up to ``max_wait_s`` for more, up to ``max_batch`` texts (whole
    requests; one larger request runs alone), and runs ``predict`` on all of them in one call. A
    batch that fails is retried request by request, so one bad request fails alone. `close` lets
    the worker finish every accepted request, then stop.
    """

    predict: Callable[[list[str]], list[dict[str, Any]]]
    max_batch: int = 64
    max_wait_s: float = 0.005
    queue_size: int = 256
    metrics: Metrics | None = None
    setup: Callable[[], None] | None = None
    """Called once in the worker thread before its first forward pass (thread settings)."""
    _queue: "queue.SimpleQueue[_Job | None]" = field(default_factory=queue.SimpleQueue, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _pending: int = field(default=0, init=False)
    _closed: bool = field(default=False, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    @property
    def pending(self) -> int:
        """Texts accepted and not yet in a forward pass."""
        return self._pending

    def start(self) -> None:
        with self._lock:
            self._start()

    def _start(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._work, name="probekit-serve-batcher", daemon=True)
            self._thread.start()

    def submit(self, texts: list[str]) -> "asyncio.Future[list[dict[str, Any]]]":
        """Queue ``texts`` (on the running event loop); raises `QueueFullError` or `ClosedError`.
        A request is refused when the texts already waiting plus its own exceed ``queue_size``;
        an empty queue takes any request (one larger than the queue would never fit)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[dict[str, Any]]] = loop.create_future()
        with self._lock:
            if self._closed:
                raise ClosedError
            if self._pending and self._pending + len(texts) > self.queue_size:
                raise QueueFullError
            self._start()
            self._pending += len(texts)
            self._gauge()
            self._queue.put(_Job(texts, loop, future))
        return future

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, let the worker serve every accepted one, and wait for it (blocks)."""
        with self._lock:
            if self._closed:
                thread = self._thread
            else:
                self._closed = True
                thread = self._thread
                self._queue.put(None)
        if thread is not None:
            thread.join(timeout)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._pending)

    def _work(self) -> None:
        if self.setup is not None:
            try:
                self.setup()
            except Exception:
                logger.exception("the worker's setup failed; serving with the defaults")
        carried: _Job | None = None
        while True:
            job = carried if carried is not None else self._queue.get()
            carried = None
            if job is None:
                return
            batch, size, stop = [job], len(job.texts), False
            deadline = time.monotonic() + self.max_wait_s
            while size < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    following = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if following is None:
                    stop = True
                    break
                if size + len(following.texts) > self.max_batch:
                    carried = following
                    break
                batch.append(following)
                size += len(following.texts)
            try:
                self._run(batch)
            except Exception as exc:  # a bug here must not leave requests waiting forever
                logger.exception("the batch worker failed on %d requests", len(batch))
                for waiting in batch:
                    _settle(waiting, None, exc)
            if stop:
                return

    def _run(self, batch: list[_Job]) -> None:
        texts = [text for job in batch for text in job.texts]
        with self._lock:
            self._pending -= len(texts)
            self._gauge()
        if self.metrics is not None:
            self.metrics.batch_texts.observe(len(texts))
            self.metrics.batch_requests.observe(len(batch))
        started = time.perf_counter()
        try:
            rows = self.predict(texts)
            if len(rows) != len(texts):
                raise RuntimeError(f"predict gave {len(rows)} rows for {len(texts)} texts")
        except Exception as exc:
            if len(batch) > 1:
                for job in batch:  # one bad request must not fail the others
                    self._retry(job)
                return
            _settle(batch[0], None, exc)
            return
        finally:
            if self.metrics is not None:
                self.metrics.inference.observe(time.perf_counter() - started)
        start = 0
        for job in batch:
            _settle(job, rows[start : start + len(job.texts)], None)
            start += len(job.texts)

    def _retry(self, job: _Job) -> None:
        try:
            rows = self.predict(job.texts)
        except Exception as exc:
            _settle(job, None, exc)
        else:
            _settle(job, rows, None)


def _settle(job: _Job, rows: list[dict[str, Any]] | None, error: BaseException | None) -> None:
    """Hand a job its rows (or error) on its own event loop; a request gone by then is skipped."""

    def done() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(rows or [])

    with suppress(RuntimeError):  # a closed loop: nobody waits for the answer
        job.loop.call_soon_threadsafe(done)


# -- the app -------------------------------------------------------------------------------------
class ServeError(Exception):
    """An error answered as ``{"error": code, "detail": detail}`` with ``status``."""

    def __init__(self, status: int, code: str, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


def _error_response(status: int, code: str, detail: Any, headers: Mapping[str, str] | None = None) -> Any:
    from fastapi.encoders import jsonable_encoder
    from fastapi.responses import JSONResponse

    return JSONResponse(
        {"error": code, "detail": jsonable_encoder(detail)}, status_code=status, headers=headers
    )


def _endpoint(path: str) -> str:
    return path if path in ENDPOINTS else "other"


class Gate:
    """The outer ASGI layer: counts and times every request, checks the bearer token on the
    protected endpoints before a byte of the body is read, and refuses a body over the bound
    (by its ``Content-Length``, or once a chunked body passes it) with 413; the body read is then
    replayed to the app."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, token: str | None, max_body_bytes: int) -> None:
        self.app, self.metrics, self.token, self.max_body_bytes = app, metrics, token, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = _endpoint(scope["path"])
        started = time.perf_counter()
        status = [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            refusal, receive = await self._admit(scope, receive)
            if refusal is not None:
                self.metrics.errors.labels(endpoint, refusal.code).inc()
                response = _error_response(refusal.status, refusal.code, refusal.detail, refusal.headers)
                await response(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        except Exception:
            self.metrics.errors.labels(endpoint, "internal").inc()
            raise
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    async def _admit(self, scope: Scope, receive: Receive) -> tuple[ServeError | None, Receive]:
        """A refusal (401, 413) or None, and the ``receive`` that replays the body read."""
        headers = {key.decode("latin-1").lower(): value for key, value in scope.get("headers", [])}
        if self.token is not None and scope["path"] in PROTECTED and not self._authorised(headers):
            detail = "a valid 'Authorization: Bearer <token>' header is required"
            return ServeError(401, "unauthorized", detail, {"WWW-Authenticate": "Bearer"}), receive
        length = headers.get("content-length", b"").decode("latin-1").strip()
        if length.isdigit() and int(length) > self.max_body_bytes:
            return self._too_large(), receive
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return None, receive
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                return None, receive
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return self._too_large(), receive
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replaying() -> Message:
            return replay.pop() if replay else await receive()

        return None, replaying

    def _authorised(self, headers: dict[str, bytes]) -> bool:
        scheme, _, given = headers.get("authorization", b"").decode("latin-1").partition(" ")
        expected = (self.token or "").encode("utf-8")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), expected)

    def _too_large(self) -> ServeError:
        return ServeError(413, "body_too_large", f"the request body exceeds {self.max_body_bytes} bytes")


def _request_model(max_texts: int, max_text_chars: int) -> Any:
    """The pydantic model of a classify request, bounded by this server's limits."""
    from typing import Annotated

    from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

    bounded = Annotated[StrictStr, Field(min_length=1, max_length=max_text_chars)]

    class ClassifyRequest(BaseModel):
        """One text (``text``) or a list of them (``texts``): give exactly one."""

        model_config = ConfigDict(
            extra="forbid",
            json_schema_extra={"examples": [{"text": "the cat sat on the mat"}, {"texts": ["one", "two"]}]},
        )

        text: bounded | None = None
        texts: list[bounded] | None = Field(default=None, min_length=1, max_length=max_texts)

        @model_validator(mode="after")
        def _one_of(self) -> "ClassifyRequest":
            if (self.text is None) == (self.texts is None):
                raise ValueError("give exactly one of 'text' (a string) or 'texts' (a list of strings)")
            return self

    return ClassifyRequest


def _install_errors(app: "FastAPI", metrics: Metrics) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.requests import Request
    from starlette.exceptions import HTTPException

    async def validation(request: Request, exc: Exception) -> Any:
        assert isinstance(exc, RequestValidationError)
        details = [
            {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type", "")}
            for error in exc.errors()
        ]
        code = "invalid_json" if any(d["type"] == "json_invalid" for d in details) else "invalid_request"
        metrics.errors.labels(_endpoint(request.url.path), code).inc()
        return _error_response(422, code, details)

    async def serve_error(request: Request, exc: Exception) -> Any:
        assert isinstance(exc, ServeError)
        metrics.errors.labels(_endpoint(request.url.path), exc.code).inc()
        return _error_response(exc.status, exc.code, exc.detail, exc.headers)

    async def http_error(request: Request, exc: Exception) -> Any:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        metrics.errors.labels(_endpoint(request.url.path), code).inc()
        return _error_response(exc.status_code, code, exc.detail, exc.headers)

    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(ServeError, serve_error)
    app.add_exception_handler(HTTPException, http_error)


def default_max_text_chars(probe: Any) -> int:
    """The run's ``data.max_text_chars`` (a run's config, or an export's manifest), at most
    `DEFAULT_MAX_TEXT_CHARS`."""
    value: Any = None
    config = getattr(probe, "probe_config", None)
    if config is not None:
        value = getattr(getattr(config, "data", None), "max_text_chars", None)
    manifest = getattr(probe, "manifest", None)
    if value is None and manifest is not None:
        value = manifest.data.get("max_text_chars")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return min(value, DEFAULT_MAX_TEXT_CHARS)
    return DEFAULT_MAX_TEXT_CHARS


def create_app(
    probe: Any,
    *,
    max_batch: int = 64,
    max_wait_ms: float = 5.0,
    queue_size: int = 256,
    max_texts: int = 256,
    max_text_chars: int | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    token: str | None = None,
    model_name: str | None = None,
    threads: int | None = None,
) -> "FastAPI":
    """The FastAPI app serving ``probe`` (a `probekit.Probe` or `probekit.exported.ExportedProbe`:
    anything with ``predict(texts, batch_size)``). Its worker thread starts with the app's lifespan
    (or on the first request) and drains on shutdown. ``app.state.batcher`` and
    ``app.state.metrics`` hold the `Batcher` and `Metrics`. ``threads``: torch's intra-op threads in
    the worker (an export's ONNX Runtime threads are set when it loads: see `load`).

    Raises:
        UserError: a setting out of range, or the ``serve`` extra is not installed.
    """
    require_extra()
    from fastapi import FastAPI

    check_settings(max_batch, max_wait_ms, queue_size, max_texts, max_text_chars, max_body_bytes)
    chars = max_text_chars if max_text_chars is not None else default_max_text_chars(probe)
    metrics = Metrics.create()
    batcher = Batcher(
        lambda texts: probe.predict(texts, batch_size=max_batch),
        max_batch=max_batch,
        max_wait_s=max_wait_ms / 1000,
        queue_size=queue_size,
        metrics=metrics,
        setup=(lambda: torch_threads(threads)) if threads is not None else None,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.close)  # every accepted request is answered first

    from probekit._version import __version__

    app = FastAPI(
        title="probekit serve",
        version=__version__,
        description="A trained probe behind HTTP: classify texts with its predict.",
        lifespan=lifespan,
    )
    app.state.batcher, app.state.metrics = batcher, metrics
    _install_errors(app, metrics)
    _routes(app, batcher, metrics, _request_model(max_texts, chars), chars, token, model_name or _name(probe))
    app.add_middleware(Gate, metrics=metrics, token=token, max_body_bytes=max_body_bytes)
    return app


def _name(probe: Any) -> str:
    folder = getattr(probe, "folder", None) or getattr(probe, "run_dir", None)
    return Path(folder).name if folder else type(probe).__name__


def _routes(
    app: "FastAPI",
    batcher: Batcher,
    metrics: Metrics,
    request_model: Any,
    max_text_chars: int,
    token: str | None,
    model_name: str,
) -> None:
    from fastapi import Depends
    from fastapi.responses import PlainTextResponse
    from fastapi.security import HTTPBearer
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from pydantic import BaseModel

    from probekit.data import TextTypeError, TextValueError, check_texts

    # the Gate checks the token; this dependency only shows it in the OpenAPI schema
    guarded = [Depends(HTTPBearer(auto_error=False))] if token is not None else []
    refusals: dict[int | str, dict[str, Any]] = {
        413: {"description": "The body is too large."},
        422: {"description": "Malformed JSON, a wrong type, an empty or too long text, too many texts."},
        503: {"description": "The queue is full (see Retry-After) or the server is stopping."},
    }
    if token is not None:
        refusals[401] = {"description": "No or a wrong bearer token."}

    class ClassifyResponse(BaseModel):
        model: str
        results: list[dict[str, Any]]

    async def classify(body: request_model) -> ClassifyResponse:
        texts = [body.text] if body.text is not None else list(body.texts)
        try:
            check_texts(texts, max_text_chars)
        except (TextValueError, TextTypeError) as exc:
            raise ServeError(422, "invalid_text", str(exc)) from None
        try:
            future = batcher.submit(texts)
        except QueueFullError:
            detail = f"more than {batcher.queue_size} texts are waiting; retry later"
            raise ServeError(503, "queue_full", detail, {"Retry-After": str(RETRY_AFTER_S)}) from None
        except ClosedError:
            detail = "the server is shutting down"
            raise ServeError(503, "shutting_down", detail, {"Retry-After": str(RETRY_AFTER_S)}) from None
        try:
            rows = await future
        except Exception as exc:
            logger.exception("predict failed on a request of %d texts", len(texts))
            raise ServeError(500, "predict_failed", f"predict failed: {type(exc).__name__}") from None
        return ClassifyResponse(model=model_name, results=rows)

    app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        dependencies=guarded,
        responses=refusals,
        summary="Classify one text or a list of texts",
    )(classify)

    @app.get("/healthz", summary="Liveness: the server answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=guarded, summary="Prometheus metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def check_settings(
    max_batch: int,
    max_wait_ms: float,
    queue_size: int,
    max_texts: int,
    max_text_chars: int | None,
    max_body_bytes: int,
) -> None:
    """Raise a one-line `UserError` for a serving setting out of range."""
    bounds: Sequence[tuple[str, float | None, float]] = (
        ("--max-batch", max_batch, 1),
        ("--max-wait-ms", max_wait_ms, 0),
        ("--queue", queue_size, 1),
        ("--max-texts", max_texts, 1),
        ("--max-text-chars", max_text_chars, 1),
        ("--max-body-bytes", max_body_bytes, 1),
    )
    for option, value, least in bounds:
        if value is not None and not value >= least:
            raise UserError(f"{option} {value}: must be at least {least}")
    if max_wait_ms > 60_000:
        raise UserError(f"--max-wait-ms {max_wait_ms}: at most 60000 (a minute)")


def read_token(path: str | Path) -> str:
    """The bearer token in ``path`` (read once, surrounding whitespace stripped).

    Raises:
        UserError: a missing, unreadable or empty file.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--token-file {file}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--token-file {file}: not readable ({' '.join(str(exc).split())[:200]})") from None
    token = text.strip()
    if not token:
        raise UserError(f"--token-file {file}: empty; write the token in it")
    if any(char.isspace() or not char.isprintable() for char in token):
        raise UserError(f"--token-file {file}: the token holds whitespace or control characters")
    return token


def serving_threads() -> int:
    """The default compute threads of a server: every core but one (the event loop's), at least 1.
    On a busy machine, intra-op threads that compete with the event loop for every core make each
    forward pass many times slower."""
    return max(1, (os.cpu_count() or 1) - 1)


def torch_threads(threads: int) -> None:
    """torch's intra-op threads, when torch is loaded (an export never loads it)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def load(path: str | Path, *, trust_remote_code: bool = False, threads: int | None = None) -> Any:
    """A run folder as a `probekit.Probe` (in eval mode), an export folder as an `ExportedProbe`
    (no torch). ``threads``: ONNX Runtime's intra-op threads (default ``PROBEKIT_ONNX_THREADS``,
    else its own choice) or torch's (default: unchanged)."""
    from probekit.exported import ExportedProbe, default_threads, is_export

    if is_export(path):
        return ExportedProbe(path, threads=threads or default_threads())
    from probekit.probe import Probe

    probe = Probe.from_pretrained(path, trust_remote_code=trust_remote_code)
    probe.eval()
    if threads is not None:
        torch_threads(threads)
    return probe


@contextmanager
def _stop_on_signals(server: Any) -> Iterator[None]:
    """uvicorn stops gracefully on SIGINT/SIGTERM, then raises the signal again for the handler it
    found: this handler only asks the server to stop (a signal that lands before uvicorn installs
    its own is not lost; the repeated one does nothing), so a server stopped by a signal exits 0."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(_signum: int, _frame: Any) -> None:
        server.should_exit = True

    signals = (signal.SIGINT, signal.SIGTERM)
    before = {signum: signal.signal(signum, stop) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def serve(
    path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    token_file: str | Path | None = None,
    trust_remote_code: bool = False,
    threads: int | None = None,
    log: Callable[[str], None] = print,
    **settings: Any,
) -> None:
    """Load the probe in ``path`` (a run or an export folder) and serve it with uvicorn until
    SIGINT or SIGTERM: then no new connection is accepted, the requests already accepted are
    answered, the worker drains, and it returns. ``threads``: the compute threads of a forward
    pass (default `serving_threads`). ``settings`` go to `create_app`.

    Raises:
        UserError: the extra is missing, a setting or the token file is bad, the folder does not
            load, or the address cannot be bound.
    """
    require_extra()
    import uvicorn

    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: expected 0 to 65535")
    check_settings(
        settings.get("max_batch", 64),
        settings.get("max_wait_ms", 5.0),
        settings.get("queue_size", 256),
        settings.get("max_texts", 256),
        settings.get("max_text_chars"),
        settings.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES),
    )
    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: must be at least 1")
    token = read_token(token_file) if token_file is not None else None
    threads = threads or serving_threads()
    probe = load(path, trust_remote_code=trust_remote_code, threads=threads)
    settings.setdefault("model_name", Path(path).resolve().name)
    app = create_app(probe, token=token, threads=threads, **settings)
    config = uvicorn.Config(app, host=host, port=port, access_log=False, lifespan="on", log_level="info")
    server = uvicorn.Server(config)
    where = f"[{host}]" if ":" in host else host
    log(f"probekit: serving {path} on http://{where}:{port} (docs: /docs, metrics: /metrics)")
    with _stop_on_signals(server):
        try:
            server.run()
        except SystemExit as exc:  # uvicorn exits 1 when it cannot bind
            if exc.code not in (0, None):
                raise UserError(f"cannot serve on {host}:{port} (see the lines above)") from None
