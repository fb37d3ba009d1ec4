"""`ptft serve`: the HTTP side (the model side is infer/serving.py), on FastAPI and uvicorn.

- Requests are checked and encoded in a thread (`Served.prepare`), then queued for the
  batcher: one task that takes every queued request whose cost still fits the batch budget
  (tokens, or images), optionally waits up to `max_wait` for more, and runs them as one model
  call in a single worker thread. The event loop keeps accepting requests meanwhile, so under
  load the next batch gathers what arrived during the last one.
- Guards, in one ASGI middleware before any request is parsed: the bearer token (every /v1/
  route but /v1/health), the body size (413), and the requests in flight (past the limit, 429
  at once rather than an unbounded queue).
- Every error is a JSON object {"error": "one line"}; nothing a client sends stops the server.
  uvicorn drains on SIGTERM: it stops accepting, answers what is in flight, then exits.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import signal
import socket
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict

from ptft_jax.config.schema import ConfigError
from ptft_jax.infer.serving import Prepared, RequestError, Served, load_served

GUARDED = ("/v1/predict", "/v1/embed")  # the routes that run the model
GRACE_S = 30  # how long a SIGTERM waits for the requests in flight


@dataclass
class Limits:
    max_wait_s: float = 0.0  # how long a batch waits for more requests after its first
    dynamic: bool = True  # gather concurrent requests into one model call
    max_concurrent: int = 64  # requests in flight before 429
    max_body_bytes: int = 1 << 20
    token: str | None = None  # bearer token, required on /v1/ routes but /v1/health


class Batcher:
    """Gathers queued requests into model calls, one call at a time."""

    def __init__(self, model: Served, limits: Limits):
        self.model, self.limits = model, limits
        self.pending: deque[tuple[Prepared, asyncio.Future]] = deque()
        self.arrived = asyncio.Event()
        # One thread runs the model: JAX releases the GIL while it computes, so the event
        # loop goes on accepting requests.
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="ptft-serve-model")
        self.task: asyncio.Task | None = None

    async def submit(self, prepared: Prepared) -> list:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((prepared, future))
        self.arrived.set()
        return await future

    def start(self) -> None:
        self.task = asyncio.create_task(self.loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.worker.shutdown(wait=True)

    async def wait_for_more(self) -> None:
        """Up to max_wait after a batch's first request, while its budget is not filled."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.max_wait_s
        while sum(p.cost for p, _ in self.pending) < self.model.budget:
            left = deadline - loop.time()
            if left <= 0:
                return
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except asyncio.TimeoutError:
                return

    def take(self) -> list[tuple[Prepared, asyncio.Future]]:
        """The first queued request, and (dynamic batching) those after it that fit the
        budget, in arrival order; a request over the budget on its own runs alone."""
        batch = [self.pending.popleft()]
        cost = batch[0][0].cost
        while self.limits.dynamic and self.pending and \
                cost + self.pending[0][0].cost <= self.model.budget:
            cost += self.pending[0][0].cost
            batch.append(self.pending.popleft())
        return [(p, f) for p, f in batch if not f.done()]  # a client that left is skipped

    async def loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self.arrived.clear()
                await self.arrived.wait()
            if self.limits.dynamic and self.limits.max_wait_s > 0:
                await self.wait_for_more()
            batch = self.take()
            if not batch:
                continue
            try:
                answers = await loop.run_in_executor(self.worker, self.model.run,
                                                     [p for p, _ in batch])
            except Exception as e:  # the model failed: every request of the batch hears why
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), answer in zip(batch, answers):
                if not future.done():
                    future.set_result(answer)


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers=headers)


