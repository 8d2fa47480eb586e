"""Drift: scheduled Evidently reports of live inputs against each model version's reference set, alerts,
and traffic to test them. `python -m drift --help`; docs/drift.md for the loop and the rules.

One module per job:

| module | job |
| --- | --- |
| `logs` | read a window of the prediction log for one model version: streamed, robust, sampled |
| `report` | the Evidently report (data drift, data quality, prediction drift) and its files |
| `summary` | `latest.json`, the machine-readable verdict the service exports |
| `alerts` | the webhook message, with bounded retries |
| `job` | one report from start to finish, with its exit code |
| `schedule` | run a job at an interval in one process (APScheduler) |
| `simulate` | test traffic over HTTP or gRPC: baseline, shift, new-category, missing-spike |
| `bench` | the report at scale against bare Evidently |
| `cli` | the Typer commands |
"""
