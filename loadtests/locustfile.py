"""Scenario load test of every transport, with rows the model never trained on (the held-out split).

    .venv/bin/python -m loadtests.run_locust --run-time 60s           # starts its own server
    PYTHONPATH=. .venv/bin/locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:3000 \
        --grpc-target 127.0.0.1:3001 --users 8 --spawn-rate 8 --run-time 15s

Two kinds of users, both without think time (each user is one client in a closed loop):
- `HttpClient`: typed `POST /predict` (one record), `POST /predict_batch` (a list of records) and OIP REST
  `POST /v2/models/<model>/infer` (one [1, F] tensor);
- `GrpcClient`: OIP gRPC ModelInfer on its own channel.
Select transports with `--tags http`, `--tags oip`, `--tags grpc`, `--exclude-tags batch`, ...

Locust is for scenarios and error checks; throughput figures come from `make bench` (C load generators:
a Python load generator takes the CPU of the server it measures).
"""

from __future__ import annotations

import random
import time
from typing import Any
from urllib.parse import urlsplit

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import FastHttpUser, User, constant, events, tag, task
from locust.env import Environment

from loadtests import rows
from serving.oip import grpc_predict_v2_pb2_grpc as pb_grpc

# grpcio must cooperate with gevent, which locust runs its users on, before any channel exists.
grpc_gevent.init_gevent()

HELD_OUT = rows.held_out()
RECORDS = rows.records(HELD_OUT)
MATRIX = rows.matrix(HELD_OUT)
BATCH_ROWS = 10
DEFAULT_GRPC_PORT = 3001


@events.init_command_line_parser.add_listener
def add_options(parser: Any) -> None:
    parser.add_argument("--model", default=rows.DEFAULT_MODEL, help="model name in OIP requests")
    parser.add_argument(
        "--grpc-target",
        default="",
        help=f"host:port of the OIP gRPC server (default: the --host's host, port {DEFAULT_GRPC_PORT})",
    )


@events.init.add_listener
def refresh_event_loop_clock(**_kwargs: Any) -> None:
    """init_gevent() starts gevent's loop at import, and the loop caches its clock: without a refresh,
    --run-time would count from the import, seconds before the first user starts."""
    gevent.get_hub().loop.update_now()


@events.init.add_listener
def drop_users_without_tasks(environment: Environment, **_kwargs: Any) -> None:
    """`--tags grpc` leaves HttpClient no task, and locust would still start it (and fail): keep only the
    user classes with a task that the tag filter lets through."""
    options = environment.parsed_options
    wanted = set(getattr(options, "tags", None) or [])
    excluded = set(getattr(options, "exclude_tags", None) or [])

    def selected(task: Any) -> bool:
        tags = getattr(task, "locust_tag_set", set())  # set by @tag
        return (not wanted or bool(tags & wanted)) and not tags & excluded

    environment.user_classes[:] = [
        user for user in environment.user_classes if any(selected(task) for task in user.tasks)
    ]


def grpc_target(environment: Environment) -> str:
    options = environment.parsed_options
    if options is not None and options.grpc_target:
        return str(options.grpc_target)
    host = urlsplit(environment.host or "").hostname or "127.0.0.1"
    return f"{host}:{DEFAULT_GRPC_PORT}"


def model_name(environment: Environment) -> str:
    options = environment.parsed_options
    return str(options.model) if options is not None else rows.DEFAULT_MODEL


def fail(response: Any) -> None:
    detail = response.text or str(response.error or "")  # no text when the connection failed (status 0)
    response.failure(f"{response.status_code}: {detail[:200]}")


class HttpClient(FastHttpUser):
    weight = 3
    wait_time = constant(0)

    @tag("http", "predict")
    @task(6)
    def predict_one_row(self) -> None:
        with self.client.post(
            "/predict", json=random.choice(RECORDS), name="/predict", catch_response=True
        ) as response:
            if response.status_code != 200 or "prediction" not in (response.json() or {}):
                fail(response)

    @tag("http", "batch")
    @task(1)
    def predict_batch(self) -> None:
        batch = random.sample(RECORDS, BATCH_ROWS)
        with self.client.post(
            "/predict_batch", json=batch, name="/predict_batch", catch_response=True
        ) as response:
            answers = response.json() if response.status_code == 200 else None
            if not isinstance(answers, list) or len(answers) != BATCH_ROWS:
                fail(response)

    @tag("oip", "oip_rest")
    @task(3)
    def oip_rest_infer(self) -> None:
        row = random.randrange(len(MATRIX))
        body = rows.oip_rest_body([rows.matrix_tensor(MATRIX[row : row + 1])])
        path = f"/v2/models/{model_name(self.environment)}/infer"
        with self.client.post(
            path,
            data=body,
            headers={"Content-Type": "application/json"},
            name="/v2/models/[model]/infer",
            catch_response=True,
        ) as response:
            if response.status_code != 200 or not (response.json() or {}).get("outputs"):
                fail(response)


class GrpcClient(User):
    """OIP ModelInfer over gRPC; each call is reported to locust as a request of type `grpc`."""

    weight = 1
    wait_time = constant(0)

    def on_start(self) -> None:
        self.channel = grpc.insecure_channel(grpc_target(self.environment))
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.model = model_name(self.environment)

    def on_stop(self) -> None:
        self.channel.close()

    @tag("grpc", "oip")
    @task
    def model_infer(self) -> None:
        row = random.randrange(len(MATRIX))
        request = rows.model_infer_request(self.model, [rows.matrix_tensor(MATRIX[row : row + 1])])
        started = time.perf_counter()
        length = 0
        exception: Exception | None = None
        try:
            response = self.stub.ModelInfer(request, timeout=30)
            length = response.ByteSize()
            if not response.outputs:
                raise ValueError("ModelInfer answered without outputs")
        except (grpc.RpcError, ValueError) as error:
            exception = error
        self.environment.events.request.fire(
            request_type="grpc",
            name="ModelInfer",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=exception,
            context={},
        )
