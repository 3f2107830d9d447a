"""The HTTP app of `tome-serve` (Starlette): KServe v2 routes, the image endpoint and /metrics.

Routes (model version is always "1"; `/versions/1` may be inserted after the model name):
  GET  /v2                           server metadata        GET  /v2/health/live, /v2/health/ready
  GET  /v2/models/M                  model metadata (+ ToMe schedule)
  GET  /v2/models/M/ready            model readiness
  POST /v2/models/M/infer            KServe v2 infer, JSON or binary tensor data
  POST /v2/models/M/classify?top_k=K raw JPEG/PNG bytes -> top-K classes
  GET  /metrics                      Prometheus text format
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

from tome_deploy import __version__
from tome_deploy.artifact.input_spec import InputSpec
from tome_deploy.errors import InvalidInputError, MissingDependencyError, ToMeError
from tome_deploy.runtime.base import Runner
from tome_deploy.serving.batcher import (
    BatchPolicy,
    DynamicBatcher,
    InferenceFailedError,
    RequestTimeoutError,
    ServerBusyError,
)
from tome_deploy.serving.images import image_to_input, parse_top_k, top_k
from tome_deploy.serving.kserve import (
    DATATYPES,
    HEADER_LENGTH,
    NonFiniteOutputError,
    check_finite_output,
    encode_infer_response,
    parse_infer_request,
)
from tome_deploy.serving.metrics import ServingMetrics
from tome_deploy.serving.served_model import ServedModel, run_padded
from tome_deploy.serving.threads import named_executor

MODEL_VERSION = "1"
SERVE_EXTRA_HINT = "pip install 'tome-deploy[serve]'"


class UnknownModelError(InvalidInputError):
    """A model name or version this server does not serve (HTTP 404)."""


class BodyTooLargeError(InvalidInputError):
    """A request body over --max-body-mb (HTTP 413)."""


class UnsupportedEncodingError(InvalidInputError):
    """A compressed request body (HTTP 415)."""


class BodyTimeoutError(InvalidInputError):
    """A request body that did not arrive within --body-timeout-s (HTTP 408)."""


# Most specific first: the subclasses of InvalidInputError before it.
STATUS_OF_ERROR: tuple[tuple[type[ToMeError], int], ...] = (
    (UnknownModelError, 404),
    (BodyTooLargeError, 413),
    (UnsupportedEncodingError, 415),
    (BodyTimeoutError, 408),
    (InvalidInputError, 400),
    (ServerBusyError, 503),
    (RequestTimeoutError, 504),
    (InferenceFailedError, 500),
    (NonFiniteOutputError, 500),
)


@dataclass(frozen=True)
class ServeSettings:
    model_name: str
    policy: BatchPolicy = BatchPolicy()
    max_body_bytes: int = 64 << 20
    labels: Optional[tuple[str, ...]] = None  # class names for the image endpoint, by index
    default_top_k: int = 5
    body_timeout_s: float = 30.0  # the whole body must arrive within this (a slow upload gets 408)
    max_image_pixels: int = 16_000_000  # image endpoint: width x height, read from the header before decoding


def status_of(error: ToMeError) -> int:
    return next((status for kind, status in STATUS_OF_ERROR if isinstance(error, kind)), 500)


def require_serving_stack() -> None:
    """The HTTP stack is an optional extra; say how to get it instead of an ImportError deep inside."""
    import importlib

    for name in ("starlette", "uvicorn", "prometheus_client"):
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise MissingDependencyError(f"tome-serve needs {name} (not installed): {SERVE_EXTRA_HINT}") from err


def settings_for(served_model: ServedModel, settings: ServeSettings) -> ServeSettings:
    """Batches are capped at what the artifact takes: a fixed-batch export's batch (smaller ones are padded)
    or an engine's profile maximum."""
    limit = served_model.batch_limit
    if limit is None or settings.policy.max_batch <= limit:
        return settings
    return dataclasses.replace(settings, policy=dataclasses.replace(settings.policy, max_batch=limit))


def model_metadata(served_model: ServedModel, settings: ServeSettings) -> dict:
    """The KServe v2 model metadata, with the ToMe facts under "tome" and, when the artifact records the
    quality tome-tune measured, that record under "parameters" -> "tome_quality"."""
    meta = served_model.metadata
    described = {
        "name": settings.model_name,
        "versions": [MODEL_VERSION],
        "platform": served_model.triton_platform,
        "inputs": [spec.to_json() for spec in served_model.inputs],
        "outputs": [spec.to_json() for spec in served_model.outputs],
        "max_batch_size": settings.policy.max_batch,
        "tome": {
            "model": meta.model,
            "schedule": meta.schedule,
            "r_effective": meta.r_effective,
            "tokens_per_layer": meta.tokens_per_layer,
            "num_prefix_tokens": meta.num_prefix_tokens,
            "theoretical_speedup": meta.theoretical_speedup,
            "merge": meta.merge,
            "precision": meta.precision,
            "input": meta.input.to_dict(),
            **_image_keys(meta.input),
            "exported_batch": meta.batch,
        },
    }
    if meta.quality is not None:
        described["parameters"] = {"tome_quality": meta.quality}
    return described


def _image_keys(spec: InputSpec) -> dict[str, Any]:
    """An image input's size and preprocessing under the names tome-serve gave them before inputs had a kind
    (input_size, mean, std, interpolation, crop_pct), for clients that read those; nothing for other kinds."""
    if spec.kind != "image":
        return {}
    return {"input_size": list(spec.shape), **spec.preprocessing}


