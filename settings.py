"""The project's one configuration object, read from the environment and `.env`.

Every variable has the prefix ``TABSERVE_``, except the two that belong to the tools themselves and keep
their own names: ``MLFLOW_TRACKING_URI`` and ``BENTOML_HOME``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TABSERVE_",
        env_file=PROJECT_ROOT / ".env",
        extra="ignore",
        protected_namespaces=(),
    )

    data_dir: Path = Field(
        default=PROJECT_ROOT / "data",
        description="Where the default MLflow store (SQLite + artifacts) lives. Git-ignored.",
    )
    model_name: str = Field(
        default="breast_cancer",
        description="Model name train.py uses for the bundled data, and the model served by default.",
    )
    model_tag: str | None = Field(
        default=None,
        description="BentoML model tag to serve (and never replace), e.g. breast_cancer:abc123. Default: the "
        "registry's champion of model_name, else <model_name>:latest.",
    )
    mlflow_experiment: str = Field(default="tabserve", description="MLflow experiment for training runs.")
    mlflow_tracking_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "TABSERVE_MLFLOW_TRACKING_URI"),
        description="MLflow tracking URI. Default: a SQLite file in data_dir.",
    )
    bentoml_home: Path = Field(
        default=Path.home() / "bentoml",
        validation_alias=AliasChoices("BENTOML_HOME", "TABSERVE_BENTOML_HOME"),
        description="BentoML's home (model store). Default: BentoML's own default, ~/bentoml.",
    )
    reference_rows: int = Field(
        default=1000, ge=10, description="Training rows kept with each model as the drift reference set."
    )
    grpc_host: str = Field(default="0.0.0.0", description="Interface the gRPC server binds.")
    grpc_port: int = Field(default=3001, ge=0, le=65535, description="gRPC port (0: no gRPC server).")
    api_workers: int = Field(
        default=2,
        ge=1,
        description="Worker processes of the API service; each holds the model unless model_service is on.",
    )
    model_service: bool = Field(
        default=False,
        description="Run the model in its own BentoML service (adaptive batching across all API workers, "
        "one copy of the model) instead of in each API worker (no hop between processes: faster for "
        "small models).",
    )
    reload_seconds: float = Field(
        default=30,
        ge=0,
        description="How often each worker asks the registry which version holds the champion alias, and "
        "swaps it in when it moves (0: never). Not with model_tag, which pins one version.",
    )
    compiled_scorer: bool = Field(
        default=True,
        description="Score with the compiled scorer (numpy, models/compiled.py) where training proved it "
        "equal to scikit-learn on the held-out and edge rows; false: always with the scikit-learn pipeline.",
    )
    shadow: bool = Field(
        default=False,
        description="Also score every answered batch with the challenger version, off the hot path, "
        "and log its outputs beside the champion's (<prediction log dir>/shadow-*.jsonl).",
    )
    shadow_share: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="Share of answered batches the shadow challenger scores (drawn at random): on a "
        "saturated machine it costs the champion throughput in proportion (BENCHMARKS.md).",
    )
    shadow_queue_batches: int = Field(
        default=256, ge=1, description="Batches waiting for the shadow challenger; more are dropped."
    )
    access_log: bool = Field(
        default=False,
        description="BentoML's access log line per HTTP request (costs about a tenth of the throughput).",
    )
    # Authentication (serving/auth.py).
    auth_keys_file: Path | None = Field(
        default=None,
        description="API keys: a file of name:sha256[:rights] lines, or a directory of them (a mounted "
        "Secret); read again when it changes. None: no authentication.",
    )
    auth_metrics: bool = Field(
        default=False, description="/metrics needs a key with the right 'metrics' (auth on only)."
    )
    auth_docs: bool = Field(
        default=True,
        description="The OpenAPI page (/docs, /docs.json) and the web page (/ui/) need a key (auth on only).",
    )
    auth_max_failures: int = Field(
        default=10,
        ge=1,
        description="Invalid keys from one address within auth_block_seconds before it is blocked.",
    )
    auth_block_seconds: float = Field(
        default=60,
        gt=0,
        description="How long an address that sent too many invalid keys gets 429 (and the window they "
        "are counted in).",
    )
    auth_reload_seconds: float = Field(
        default=10, ge=0, description="How often the key file is checked for changes (0: at every call)."
    )
    max_batch_rows: int = Field(
        default=1024, ge=1, description="Most rows in one adaptively batched model call."
    )
    max_latency_ms: int = Field(
        default=1000,
        ge=10,
        description="Load-shedding deadline of the adaptive batcher: a request it cannot answer in time "
        "gets 503. Not a wait: batches form from requests that arrive while the model is busy.",
    )
    # Admission control (serving/admission.py): under overload each API worker refuses what it cannot answer
    # in time with 503 / UNAVAILABLE and Retry-After, as soon as the request arrives, so that the requests it
    # takes stay fast. The defaults refuse nothing at 32 concurrent clients (BENCHMARKS.md's load).
    max_concurrency: int = Field(
        default=128,
        ge=1,
        description="Most prediction requests in progress in one API worker (all transports; health, "
        "metadata and /predict_file uploads not counted); more get 503. Bounds the memory they hold.",
    )
    max_queue_ms: int = Field(
        default=1000,
        ge=10,
        description="Longest an API worker expects a new prediction request to take (the requests in "
        "progress times the measured time per request) before it refuses it with 503: the bound on the "
        "latency of the requests it accepts under overload.",
    )
    max_batch_records: int = Field(
        default=10_000, ge=1, description="Most records in one /predict_batch call."
    )
    # Explanations (models/explain.py, serving/explaining.py).
    explain_max_records: int = Field(
        default=100,
        ge=1,
        description="Most records in one /explain_batch call, and rows in one OIP request that asks for "
        "explanation outputs (400 above).",
    )
    explain_max_queue_rows: int = Field(
        default=1000,
        ge=1,
        description="Rows waiting for or being explained on an API worker's explain thread; a request that "
        "would go over gets 503 with Retry-After, before it is predicted.",
    )
    explain_background_rows: int = Field(
        default=100,
        ge=1,
        description="Reference rows the model-agnostic (permutation) explainer uses as background; its "
        "cost per explained row grows in proportion. Tree and linear explainers are exact and need none.",
    )
    explain_permutations: int = Field(
        default=3,
        ge=1,
        description="Permutations the model-agnostic explainer runs per row: attributions add up to the "
        "model's output with any number; more give better estimates, in proportion slower.",
    )
    max_body_bytes: int = Field(default=64 * 2**20, ge=1024, description="Largest request body (413 above).")
    # Slow clients (serving/rest.py): each is held to a deadline, and refused with 408 (never a 5xx) or
    # disconnected, so that it cannot hold a connection and a worker's memory for nothing. Settings rather
    # than constants so that tests can wait out short ones.
    head_timeout_seconds: float = Field(
        default=10,
        gt=0,
        description="How long a request's line and headers may take to arrive whole, from the connection's "
        "opening or the previous response: 408 and close when part of them came, close when nothing did.",
    )
    upload_idle_seconds: float = Field(
        default=30,
        gt=0,
        description="Longest /predict_file waits for the next piece of an upload (408 after it): a large "
        "file that keeps arriving takes as long as it needs.",
    )
    model_service_timeout_seconds: float = Field(
        default=10,
        gt=0,
        description="With TABSERVE_MODEL_SERVICE: how long a call to the model service may take before the "
        "request gets 503 (model service unreachable), below BentoML's 60 s request timeout (504).",
    )
    prediction_log_dir: Path | None = Field(
        default=None, description="Where the prediction log goes. Default: <data_dir>/predictions."
    )
    prediction_log_max_bytes: int = Field(
        default=50 * 2**20, ge=1024, description="Size at which a log rotates."
    )
    prediction_log_backups: int = Field(default=20, ge=1, description="Rotated log files kept per worker.")
    # Ground truth (serving/feedback.py).
    feedback_log_dir: Path | None = Field(
        default=None, description="Where POST /feedback writes labels. Default: <data_dir>/feedback."
    )
    feedback_max_items: int = Field(default=10_000, ge=1, description="Most labels in one POST /feedback.")
    answered_retention_hours: float = Field(
        default=24 * 30,
        gt=0,
        description="How long answered request ids are kept for POST /feedback to check labels against.",
    )
    max_upload_bytes: int = Field(
        default=2 * 2**30, ge=1024, description="Largest file /predict_file accepts (413 above)."
    )
    file_chunk_rows: int = Field(
        default=8192, ge=1, description="Rows /predict_file reads, predicts and writes at a time."
    )
    # Drift reports (drift/).
    reports_dir: Path | None = Field(
        default=None, description="Where drift reports go. Default: <data_dir>/reports."
    )
    workspace_dir: Path | None = Field(
        default=None, description="Evidently workspace of report snapshots. Default: <data_dir>/workspace."
    )

    drift_max_rows: int = Field(
        default=100_000,
        ge=10,
        description="Most log rows a drift report compares; a larger window is reservoir-sampled.",
    )
    drift_min_rows: int = Field(
        default=50, ge=1, description="Fewest log rows a drift report judges; fewer exit with code 2."
    )
    drift_share: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Share of features that must drift for a report to say drift; 0: any one feature.",
    )
    drift_webhook_url: str | None = Field(
        default=None, description="Slack- or Discord-compatible webhook that drift reports alert."
    )
    # Live performance (drift/performance.py).
    performance_min_rows: int = Field(
        default=50,
        ge=1,
        description="Fewest labelled log rows a performance report judges; fewer exit with code 2.",
    )
    performance_max_drop: float = Field(
        default=0.05,
        ge=0.0,
        description="How much worse than on the reference rows the model's metric may be on labelled live "
        "rows, in metric units, before a performance report says degraded.",
    )
    # Traces (serving/tracing.py).
    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP collector that spans per request are exported to: with otlp_protocol http, e.g. "
        "http://localhost:4318 (/v1/traces is added to a URL without a path); with grpc, e.g. "
        "http://localhost:4317. Unset: no traces, at no cost.",
    )
    otlp_protocol: Literal["http", "grpc"] = Field(
        default="http", description="OTLP over HTTP (protobuf) or gRPC."
    )
    trace_sample_rate: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Share of requests traced (where the caller sends no sampled trace context of its own).",
    )

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{self.data_dir.resolve() / 'mlflow.db'}"

    @property
    def artifact_location(self) -> str:
        """Artifact root for new experiments: inside data_dir, never the current directory."""
        return (self.data_dir.resolve() / "mlartifacts").as_uri()

    @property
    def log_dir(self) -> Path:
        return self.prediction_log_dir or self.data_dir / "predictions"

    @property
    def feedback_dir(self) -> Path:
        return self.feedback_log_dir or self.data_dir / "feedback"

    @property
    def drift_reports_dir(self) -> Path:
        return self.reports_dir or self.data_dir / "reports"

    @property
    def evidently_workspace(self) -> Path:
        return self.workspace_dir or self.data_dir / "workspace"

    def export_tool_environment(self) -> None:
        """Make BentoML and MLflow (and any process they start) see the same stores as we do.

        BentoML reads BENTOML_HOME from the environment the first time it touches its store, so this must
        run before that; values that came from `.env` would otherwise be invisible to it.
        """
        os.environ["BENTOML_HOME"] = str(self.bentoml_home)
        os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri


def get_settings() -> Settings:
    settings = Settings()
    settings.export_tool_environment()
    return settings
