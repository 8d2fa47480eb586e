"""The BentoML services: typed, adaptively batched predictions from the champion in the BentoML store.

    bentoml serve        # HTTP and OIP REST on :3000 (web page at /ui/, OpenAPI page at /docs, spec
                         # /docs.json), OIP gRPC on :3001

- `Tabserve` owns the transports: BentoML HTTP APIs typed from the stored feature schema, the Open
  Inference Protocol over REST (mounted at /v2) and over gRPC (its own server, started with the service).
  All of them go through one data plane (serving/dataplane.py). By default each of its workers holds the
  model and merges the rows of concurrent requests into shared model calls (serving/model.py).
- `ModelRunner`, with `TABSERVE_MODEL_SERVICE=true`: the model in a service of its own, behind one
  batchable API; BentoML merges the rows of concurrent calls from all API workers into one model call
  (adaptive batching). One copy of the model, at the price of a hop between processes per call.
"""

from __future__ import annotations

import asyncio
import gc
import os
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Literal

import aiohttp
import attrs
import bentoml
import numpy as np
import orjson
from bentoml._internal.service.openapi.specification import OpenAPISpecification
from bentoml.exceptions import ServiceUnavailable
from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BaseModel, Field

from drift.summary import read_latest, read_latest_performance
from models.errors import InputError
from models.explain import ExplainerOptions
from models.registry import CHAMPION, registry_client, served_model
from models.schema import RecordValues
from models.store import StoredModel
from serving import oip_rest, tracing
from serving.admission import Admission
from serving.answered import AnsweredIndex
from serving.arrowlog import ArrowLog
from serving.auth import KeyFileError, current_caller, gate_from
from serving.coalesce import Coalescer, WaitTimeoutError
from serving.dataplane import DataPlane, ModelCall
from serving.errors import ServingError, UnavailableError
from serving.explaining import ExplainThread, VersionExplainer
from serving.feedback import FeedbackDesk, feedback_route
from serving.files import predict_file_route
from serving.follow import Follower
from serving.metrics import export_latest_drift, export_latest_performance, serving_metrics
from serving.model import InProcessModel, RowPredictor, VersionedPredictors, planned_scorer, with_version
from serving.oip.grpc_server import GrpcServer, check_port_free, start_grpc_server
from serving.pages import PagePaths, ui_route
from serving.predlog import JsonLinesLog
from serving.rest import (
    HttpAuth,
    HttpLimits,
    InvalidBody,
    document_authentication,
    document_refusals,
    error_response,
    json_body,
    model_info_route,
    openapi_info,
    serve_http,
)
from serving.shadow import SHADOW_STEM, ShadowScorer
from serving.shutdown import CallTracker, Resume, intercept_sigterm
from settings import get_settings

# BentoML removes the Unix sockets between its services as soon as SIGTERM arrives, before the services
# have drained: calls still in flight then fail to reach the model service. Loopback TCP keeps working
# until the model service has exited (see serving/shutdown.py). Read by `bentoml serve` after this import.
os.environ.setdefault("BENTOML_NO_UDS", "1")
settings = get_settings()
# This worker's admission control, shared by HTTP and gRPC (each worker process imports this module).
admission = Admission(settings.max_concurrency, settings.max_queue_ms / 1000)
try:
    # The version the request model, the OpenAPI page and `bentoml build` are made from (models/registry.py).
    champion, follow_champion = served_model(settings)
except InputError as exc:
    raise SystemExit(f"error: {exc}") from None

try:
    # None with auth off. One per worker process: its record of failed keys is that process's.
    gate = gate_from(
        settings.auth_keys_file,
        reload_seconds=settings.auth_reload_seconds,
        max_failures=settings.auth_max_failures,
        block_seconds=settings.auth_block_seconds,
        auth_metrics=settings.auth_metrics,
        auth_docs=settings.auth_docs,
    )
except KeyFileError as exc:
    raise SystemExit(f"error: TABSERVE_AUTH_KEYS_FILE: {exc}") from None

Record = champion.schema.request_model(title="Record")
Records = Annotated[list[Record], Field(min_length=1, max_length=settings.max_batch_records)]  # type: ignore[valid-type]


