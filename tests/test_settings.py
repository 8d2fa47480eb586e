"""The one settings object: our prefix, the tools' own variables, `.env`, and defaults that never depend on
the working directory."""

import os
from pathlib import Path

import pytest

from settings import PROJECT_ROOT, Settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in [
        "MLFLOW_TRACKING_URI",
        "BENTOML_HOME",
        "TABSERVE_DATA_DIR",
        "TABSERVE_MODEL_NAME",
        "TABSERVE_MODEL_TAG",
    ]:
        # setenv first so that teardown restores the original state even after code writes os.environ.
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    return monkeypatch


def test_defaults_live_in_the_project_not_the_working_directory(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_env.chdir(tmp_path)
    settings = Settings(_env_file=None)
    assert settings.tracking_uri == f"sqlite:///{PROJECT_ROOT / 'data' / 'mlflow.db'}"
    assert settings.artifact_location == (PROJECT_ROOT / "data" / "mlartifacts").as_uri()
    assert settings.bentoml_home == Path.home() / "bentoml"
    assert (settings.model_name, settings.model_tag) == ("breast_cancer", None)


def test_prefixed_and_tool_variables_are_honoured(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("TABSERVE_DATA_DIR", str(tmp_path / "d"))
    clean_env.setenv("TABSERVE_MODEL_NAME", "churn")
    clean_env.setenv("BENTOML_HOME", str(tmp_path / "bento"))
    settings = Settings(_env_file=None)
    assert settings.tracking_uri == f"sqlite:///{tmp_path / 'd' / 'mlflow.db'}"
    assert settings.bentoml_home == tmp_path / "bento"
    assert settings.model_name == "churn"
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert Settings(_env_file=None).tracking_uri == "http://mlflow.internal:5000"


def test_dotenv_file_is_read_and_exported_to_the_tools(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(f"BENTOML_HOME={tmp_path / 'b'}\nTABSERVE_MODEL_TAG=churn:v3\n")
    settings = Settings(_env_file=env_file)
    assert settings.model_tag == "churn:v3"
    settings.export_tool_environment()
    assert os.environ["BENTOML_HOME"] == str(tmp_path / "b")
    assert os.environ["MLFLOW_TRACKING_URI"] == settings.tracking_uri