def build_app(served_model: ServedModel, runner: Runner, settings: ServeSettings):
    """A Starlette app serving one artifact; its lifespan starts the batcher and drains it at shutdown."""
    require_serving_stack()
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    settings = settings_for(served_model, settings)
    metrics = ServingMetrics(settings.policy.max_batch, lambda: batcher.queued)
    batcher = DynamicBatcher(
        lambda feed: run_padded(runner, served_model, feed), settings.policy, on_batch=metrics.record_batch
    )
    decoder = named_executor(
        "tome-decode"
    )  # request bodies -> arrays, off the event loop (JSON and images take a while)
    metadata = model_metadata(served_model, settings)
    model_input, output_name = served_model.model_input, served_model.outputs[0].name

    async def decode(function, *args):
        return await asyncio.get_running_loop().run_in_executor(decoder, functools.partial(function, *args))

    def error_response(err: ToMeError) -> Response:
        return JSONResponse({"error": str(err)}, status_code=status_of(err))

    def check_model(request: Request) -> None:
        name, version = request.path_params["model"], request.path_params.get("version", MODEL_VERSION)
        if name != settings.model_name or version != MODEL_VERSION:
            raise UnknownModelError(
                f"model {name!r} version {version!r} is not served here; this server serves {settings.model_name!r} version {MODEL_VERSION}"
            )

    async def read_body(request: Request) -> bytes:
        """The whole body, refused past max_body_bytes. A declared Content-Length over the limit is refused at
        once, before any of the body is read: the client gets its 413 without uploading (with `Expect:
        100-continue` it never sends the body) and the server drops what still arrives (uvicorn discards a
        request's body after its response and keeps the connection). A body without a length is refused
        once it passes the limit, still read to its end and dropped: closing a socket with unread data resets
        it, and the client would lose the answer."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and (len(declared) > 19 or int(declared) > settings.max_body_bytes):
            raise BodyTooLargeError(
                f"the body declares {declared if len(declared) <= 19 else 'over 10**19'} bytes (Content-Length), over the "
                f"limit of {settings.max_body_bytes}; send fewer rows per request or raise --max-body-mb"
            )
        chunks, size = [], 0
        try:
            async with asyncio.timeout(settings.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size <= settings.max_body_bytes:
                        chunks.append(chunk)
        except TimeoutError:
            raise BodyTimeoutError(
                f"the body did not arrive within {settings.body_timeout_s:g}s ({size} bytes so far); send it at once, or raise --body-timeout-s"
            ) from None
        if size > settings.max_body_bytes:
            raise BodyTooLargeError(
                f"the body has {size} bytes, over the limit of {settings.max_body_bytes}; send fewer rows per request or raise --max-body-mb"
            )
        if request.headers.get("content-encoding", "identity").lower() != "identity":
            raise UnsupportedEncodingError(
                f"Content-Encoding {request.headers['content-encoding']!r} is not accepted; send the body uncompressed"
            )
        return b"".join(chunks)

    def counted(endpoint: str, handler: Callable[[Request], Awaitable[Response]]):
        async def run(request: Request) -> Response:
            started = time.perf_counter()
            try:
                check_model(request)
                response = await handler(request)
            except ToMeError as err:
                response = error_response(err)
            metrics.requests.labels(endpoint, str(response.status_code)).inc()
            metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - started)
            return response

        return run

    async def infer(request: Request) -> Response:
        body = await read_body(request)
        parsed = await decode(
            parse_infer_request,
            body,
            request.headers.get(HEADER_LENGTH),
            served_model.inputs,
            served_model.outputs,
            settings.policy.max_batch,
        )
        results = await batcher.infer(parsed.inputs, parsed.timeout_s)
        payload, header_length = encode_infer_response(settings.model_name, MODEL_VERSION, parsed, results)
        if header_length is None:
            return Response(payload, media_type="application/json")
        return Response(payload, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})

    async def classify(request: Request) -> Response:
        k = parse_top_k(request.query_params.get("top_k"), settings.default_top_k, served_model.num_classes)
        pixels = await decode(
            image_to_input, await read_body(request), served_model.metadata, settings.max_image_pixels
        )
        results = await batcher.infer({model_input.name: pixels.astype(DATATYPES[model_input.datatype])})
        check_finite_output(output_name, results[output_name])
        return JSONResponse(
            {
                "model_name": settings.model_name,
                "model_version": MODEL_VERSION,
                "predictions": top_k(results[output_name][0], k, settings.labels),
            }
        )

    async def model_info(request: Request) -> Response:
        try:
            check_model(request)
        except UnknownModelError as err:
            return error_response(err)
        return JSONResponse(metadata)

    async def model_ready(request: Request) -> Response:
        try:
            check_model(request)
        except UnknownModelError as err:
            return error_response(err)
        return Response(status_code=200 if batcher.accepting else 503)

    async def server_ready(_: Request) -> Response:
        return Response(status_code=200 if batcher.accepting else 503)

    async def server_live(_: Request) -> Response:
        return Response(status_code=200)

    async def server_metadata(_: Request) -> Response:
        return JSONResponse({"name": "tome-serve", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def prometheus(_: Request) -> Response:
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        await batcher.drain()
        decoder.shutdown(wait=False)  # in-flight requests were answered before the lifespan ends

    model_routes = []
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        model_routes += [
            Route(prefix, model_info, methods=["GET"]),
            Route(prefix + "/ready", model_ready, methods=["GET"]),
            Route(prefix + "/infer", counted("infer", infer), methods=["POST"]),
            Route(prefix + "/classify", counted("classify", classify), methods=["POST"]),
        ]
    routes = [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", server_live, methods=["GET"]),
        Route("/v2/health/ready", server_ready, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        *model_routes,
    ]
    return Starlette(routes=routes, lifespan=lifespan)