class Prediction(BaseModel):
    prediction: str | int | float | bool = Field(description="predicted class label, or value for regression")
    probabilities: dict[str, float] | None = Field(
        None, description="probability of each class (classification)"
    )
    unknown_categories: dict[str, str] = Field(
        description="values of categorical features never seen in training"
    )
    model: str = Field(description="model name")
    version: str = Field(description="BentoML model version")
    registered_version: str = Field(description="MLflow registered model version")
    mlflow_run_id: str
    data_digest: str = Field(description="digest of the training data (MLflow dataset digest)")
    request_id: str = Field(
        description="the request's id (X-Request-Id if the client sent one); with `row`, "
        "what POST /feedback names this answer by"
    )
    row: int = Field(description="the record's index in its request, from 0")


ExplainRecords = Annotated[list[Record], Field(min_length=1, max_length=settings.explain_max_records)]  # type: ignore[valid-type]


class Explanation(BaseModel):
    """Why the model answered what it did (models/explain.py): base_value + the sum of the attributions =
    output_value, the model's output for the row in `output` units."""

    method: Literal["tree", "linear", "permutation"] = Field(
        description="tree: shap's TreeExplainer (exact); linear: LinearExplainer, reference rows as "
        "background (exact); permutation: model-agnostic PermutationExplainer, a sample of the reference "
        "rows as background (additive; the attributions are estimates)"
    )
    output: Literal["log_odds", "probability", "value"] = Field(
        description="units: log_odds, the explained class's margin (binary: the log-odds of the second "
        "class; multiclass: the class's raw score, softmax over classes = probabilities); probability, "
        "the explained class's probability; value, the predicted value (regression)"
    )
    explained_class: str | None = Field(
        description="the class explained: binary, always the second class (the margin's); multiclass, "
        "the predicted class; null for regression"
    )
    base_value: float = Field(description="the model's expected output over its background rows")
    output_value: float = Field(description="the model's output for this row, in `output` units")
    attributions: dict[str, float] = Field(
        description="each input column's contribution (one-hot and missing-indicator columns summed into "
        "their input column), every input column in schema order"
    )


class ExplainedPrediction(Prediction):
    explanation: Explanation


# Workaround for BentoML issue #5540: the client of a `bentoml.depends` service replaces its HTTP session
# every 100 requests and closes it under in-flight calls; never recycling it avoids the failures.
RUNNER_CONNECTION = {"max_requests": 2**31 - 1, "max_age": 1e9}
# How long accepted calls may take to finish after SIGTERM.
GRACE_SECONDS = 30
# The model service exits once no call has come in for this long after SIGTERM.
QUIET_SECONDS = 2.0
# How long a swapped-out version's model thread is kept for the calls that took it before the swap: as long
# as a request may take.
SWAP_GRACE_SECONDS = 60
# How long a client refused because the model service is unreachable is asked to wait: about the time
# BentoML takes to restart a killed one (~5 s here).
MODEL_SERVICE_RETRY_SECONDS = 5
# How often the latest drift report (written by `python -m drift report`) is read into /metrics.
DRIFT_REFRESH_SECONDS = 30


@bentoml.service(
    name="tabserve-model", workers=1, runner_connection=RUNNER_CONNECTION, traffic={"timeout": 60}
)
class ModelRunner:
    def __init__(self) -> None:
        self.predictors = VersionedPredictors(champion, registry_client(settings), settings.compiled_scorer)
        self.calls = CallTracker()

    @bentoml.on_startup
    async def outlive_callers(self) -> None:
        # Signalled together with the API service (see serving/shutdown.py): answer its last calls first.
        intercept_sigterm(self._exit_when_quiet)

    def _exit_when_quiet(self, resume: Resume) -> None:
        self._exiting = asyncio.ensure_future(
            self.calls.resume_when_quiet(resume, QUIET_SECONDS, max_seconds=GRACE_SECONDS)
        )

    @bentoml.api(
        batchable=True, max_batch_size=settings.max_batch_rows, max_latency_ms=settings.max_latency_ms
    )
    def infer(self, rows: np.ndarray) -> np.ndarray:
        """Prepared rows (the registered version to score each with, then its schema's columns) in; class
        probabilities or predicted values out."""
        return self._predict(rows)

    @bentoml.api
    def infer_bulk(self, rows: np.ndarray) -> np.ndarray:
        """The same, for calls that fill a batch by themselves (files, large batches): they gain nothing
        from waiting for others, and the batching deadline would refuse them on a busy machine."""
        return self._predict(rows)

    def _predict(self, rows: np.ndarray) -> np.ndarray:
        with self.calls.call():
            return self.predictors(rows)