class Guards:
    """Pure ASGI middleware: the bearer token, the body size and the requests in flight, all
    checked before the application parses anything."""

    def __init__(self, app, limits: Limits, state: dict):
        self.app, self.limits, self.state = app, limits, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        refusal = self.unauthorized(scope) if path.startswith("/v1/") and \
            path != "/v1/health" else None
        if refusal is None and path in GUARDED:
            if self.state["in_flight"] >= self.limits.max_concurrent:
                refusal = error(429, f"{self.state['in_flight']} requests are in flight, the "
                                     f"server's limit (--max-concurrent): retry shortly.",
                                {"Retry-After": "1"})
            else:
                body = await self.read_body(scope, receive)
                if body is None:
                    refusal = error(413, f"the request body is over the server's limit of "
                                         f"{self.limits.max_body_bytes} bytes "
                                         f"(--max-body-bytes): split the request.")
                else:
                    return await self.counted(scope, body, send)
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    def unauthorized(self, scope) -> JSONResponse | None:
        if self.limits.token is None:
            return None
        given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if hmac.compare_digest(given.encode(), f"Bearer {self.limits.token}".encode()):
            return None
        return error(401, "this server needs 'Authorization: Bearer <token>' (the token it was "
                          "started with).", {"WWW-Authenticate": "Bearer"})

    async def read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None past max_body_bytes (read no further)."""
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_body_bytes:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limits.max_body_bytes:
                return None
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def counted(self, scope, body: bytes, send):
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return {"type": "http.disconnect"}
        self.state["in_flight"] += 1
        try:
            return await self.app(scope, replay, send)
        finally:
            self.state["in_flight"] -= 1


class TextsRequest(BaseModel):
    """`texts` (and `text_pairs`, for a run trained on pairs), or base64 `images` (with
    `texts`, for an image-text run): what GET /v1/model lists under "inputs"."""
    model_config = ConfigDict(extra="forbid")
    texts: list[str] | None = None
    text_pairs: list[str] | None = None
    images: list[str] | None = None


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str]


def create_app(model: Served, limits: Limits) -> FastAPI:
    state = {"in_flight": 0, "started": time.time(), "answered": 0}
    batcher: dict[str, Batcher] = {}

    @asynccontextmanager
    async def lifespan(app):
        batcher["b"] = Batcher(model, limits)
        batcher["b"].start()
        yield
        await batcher["b"].stop()

    app = FastAPI(title="ptft serve", lifespan=lifespan,
                  description="Predictions and embeddings from a ptft run, batched.")

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return error(422, "the body is not valid JSON.")
        if tuple(first.get("loc", ())) == ("body",):
            return error(422, "the body is not a JSON object: send {\"texts\": [...]} (or "
                              "what GET /v1/model lists under inputs) with Content-Type: "
                              "application/json.")
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}"
                        for p in first.get("loc", ()) if p != "body").lstrip(".") or "body"
        if first.get("type") == "extra_forbidden":
            fields = ", ".join(TextsRequest.model_fields if request.url.path == "/v1/predict"
                               else EmbedRequest.model_fields)
            return error(422, f"{where!r} is not a field of this request (its fields: "
                              f"{fields}).")
        return error(422, f"{where}: {first.get('msg', 'invalid')}.")

    @app.exception_handler(StarletteHTTPException)
    async def not_here(request, exc: StarletteHTTPException):
        message = exc.detail if exc.status_code != 404 else (
            f"no route {request.method} {request.url.path}: the server answers POST "
            f"/v1/{model.endpoint}, GET /v1/model, GET /v1/health and GET /docs.")
        return error(exc.status_code, message)

    @app.exception_handler(RequestError)
    async def refused(request, exc: RequestError):
        return error(exc.status, str(exc))

    @app.exception_handler(Exception)
    async def failed(request, exc: Exception):
        return error(500, f"the model failed on this request: {exc}")

    async def answer(request: dict, endpoint: str) -> list:
        if model.endpoint != endpoint:
            other = "/v1/predict" if endpoint == "embed" else "/v1/embed"
            raise RequestError(404, f"this server serves {other} (the source is "
                                    f"{'a finetuned run' if endpoint == 'embed' else 'an encoder'}"
                                    f"), not /v1/{endpoint}.")
        prepared = await run_in_threadpool(model.prepare, request)
        answers = await batcher["b"].submit(prepared)
        state["answered"] += 1
        try:  # NaN is not JSON: a model that outputs it has diverged, and the client hears so
            json.dumps(answers, allow_nan=False)
        except ValueError:
            raise RequestError(500, "the model's output is not a finite number (NaN or "
                                    "infinity): its weights are non-finite, from a run that "
                                    "diverged.") from None
        return answers

    @app.post("/v1/predict", summary="labels and probabilities, as `ptft predict` writes them")
    async def predict(request: TextsRequest) -> dict:
        return {"predictions": await answer(request.model_dump(exclude_none=True), "predict")}

    @app.post("/v1/embed", summary="L2-normalised embeddings, as `ptft embed` writes them")
    async def embed(request: EmbedRequest) -> dict:
        return {"embeddings": await answer(request.model_dump(), "embed")}

    @app.get("/v1/health", summary="the server is up; requests in flight and queued")
    async def health() -> dict:
        queued = len(batcher["b"].pending) if "b" in batcher else 0
        return {"status": "ok", "in_flight": state["in_flight"], "queued": queued,
                "answered": state["answered"], "model_calls": model.calls,
                "uptime_s": round(time.time() - state["started"], 1)}

    @app.get("/v1/model", summary="what is served: task, labels, source run, checkpoint")
    async def describe() -> dict:
        return model.info()

    app.add_middleware(Guards, limits=limits, state=state)
    return app


def check_port(host: str, port: int) -> None:
    """Refuses a port that cannot be bound, before the model loads (minutes for a big one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"--host {host} --port {port} cannot be bound ({e.strerror}): "
                              f"give another --port (or stop what holds it).") from None


