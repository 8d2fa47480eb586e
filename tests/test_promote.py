"""`python -m lifecycle promote` and `rollback` against the session's real MLflow registry and BentoML store.

One model, trained twice through the real CLI: v1 on good rows (champion), v2 on rows whose labels are
mostly flipped (the gate keeps it out). Then the matrix in order: promote refused, --force without a reason
refused, forced with a reason recorded, rollback, and rollback refused when the target's held-out labels or
its store folder were changed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import bentoml
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer

from models import registry
from tests.conftest import PROJECT_ROOT, Stores, assert_ok, run_train

NAME = "promote-matrix"


def lifecycle(stores: Stores, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lifecycle", *args],
        cwd=PROJECT_ROOT,
        env=stores.env(USER="tester"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def breast_cancer() -> pd.DataFrame:
    bunch = load_breast_cancer(as_frame=True)
    return bunch.data.assign(diagnosis=bunch.target.map(dict(enumerate(bunch.target_names))))


def flip(rows: pd.DataFrame, share: float, seed: int) -> pd.DataFrame:
    """`share` of the rows with the other label: feedback that is mostly wrong."""
    flipped = rows.copy()
    chosen = np.random.default_rng(seed).random(len(rows)) < share
    swap = {"malignant": "benign", "benign": "malignant"}
    flipped.loc[chosen, "diagnosis"] = flipped.loc[chosen, "diagnosis"].map(swap)
    return flipped


@pytest.fixture(scope="module")
def two_versions(stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> Stores:
    folder = tmp_path_factory.mktemp("promote-data")
    table = breast_cancer()
    good, noisy = folder / "good.csv", folder / "noisy.csv"
    table.iloc[:250].to_csv(good, index=False)
    flip(table.iloc[250:500], 0.6, seed=0).to_csv(noisy, index=False)
    for path in (good, noisy):
        assert_ok(run_train(stores, "--data", str(path), "--target", "diagnosis", "--name", NAME))
    return stores


def champion(stores: Stores) -> str:
    return str(stores.client().get_model_version_by_alias(NAME, "champion").version)


def test_promote_and_rollback_matrix(two_versions: Stores) -> None:
    stores, client = two_versions, two_versions.client()
    assert champion(stores) == "1"  # the gate kept v2 (mostly flipped labels) out

    refused = lifecycle(stores, "promote", NAME, "2", "--reason", "looks better")
    assert refused.returncode == 1, refused.stderr
    assert "refused: wins on the new held-out rows" in refused.stderr
    assert "loses on champion v1's own held-out rows" in refused.stderr
    assert champion(stores) == "1"

    no_reason = lifecycle(stores, "promote", NAME, "2", "--force")
    assert no_reason.returncode == 2
    assert "--force needs --reason" in no_reason.stderr
    assert champion(stores) == "1"

    forced = lifecycle(stores, "promote", NAME, "2", "--force", "--reason", "new labelling rule")
    assert forced.returncode == 0, forced.stderr
    assert "promote (forced): promote-matrix champion v1 -> v2, by tester" in forced.stdout
    assert champion(stores) == "2"
    tags = client.get_model_version(NAME, "2").tags
    assert tags["moved_by"] == "tester"
    assert tags["move_reason"] == "promote: new labelling rule"
    assert registry.champion_history(client, NAME) == ["1", "2"]
    in_store = [m.info.labels["registered_version"] for m in bentoml.models.list(NAME)]
    assert "2" in in_store  # the new champion is in the local store

    back = lifecycle(stores, "rollback", NAME, "--reason", "v2 misbehaves", "--by", "ana")
    assert back.returncode == 0, back.stderr
    assert "rollback: promote-matrix champion v2 -> v1, by ana" in back.stdout
    assert champion(stores) == "1"
    assert registry.champion_history(client, NAME) == ["1"]
    nothing = lifecycle(stores, "rollback", NAME)
    assert nothing.returncode == 2
    assert "no previous champion" in nothing.stderr

    status = lifecycle(stores, "status", NAME)
    assert status.returncode == 0, status.stderr
    assert "promote (forced) v1 -> v2 by tester: new labelling rule" in status.stdout
    assert "rollback v2 -> v1 by ana: v2 misbehaves" in status.stdout


def test_rollback_refuses_a_target_whose_labels_or_files_changed(two_versions: Stores) -> None:
    stores, client = two_versions, two_versions.client()
    if champion(stores) != "2":
        forced = lifecycle(stores, "promote", NAME, "2", "--force", "--reason", "to roll back from")
        assert forced.returncode == 0, forced.stderr
    run_id = client.get_model_version(NAME, "1").run_id
    artifacts = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))

    held_out = artifacts / registry.HOLDOUT_ARTIFACT
    kept = held_out.read_bytes()
    rows = pd.read_parquet(held_out)
    flip(rows.rename(columns={"_target": "diagnosis"}), 1.0, seed=0).rename(
        columns={"diagnosis": "_target"}
    ).to_parquet(held_out, index=False)
    corrupted = lifecycle(stores, "rollback", NAME)
    held_out.write_bytes(kept)
    assert corrupted.returncode == 1, corrupted.stderr
    assert "refused: v1 cannot be rolled back to: its held-out rows do not match" in corrupted.stderr
    assert champion(stores) == "2"

    copies = [m for m in bentoml.models.list(NAME) if m.info.labels["registered_version"] == "1"]
    pipeline = Path(max(copies, key=lambda m: m.creation_time).path) / "pipeline.joblib"
    backup = pipeline.with_suffix(".kept")
    shutil.copyfile(pipeline, backup)
    pipeline.write_bytes(pipeline.read_bytes()[:-100] + b"\0" * 100)
    try:
        damaged = lifecycle(stores, "rollback", NAME)
    finally:
        shutil.move(backup, pipeline)
    assert damaged.returncode == 1, damaged.stderr
    assert "is damaged: pipeline.joblib differs" in damaged.stderr
    assert "Traceback" not in damaged.stderr
    assert champion(stores) == "2"
    assert registry.champion_history(client, NAME) == ["1", "2"]