@dataclass(frozen=True)
class Served:
    """One version as the API worker serves it: the model, its in-process model call (None when the model
    service holds the models) and the data plane that validates, predicts, logs and answers with it."""

    model: StoredModel
    call: InProcessModel | None
    plane: DataPlane


def current_plane() -> DataPlane:
    plane: DataPlane = bentoml.get_current_service().plane
    return plane


def current_feedback() -> FeedbackDesk:
    desk: FeedbackDesk = bentoml.get_current_service().feedback
    return desk


# Routes that BentoML's POST-only APIs cannot express. Mounted at the root (BentoML's own routes still come
# first), since a mount at /v2 or /model would answer the bare path with a redirect. A FastAPI app, because
# BentoML adds a mounted FastAPI app's routes to its OpenAPI page (the OIP routes are documented by the OIP).
extra_routes = FastAPI(
    routes=[
        model_info_route(lambda: bentoml.get_current_service().model_info()),
        feedback_route(current_feedback, settings.feedback_max_items),
        predict_file_route(
            current_plane, settings.max_upload_bytes, settings.file_chunk_rows, settings.upload_idle_seconds
        ),
        *oip_rest.routes(current_plane),
        ui_route(),
    ],
    openapi_url=None,
    docs_url=None,
    redoc_url=None,
)


class DescribedService(bentoml.Service[Any]):
    """A service whose OpenAPI page describes it and its model: BentoML titles it with placeholder text
    (version "None", links to its own Slack) unless it is served from a bento, and then with the bento's; and
    it documents its APIs' error bodies wrongly."""

    @property
    def openapi_spec(self) -> OpenAPISpecification:
        spec = attrs.evolve(super().openapi_spec, info=openapi_info(champion))
        document_refusals(spec)
        if gate is not None:
            document_authentication(spec, gate.http_access)
        return spec


# The service image `bentoml containerize` builds, with bentofile.yaml's python and docker options:
# python:3.11-slim as it is. BentoML's Image puts its distro's first step before everything (on Debian:
# apt-get install build-essential git) unless the distro is one it does not know; the requirements are wheels
# only, so no distro is named, and the image has no compilers or git. `--only-binary :all:` goes into the
# bento's requirements, so uv never builds a package in the image.
SERVICE_IMAGE = bentoml.images.Image(base_image="python:3.11-slim", distro="").python_packages(
    "--only-binary :all:"
)