def serve(source: str, host: str, port: int, limits: Limits, max_texts: int,
          max_batch_tokens: int, max_batch_images: int, seq_len: int | None,
          access_log: bool) -> None:
    import uvicorn  # the ASGI server: only this command needs it

    check_port(host, port)
    if host not in ("127.0.0.1", "localhost", "::1") and limits.token is None:
        print(f"warning: serving on {host} without a token: anyone who reaches this machine "
              f"can query the model. Set PTFT_SERVE_TOKEN (or --token).", file=sys.stderr)
    model = load_served(source, max_texts, max_batch_tokens, max_batch_images, seq_len)
    start = time.perf_counter()
    model.warm_up()  # every batch shape compiled now: no request waits for a compile
    print(f"ptft serve: {model.info()['checkpoint']} on /v1/{model.endpoint}; compiled "
          f"{model.shapes()} in {time.perf_counter() - start:.1f} s", file=sys.stderr,
          flush=True)
    server = uvicorn.Server(uvicorn.Config(
        create_app(model, limits), host=host, port=port, access_log=access_log,
        timeout_graceful_shutdown=GRACE_S, log_level="info"))
    # uvicorn drains on SIGINT / SIGTERM and then raises the signal again for the handler it
    # found: while it serves, that handler only records the signal, so a drained server exits
    # cleanly (the command line's own handler would call it an interrupted command).
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        print(f"ptft serve: stopped by {signal.Signals(received[0]).name} after answering the "
              f"requests in flight.", file=sys.stderr, flush=True)


def command(args) -> int:
    """`ptft serve` (cli.py parses its arguments)."""
    if args.token is not None and not args.token.strip():
        raise ConfigError("--token (or PTFT_SERVE_TOKEN) is empty: give a token, or unset it.")
    limits = Limits(max_wait_s=args.max_wait_ms / 1000, dynamic=not args.no_batching,
                    max_concurrent=args.max_concurrent, max_body_bytes=args.max_body_bytes,
                    token=args.token)
    serve(args.source, args.host, args.port, limits, args.max_texts, args.max_batch_tokens,
          args.max_batch_images, args.seq_len, args.access_log)
    return 0
