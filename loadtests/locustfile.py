"""Scenario load test of /predict with rows the model never trained on (the held-out test split).

    .venv/bin/locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:3000 \
        --users 8 --spawn-rate 8 --run-time 15s

Locust is for scenarios; throughput figures come from the benchmark (C load generators, BENCHMARKS.md).
"""

from __future__ import annotations

import random

from locust import FastHttpUser, constant, task

from models.data import Task, load_default, split

HELD_OUT = [
    {str(column): float(value) for column, value in row.items()}
    for _, row in split(load_default(), Task.CLASSIFICATION, test_size=0.2, seed=42).X_test.iterrows()
]


class PredictUser(FastHttpUser):
    wait_time = constant(0)

    @task
    def predict_one_row(self) -> None:
        with self.client.post("/predict", json=random.choice(HELD_OUT), catch_response=True) as response:
            if response.status_code != 200 or "prediction" not in (response.json() or {}):
                response.failure(f"{response.status_code}: {response.text[:200]}")