@bentoml.service(
    name="tabserve",
    image=SERVICE_IMAGE,
    service_class=DescribedService,
    workers=settings.api_workers,
    traffic={"timeout": 60},
    logging={"access": {"enabled": settings.access_log}},
    **tracing.bentoml_config(settings),
)
@bentoml.asgi_app(extra_routes, path="/")
class Tabserve:
    # Declared so that `bentoml build` packs exactly this model version into the bento (whichever service
    # runs it: the one service that is always built declares it).
    bento_model = bentoml.models.BentoModel(champion.tag)
    if settings.model_service:
        runner = bentoml.depends(ModelRunner)

    def __init__(self) -> None:
        tracing.start(settings)
        metrics = serving_metrics()
        self.log = ArrowLog(
            settings.log_dir,
            settings.prediction_log_max_bytes,
            settings.prediction_log_backups,
            on_drop=metrics.log_dropped.inc,
        )
        self.metrics = metrics
        if settings.model_service:
            self._coalesced = Coalescer(
                self._call_batched,
                max_rows=settings.max_batch_rows,
                shared_errors=(ServiceUnavailable, UnavailableError),
            )
        self.answered = AnsweredIndex(
            settings.log_dir,
            settings.answered_retention_hours * 3600,
            on_drop=metrics.feedback_dropped.labels(store="answered_index").inc,
        )
        self.shadow: ShadowScorer | None = None
        if settings.shadow:
            self.shadow = ShadowScorer(
                champion,
                JsonLinesLog(
                    settings.log_dir,
                    settings.prediction_log_max_bytes,
                    settings.prediction_log_backups,
                    on_drop=metrics.log_dropped.inc,
                    stem=SHADOW_STEM,
                ),
                settings.shadow_queue_batches,
                settings.max_batch_rows,
                settings.shadow_share,
                metrics,
            )
        # Explanations run on a thread of this worker's own, shared by the versions it serves.
        self.explain_thread = ExplainThread(settings.explain_max_queue_rows)
        # The version served now: swapped whole by one assignment (`_swap_in`); every request takes it once.
        self.served = self._prepare(champion)
        self._show_served(champion, 1)
        self.follower: Follower[Served] | None = None
        if follow_champion and settings.reload_seconds > 0:
            self.follower = Follower(
                settings, CHAMPION, champion, champion, self._prepare, self._swap_in, metrics
            )
        self.feedback_log = JsonLinesLog(
            settings.feedback_dir,
            settings.prediction_log_max_bytes,
            settings.prediction_log_backups,
            on_drop=metrics.feedback_dropped.labels(store="feedback_log").inc,
            stem="feedback",
        )
        # Labels are checked against the classes, which a swap never changes (serving/follow.py).
        self.feedback = FeedbackDesk(self.plane, self.answered, self.feedback_log, metrics)
        # The latest drift and performance verdicts as /model shows them (None until a report is read).
        self.monitoring: dict[str, dict[str, Any] | None] = {"drift": None, "performance": None}
        self.grpc: GrpcServer | None = None
        self._grpc_stopped: asyncio.Future[None] | None = None

    @property
    def plane(self) -> DataPlane:
        return self.served.plane

    def _prepare(self, model: StoredModel) -> Served:
        """A version's model call and data plane. Runs on a thread when a follower swaps versions: loading
        the model and its first call must not hold up the event loop."""
        call: InProcessModel | None = None
        model_call: ModelCall
        if settings.model_service:
            model_call = partial(self._call_model_service, model.labels["registered_version"])
            # The model service chooses the same way (serving/model.py RowPredictor).
            scorer = planned_scorer(model, settings.compiled_scorer)
        else:
            predictor = RowPredictor(model, settings.compiled_scorer)
            call = InProcessModel(predictor, settings.max_batch_rows, settings.max_latency_ms / 1000)
            model_call, scorer = call, predictor.scorer
        # Built at the version's first explanation, on the explain thread (serving/explaining.py).
        explainer = VersionExplainer(
            model,
            self.explain_thread,
            ExplainerOptions(settings.explain_background_rows, settings.explain_permutations),
            settings.explain_max_records,
        )
        plane = DataPlane(
            model, partial(self._call_model, model_call), scorer, *self._plane_parts(), explainer=explainer
        )
        return Served(model, call, plane)

    def _plane_parts(self) -> tuple[ArrowLog, Any, AnsweredIndex, Any]:
        on_answered = self.shadow.offer if self.shadow is not None else None
        return self.log, self.metrics, self.answered, on_answered

    def _swap_in(self, model: StoredModel, served: Served) -> None:
        """On the event loop, between model calls: requests that took the old plane finish with it."""
        old, self.served = self.served, served
        self._show_served(old.model, 0)
        self._show_served(model, 1)
        if old.call is not None:
            # Closed on a thread: closing waits for the calls still running on the old model thread.
            loop = asyncio.get_running_loop()
            loop.call_later(SWAP_GRACE_SECONDS, loop.run_in_executor, None, old.call.close)

    def _show_served(self, model: StoredModel, value: int) -> None:
        self.metrics.served_version.labels(
            model=model.name,
            alias=CHAMPION,
            version=model.version,
            registered_version=model.labels["registered_version"],
        ).set(value)

    def model_info(self) -> dict[str, Any]:
        """/model: the served version, with the alias as the registry names it now, following, and the
        latest drift and performance verdicts."""
        info = {**self.plane.model_info(), "monitoring": self.monitoring}
        if self.follower is None:
            return {**info, "following": None}
        state = self.follower.state
        holds = state.alias_version in (None, info["registered_version"])
        return {**info, "alias": CHAMPION if holds else None, "following": state.as_dict()}

    @bentoml.on_startup
    async def follow_registry(self) -> None:
        if self.follower is not None:
            self._following = asyncio.create_task(self.follower.run())
        if self.shadow is not None:
            self.shadow.start(settings)

    @bentoml.on_deployment
    def check_grpc_port() -> None:
        # Once, in `bentoml serve`'s main process, before any worker starts: the workers share the gRPC
        # port through SO_REUSEPORT, which would also let a second server join it silently.
        if settings.grpc_port:
            check_port_free(settings.grpc_host, settings.grpc_port)

    @bentoml.on_startup
    async def freeze_startup_objects(self) -> None:
        # The imports and the model make hundreds of thousands of long-lived objects that every full
        # collection would walk again, pausing the worker: p99 at 32 connections fell from ~250 to ~100 ms.
        gc.freeze()

    @bentoml.on_startup
    async def watch_drift_reports(self) -> None:
        # Read once before the first request, so that /model shows the verdicts from the start.
        await self._read_reports()
        self._drift_watch = asyncio.create_task(self._read_reports_every(DRIFT_REFRESH_SECONDS))

    async def _read_reports_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            await self._read_reports()

    async def _read_reports(self) -> None:
        """The latest drift and live-performance verdicts (`python -m drift report` / `performance`), into
        /metrics and /model."""
        metrics = serving_metrics()
        drift = await asyncio.to_thread(read_latest, settings.drift_reports_dir, champion.name)
        if drift is not None:
            export_latest_drift(metrics, drift)
        performance = await asyncio.to_thread(
            read_latest_performance, settings.drift_reports_dir, champion.name
        )
        if performance is not None:
            export_latest_performance(metrics, performance)
        # Replaced whole: a /model answer never mixes two reads.
        self.monitoring = {"drift": drift, "performance": performance}

    @bentoml.on_startup
    async def start_grpc(self) -> None:
        if settings.grpc_port:
            self.grpc = await start_grpc_server(
                lambda: self.plane, settings.grpc_host, settings.grpc_port, admission, gate
            )
        # uvicorn drains HTTP on SIGTERM and runs on_shutdown only afterwards: gRPC must stop taking new
        # calls at the signal too.
        intercept_sigterm(self._drain_then)

    def _drain_then(self, resume: Resume) -> None:
        self._begin_drain()
        resume()

    @staticmethod
    async def _call_model(model_call: ModelCall, rows: np.ndarray) -> np.ndarray:
        try:
            return await model_call(rows)
        except (ServiceUnavailable, WaitTimeoutError):
            raise UnavailableError(
                f"the model is overloaded: no answer within the batching deadline "
                f"({settings.max_latency_ms} ms); retry later",
                "overloaded",
            ) from None

    async def _call_model_service(self, registered_version: str, rows: np.ndarray) -> np.ndarray:
        """The model service's call for a data plane of `registered_version`."""
        rows = with_version(rows, registered_version)
        if len(rows) >= settings.max_batch_rows:
            # The dependency's client knows its methods only once the service has started.
            return await self._call_runner(self.runner.to_async.infer_bulk, rows)
        return await self._coalesced(rows)

    async def _call_batched(self, rows: np.ndarray) -> np.ndarray:
        return await self._call_runner(self.runner.to_async.infer, rows)

    @staticmethod
    async def _call_runner(method: Any, rows: np.ndarray) -> np.ndarray:
        """A call to the model service, or UnavailableError (503 / UNAVAILABLE) when it cannot be reached or
        gives no answer in time. A model service that is down but not dead (stopped, hung, or its port held
        by BentoML while a new process starts) still accepts connections, and BentoML's client would wait
        its 60 s: the request's own 60 s timeout would answer 504 first."""
        seconds = settings.model_service_timeout_seconds
        try:
            async with asyncio.timeout(seconds):
                try:
                    result: np.ndarray = await method(rows)
                except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                    # The client pools keep-alive connections that the model service's server may close
                    # when idle; a call that meets such a connection never reached the model, so it is safe
                    # to send it again.
                    result = await method(rows)
        except TimeoutError:
            raise UnavailableError(
                f"the model service is unreachable: no answer within {seconds:g} s; retry later",
                "model_service_unreachable",
                MODEL_SERVICE_RETRY_SECONDS,
            ) from None
        except aiohttp.ClientError as error:
            raise UnavailableError(
                f"the model service is unreachable ({type(error).__name__}); retry later",
                "model_service_unreachable",
                MODEL_SERVICE_RETRY_SECONDS,
            ) from None
        return result

    def _begin_drain(self) -> None:
        if self.follower is not None:
            self._following.cancel()  # no swap while draining: the new plane would not be draining
        self.plane.start_draining()
        if self.grpc is not None:
            self._grpc_stopped = asyncio.ensure_future(self.grpc.stop(grace=GRACE_SECONDS))

    @bentoml.on_shutdown
    async def stop(self) -> None:
        if self._grpc_stopped is None:
            self._begin_drain()
        if self._grpc_stopped is not None:
            await self._grpc_stopped
        if self.served.call is not None:
            self.served.call.close()
        self.explain_thread.close()
        if self.shadow is not None:
            await self.shadow.close()
        self.log.close()
        self.answered.close()
        self.feedback_log.close()

    # The APIs answer with a ready JSON Response, which BentoML sends as it is; the return annotations
    # give the schema of that JSON to the OpenAPI page. Rebuilding pydantic models from answers the data
    # plane has just made, for BentoML to serialize them again, cost a third of a 1,000-row request.
    # Their bodies are parsed by serving.rest.json_body, which hands a body that fails to the method.
    @bentoml.api(route="/predict", input_spec=json_body(Record, "Record"))
    async def predict(self, record: Record | InvalidBody, /, ctx: bentoml.Context) -> Prediction:  # type: ignore[valid-type]
        """One record, keyed by the training column names. A client may name the request (X-Request-Id);
        the answer's `request_id` and `row` are what POST /feedback names the row by."""
        body = record if isinstance(record, InvalidBody) else [record]
        return await self._predict(body, "/predict", ctx, one_record=True)  # type: ignore[return-value]

    @bentoml.api(
        route="/predict_batch",
        input_spec=json_body(Records, "Records", champion.schema.records_parser(settings.max_batch_records)),
    )
    async def predict_batch(
        self, records: Records | RecordValues | InvalidBody, /, ctx: bentoml.Context
    ) -> list[Prediction]:
        """A JSON list of records; one answer per record, in order."""
        return await self._predict(records, "/predict_batch", ctx, one_record=False)  # type: ignore[return-value]

    async def _predict(
        self,
        records: list[Any] | RecordValues | InvalidBody,
        endpoint: str,
        ctx: bentoml.Context,
        *,
        one_record: bool,
        explain: bool = False,
    ) -> Response:
        request_id = ctx.request.headers.get("x-request-id")
        response = await self._answer(records, endpoint, request_id, one_record, explain)
        # BentoML gives a method that takes the context the context's status, not its response's.
        ctx.response.status_code = response.status_code
        return response

    async def _answer(
        self,
        records: list[Any] | RecordValues | InvalidBody,
        endpoint: str,
        request_id: str | None,
        one_record: bool,
        explain: bool,
    ) -> Response:
        """The answers, each with its row's explanation when `explain` (/explain, /explain_batch: predicted
        and logged as predictions are, then explained by the same version)."""
        if isinstance(records, InvalidBody):
            return records.response()
        plane = self.plane  # once: a swap during the call must not mix two versions in one answer
        try:
            with tracing.request("http"):
                rows = plane.rows_from_records(records, in_a_list=not one_record)
                if explain:
                    batch, explanations = await plane.explain_rows(
                        rows, "http", endpoint, request_id, current_caller()
                    )
                    answers = plane.explained_responses(batch, explanations)
                else:
                    batch = await plane.predict_rows(rows, "http", endpoint, request_id, current_caller())
                    answers = plane.responses(batch)
        except ServingError as error:
            plane.refused(error, "http")
            return error_response(error)
        return Response(
            orjson.dumps(answers[0] if one_record else answers),
            media_type="application/json",
            headers={"X-Request-Id": batch.request_id},
        )

    @bentoml.api(route="/explain", input_spec=json_body(Record, "Record"))
    async def explain(self, record: Record | InvalidBody, /, ctx: bentoml.Context) -> ExplainedPrediction:  # type: ignore[valid-type]
        """One record, as /predict takes it: its prediction, and why (`explanation`: each input column's
        contribution to the model's output, in the units it names)."""
        body = record if isinstance(record, InvalidBody) else [record]
        return await self._predict(body, "/explain", ctx, one_record=True, explain=True)  # type: ignore[return-value]

    @bentoml.api(
        route="/explain_batch",
        input_spec=json_body(
            ExplainRecords,
            "ExplainRecords",
            champion.schema.records_parser(settings.explain_max_records),
        ),
    )
    async def explain_batch(
        self, records: ExplainRecords | RecordValues | InvalidBody, /, ctx: bentoml.Context
    ) -> list[ExplainedPrediction]:
        """A JSON list of records (at most TABSERVE_EXPLAIN_MAX_RECORDS); one explained answer per record,
        in order."""
        return await self._predict(records, "/explain_batch", ctx, one_record=False, explain=True)  # type: ignore[return-value]


if gate is not None:  # first: the outermost of ours, so a refused request's body is never read
    Tabserve.add_asgi_middleware(HttpAuth, gate=gate)  # type: ignore[attr-defined]
Tabserve.add_asgi_middleware(PagePaths)  # type: ignore[attr-defined]
Tabserve.add_asgi_middleware(  # type: ignore[attr-defined]
    HttpLimits, max_body_bytes=settings.max_body_bytes, max_upload_bytes=settings.max_upload_bytes
)
serve_http(admission, settings.head_timeout_seconds)
