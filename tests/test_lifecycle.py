"""`python -m lifecycle status` against the session's real MLflow registry and its running `bentoml serve`."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx

from tests.conftest import PROJECT_ROOT, Server, Stores, free_port


def lifecycle(stores: Stores, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lifecycle", *args],
        cwd=PROJECT_ROOT,
        env=stores.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_status_lists_the_versions_and_says_whether_the_service_serves_the_champion(
    stores: Stores, server: Server
) -> None:
    result = lifecycle(stores, "status", "breast_cancer", "--url", server.url, "--json")
    document = json.loads(result.stdout)
    champion = stores.client().get_model_version_by_alias("breast_cancer", "champion")
    served = httpx.get(f"{server.url}/model").json()
    listed = {item["version"]: item for item in document["versions"]}
    assert "champion" in listed[str(champion.version)]["aliases"]
    assert listed[str(champion.version)]["metric"] == "roc_auc"
    assert listed[str(champion.version)]["score"] > 0.9
    assert document["served"]["registered_version"] == served["registered_version"]
    serves_champion = served["registered_version"] == str(champion.version)
    assert result.returncode == (0 if serves_champion else 1), result.stderr
    assert ("the champion" in document["verdict"]) == serves_champion

    table = lifecycle(stores, "status", "breast_cancer")
    assert table.returncode == 0, table.stderr
    assert f"v{champion.version}: " in table.stdout
    assert "registered versions" in table.stdout


def test_status_of_an_unknown_model_or_an_unreachable_service(stores: Stores, server: Server) -> None:
    unknown = lifecycle(stores, "status", "never-registered")
    assert unknown.returncode == 2
    assert "no registered model 'never-registered'" in unknown.stderr
    unreachable = lifecycle(stores, "status", "breast_cancer", "--url", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 1
    assert "no answer from" in unreachable.stdout
