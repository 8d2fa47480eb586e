"""The Grafana dashboard of the service, as code (grafana-foundation-sdk); its JSON is committed.

    .venv/bin/python -m deploy.dashboard           # rewrite deploy/compose/grafana/dashboards/tabserve.json
    .venv/bin/python -m deploy.dashboard --check   # exit 1 if the committed JSON is not this code's output

Every query names only metrics the service exports on /metrics: ours (serving/metrics.py, and the drift
gauges read from the latest drift report) and BentoML's own `bentoml_service_*`. A test
(tests/test_deploy_dashboard.py) runs each query against a real Prometheus scraping a real `bentoml serve`,
so a renamed metric fails it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import stat, timeseries
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
)

OUTPUT = Path(__file__).resolve().parent / "compose" / "grafana" / "dashboards" / "tabserve.json"
UID = "tabserve"
# The provisioned data source (compose/grafana/provisioning/datasources/prometheus.yaml) has this uid.
DATASOURCE = DataSourceRef(type_val="prometheus", uid="tabserve-prometheus")
# Grafana's own variable: at least four scrape intervals, so rate() always has two samples to work with.
WINDOW = "$__rate_interval"


def query(expr: str, legend: str, ref: str = "A") -> Dataquery:
    return Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)


def over_time(title: str, description: str, unit: str, *queries: Dataquery) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .height(8)
        .span(12)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
    )
    for target in queries:
        panel = panel.with_target(target)
    return panel


def latest_value(title: str, description: str, target: Dataquery) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .height(6)
        .span(8)
        .with_target(target)
        .graph_mode(common.BigValueGraphMode.NONE)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )


def traffic_row(builder: dashboard_builders.Dashboard) -> dashboard_builders.Dashboard:
    return (
        builder.with_row(dashboard_builders.Row("Traffic"))
        .with_panel(
            over_time(
                "Request rate by transport",
                "Requests per second answered or refused, by transport (http, oip_rest, grpc) and endpoint.",
                "reqps",
                query(
                    f"sum by (transport, endpoint) (rate(tabserve_request_seconds_count[{WINDOW}]))",
                    "{{transport}} {{endpoint}}",
                ),
            )
        )
        .with_panel(
            over_time(
                "p99 latency by transport",
                "99th percentile of request latency, measured by the service around each request.",
                "s",
                query(
                    "histogram_quantile(0.99, sum by (transport, le) "
                    f"(rate(tabserve_request_seconds_bucket[{WINDOW}])))",
                    "{{transport}}",
                ),
            )
        )
        .with_panel(
            over_time(
                "HTTP responses by status (BentoML)",
                "BentoML's own count of HTTP responses, per endpoint and status code.",
                "reqps",
                query(
                    "sum by (endpoint, http_response_code) "
                    f'(rate(bentoml_service_request_total{{runner_name="tabserve"}}[{WINDOW}]))',
                    "{{endpoint}} {{http_response_code}}",
                ),
            )
        )
        .with_panel(
            over_time(
                "Requests in progress (BentoML)",
                "Requests being handled now, per BentoML service (tabserve-model: TABSERVE_MODEL_SERVICE).",
                "short",
                query("sum by (runner_name) (bentoml_service_request_in_progress)", "{{runner_name}}"),
            )
        )
    )


def model_row(builder: dashboard_builders.Dashboard) -> dashboard_builders.Dashboard:
    return (
        builder.with_row(dashboard_builders.Row("Model"))
        .with_panel(
            over_time(
                "Rows per model call (adaptive batching)",
                "How many rows BentoML's adaptive batching merged into one model call.",
                "short",
                query(
                    f"histogram_quantile(0.5, sum by (le) (rate(tabserve_batch_rows_bucket[{WINDOW}])))",
                    "median",
                ),
                query(
                    f"sum(rate(tabserve_batch_rows_sum[{WINDOW}]))"
                    f" / sum(rate(tabserve_batch_rows_count[{WINDOW}]))",
                    "mean",
                    "B",
                ),
                query(
                    f"histogram_quantile(0.99, sum by (le) (rate(tabserve_batch_rows_bucket[{WINDOW}])))",
                    "p99",
                    "C",
                ),
            )
        )
        .with_panel(
            over_time(
                "Predictions by class",
                "Answered rows per second by predicted class (or value, for regression), all transports.",
                "short",
                query(
                    f"sum by (model, predicted) (rate(tabserve_predictions_total[{WINDOW}]))",
                    "{{model}}: {{predicted}}",
                ),
            )
        )
        .with_panel(
            over_time(
                "Validation errors by reason",
                "Refused requests per second: wrong types, unknown fields, bad tensors, oversized bodies...",
                "reqps",
                query(
                    f"sum by (transport, reason) (rate(tabserve_validation_errors_total[{WINDOW}]))",
                    "{{transport}}: {{reason}}",
                ),
            )
        )
        .with_panel(
            over_time(
                "Prediction-log records dropped",
                "Rows that could not be written to the prediction log (disk full, unwritable volume): "
                "drift reports do not see them.",
                "short",
                query(
                    f"sum(rate(tabserve_prediction_log_dropped_total[{WINDOW}]))",
                    "dropped per second",
                ),
            )
        )
    )


def drift_row(builder: dashboard_builders.Dashboard) -> dashboard_builders.Dashboard:
    drift_share = (
        latest_value(
            "Latest drift share",
            "Share of drifted features in the latest drift report (python -m drift), per model version.",
            query("max by (model, version) (tabserve_drift_share)", "{{model}} {{version}}"),
        )
        .unit("percentunit")
        .min(0)
        .max(1)
        .thresholds(
            dashboard_builders.ThresholdsConfig()
            .mode(ThresholdsMode.ABSOLUTE)
            .steps(
                [
                    Threshold(value=None, color="green"),
                    Threshold(value=0.3, color="orange"),
                    Threshold(value=0.5, color="red"),
                ]
            )
        )
    )
    drift_detected = (
        latest_value(
            "Drift detected",
            "Whether the latest drift report found dataset drift, per model version.",
            query("max by (model, version) (tabserve_drift_detected)", "{{model}} {{version}}"),
        )
        .mappings(
            [
                ValueMap(
                    options={
                        "0": ValueMappingResult(text="no drift", color="green", index=0),
                        "1": ValueMappingResult(text="drift", color="red", index=1),
                    }
                )
            ]
        )
        .thresholds(
            dashboard_builders.ThresholdsConfig()
            .mode(ThresholdsMode.ABSOLUTE)
            .steps([Threshold(value=None, color="green"), Threshold(value=1, color="red")])
        )
    )
    return (
        builder.with_row(dashboard_builders.Row("Drift")).with_panel(drift_share).with_panel(drift_detected)
    )


def build() -> dict[str, Any]:
    builder = (
        dashboard_builders.Dashboard("tabserve")
        .uid(UID)
        .description("Traffic, latency, batching, predictions and drift of the tabserve model service.")
        .tags(["tabserve", "bentoml"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
    )
    builder = drift_row(model_row(traffic_row(builder)))
    encoded: dict[str, Any] = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    # Links to a panel (?viewPanel=N) use its id; the builders leave ids unset (rows: 0): number them.
    for number, panel in enumerate(encoded["panels"], start=1):
        panel["id"] = number
    return encoded


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare with the committed JSON")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run python -m deploy.dashboard", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
