"""Container smoke test: build the images as docs/deployment.md says, run them, call them as users do.

    .venv/bin/python -m deploy.container.smoke                  # podman if installed, else docker
    .venv/bin/python -m deploy.container.smoke --engine docker

Steps, each timed:
1. the guide's build block into a throwaway store (`make build`: the default model, the bento; `make
   containerize`: the service image, then the jobs image on top of it) under image names of this run; the
   service image exposes 3000 and 3001, neither image runs as root nor holds a compiler, git, curl or wget;
   their sizes are printed;
2. run the service image on free loopback ports (--network host), with a named volume at /var/lib/tabserve
   as the compose stack does, and check /readyz, GET /model, POST /predict, /explain, a bad request (400),
   OIP REST, OIP gRPC ModelInfer, /metrics, that no process runs as root and that the prediction log is on
   the volume;
3. the guide's `run`, `jobs` and `hardened` blocks, as written but for names and ports (deploy/guide.py);
4. run the service image again as Kubernetes does (deploy/k8s: read-only root, writable /tmp only, uid 1034,
   its own prediction-log folder, the API keys mounted as its Secret is): no key gets 401, the key predicts
   and explains;
5. run the compose file's `drift` service environment from the jobs image on the same volume: the model
   and the log are visible, and `python -m drift report` judges the logged rows and writes latest.json and
   a snapshot; then deploy/k8s's drift and retrain CronJob commands, read-only as there;
6. run the compose file's `mlflow` and `evidently-ui` commands from the jobs image and call them (the UI
   lists the snapshot of step 5), and check that the running service exports the report as tabserve_drift_*;
7. stop the service with SIGTERM and check it exits cleanly within the grace period.

Everything it creates (containers, volumes, images, bento store) is removed at the end: on success, on
failure, on Ctrl-C and on SIGTERM. Needs podman or Docker, python:3.11-slim pullable or already present
(machines without registry access prepare a local stand-in first: see docs/deployment.md), and kubectl
(`kubectl kustomize` renders deploy/k8s).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deploy import guide
from deploy.container import probes
from deploy.manifests import ManifestError, kustomize
from serving import auth

PROJECT_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = PROJECT_ROOT / "deploy" / "compose" / "compose.yaml"
JOBS_CONTEXT = PROJECT_ROOT / "deploy" / "jobs"
# service.py's SERVICE_IMAGE.base_image, fully qualified: only its size is read.
BASE_IMAGE = "docker.io/library/python:3.11-slim"
BIN = Path(sys.executable).parent
STATE_DIR = "/var/lib/tabserve"
# Where a TLS-intercepting proxy's CA lives on Debian hosts; podman mounts it into build steps only, so
# apt and uv inside the build trust what the host trusts. Harmless where there is no proxy.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class SmokeError(RuntimeError):
    pass


@dataclass
class Timings:
    steps: list[tuple[str, float]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        print(f"==> {name}", flush=True)
        begun = time.monotonic()
        try:
            yield
        finally:
            self.steps.append((name, time.monotonic() - begun))
            print(f"    {time.monotonic() - begun:.1f} s", flush=True)

    def report(self) -> str:
        lines = [f"  {seconds:7.1f} s  {name}" for name, seconds in self.steps]
        lines.append(f"  {time.monotonic() - self.started:7.1f} s  total")
        return "\n".join(lines)


def run(
    command: list[str], *, env: dict[str, str] | None = None, cwd: Path = PROJECT_ROOT, timeout: float = 1800
) -> str:
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-6000:]
        raise SmokeError(f"{' '.join(command[:4])} ... failed ({result.returncode}):\n{output}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def store_env(work: Path) -> dict[str, str]:
    """This process's environment with a throwaway MLflow and BentoML store, nothing else of ours."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TABSERVE_")}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(
        TABSERVE_DATA_DIR=str(work / "data"),
        BENTOML_HOME=str(work / "bentoml"),
        OMP_NUM_THREADS="1",
        BENTOML_DO_NOT_TRACK="true",
        UV_NATIVE_TLS="1",
    )
    return env


def compose_service(name: str) -> dict[str, Any]:
    """A service of the compose file as compose reads it (anchors merged, ${VARIABLES} substituted)."""
    # --dry-run: podman-compose only parses; no podman needed.
    config = run([str(BIN / "podman-compose"), "--dry-run", "-f", str(COMPOSE_FILE), "config"])
    service: dict[str, Any] = yaml.safe_load(config)["services"][name]
    return service


def on_loopback(command: list[str], port: int) -> list[str]:
    """A compose command with its --host/--port replaced: loopback and a free port (host network)."""
    result: list[str] = []
    replace_next: str | None = None
    for argument in command:
        if replace_next is not None:
            result.append(replace_next)
            replace_next = None
        elif argument in ("--host", "--port"):
            result.append(argument)
            replace_next = "127.0.0.1" if argument == "--host" else str(port)
        elif argument.startswith(("--host=", "--port=")):
            flag = argument.split("=", 1)[0]
            result.append(f"{flag}={'127.0.0.1' if flag == '--host' else port}")
        else:
            result.append(argument)
    return result


class Engine:
    """The container engine's CLI, and everything this run created with it, for the cleanup."""

    def __init__(self, name: str, run_id: str) -> None:
        self.name = name
        self.run_id = run_id
        self.containers: list[str] = []
        self.volumes: list[str] = []
        self.images: list[str] = []

    def __call__(self, *args: str, timeout: float = 600) -> str:
        return run([self.name, *args], timeout=timeout).strip()

    @property
    def volume_name(self) -> str:
        return f"tabserve-smoke-{self.run_id}"

    def volume(self) -> str:
        self("volume", "create", self.volume_name)
        self.volumes.append(self.volume_name)
        return self.volume_name

    def start(self, role: str, image: str, options: list[str], command: list[str]) -> str:
        """A detached container on the host network (the service binds loopback ports we chose)."""
        name = f"tabserve-smoke-{self.run_id}-{role}"
        self.containers.append(name)
        self("run", "-d", "--name", name, "--network", "host", *options, image, *command)
        return name

    def running(self, container: str) -> bool:
        try:
            return self("inspect", "--format", "{{.State.Running}}", container) == "true"
        except SmokeError:
            return False

    def logs(self, container: str) -> str:
        try:
            return run([self.name, "logs", "--tail", "60", container], timeout=30)
        except SmokeError as error:
            return str(error)

    def remove(self, container: str) -> None:
        """Kill and remove; twice if needed: podman 4.3 fails a removal when the container exits
        on its own between its stop and its kill ("container state improper")."""
        for _ in range(2):
            removal = subprocess.run(
                [self.name, "rm", "-f", "-t", "0", container], capture_output=True, check=False
            )
            if removal.returncode == 0:
                return

    def cleanup(self) -> None:
        for container in reversed(self.containers):
            self.remove(container)
        for volume in self.volumes:
            subprocess.run([self.name, "volume", "rm", "-f", volume], capture_output=True, check=False)
        for image in self.images:
            subprocess.run([self.name, "rmi", "-f", image], capture_output=True, check=False)


@dataclass(frozen=True)
class Images:
    service: str  # the bento's image: `bentoml serve`
    jobs: str  # the service image plus the jobs' packages: drift, lifecycle, mlflow server, evidently ui


def build_images(engine: Engine, work: Path, timings: Timings) -> Images:
    """The guide's build block (`make build`: the default model trained into a throwaway store, the bento;
    `make containerize`: both images), under image names of this run (the Makefile's IMAGE and JOBS_IMAGE)."""
    env = store_env(work)
    names = Images(
        f"localhost/tabserve-smoke-{engine.run_id}", f"localhost/tabserve-smoke-jobs-{engine.run_id}"
    )
    env.update(IMAGE=names.service, JOBS_IMAGE=names.jobs, ENGINE=engine.name)
    if engine.name == "podman" and HOST_CA_BUNDLE.exists():
        env["CONTAINERIZE_OPTS"] = f"--opt volume={HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"
        env["JOBS_BUILD_OPTS"] = f"--volume {HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"
    # Both tags of both images, for the cleanup, whatever fails from here on.
    engine.images += [f"{name}:latest" for name in (names.service, names.jobs)]
    with timings.step(
        f"docs/deployment.md's build: make build (trains), make containerize ({engine.name}), both images"
    ):
        run(["bash", "-e", "-c", guide.block("smoke", "build").text], env=env, timeout=2400)
    bento = json.loads(run([str(BIN / "bentoml"), "get", "tabserve:latest", "-o", "json"], env=env))
    version = bento["version"]
    engine.images += [f"{name}:{version}" for name in (names.service, names.jobs)]
    return Images(f"{names.service}:{version}", f"{names.jobs}:{version}")


# What an image that installs wheels only needs none of: compilers, build tools, version control, downloaders.
BUILD_TOOLS = ("gcc", "cc", "c++", "g++", "make", "ld", "git", "curl", "wget")


def check_images(engine: Engine, images: Images) -> None:
    exposed = engine("image", "inspect", "--format", "{{json .Config.ExposedPorts}}", images.service)
    probes.expect(
        "3000/tcp" in exposed and "3001/tcp" in exposed, f"image exposes {exposed}, not 3000 and 3001"
    )
    for image in (images.service, images.jobs):
        user = engine("image", "inspect", "--format", "{{.Config.User}}", image)
        probes.expect(user not in ("", "root", "0"), f"{image}: image user is {user!r}")
        look_for_tools = f"for tool in {' '.join(BUILD_TOOLS)}; do command -v $tool || true; done"
        found = engine("run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c", look_for_tools)
        probes.expect(not found, f"{image} holds build tools: {found.split()}")
    sizes = ", ".join(
        f"{name} {image_megabytes(engine, image):,.0f} MB"
        for name, image in (("base", BASE_IMAGE), ("service", images.service), ("jobs", images.jobs))
    )
    print(f"    sizes ({engine.name} image inspect): {sizes}")


def image_megabytes(engine: Engine, image: str) -> float:
    return int(engine("image", "inspect", "--format", "{{.Size}}", image)) / 1e6


def check_not_root(engine: Engine, container: str) -> None:
    """Every process of the container (the server and its workers) runs as a non-root uid."""
    uids = engine("exec", container, "sh", "-c", "grep -h '^Uid:' /proc/[0-9]*/status | awk '{print $2}'")
    found = set(uids.split())
    probes.expect(bool(found) and "0" not in found, f"process uids in the container: {sorted(found)}")
    print(f"    process uids: {sorted(found)}")


def check_log_on_volume(engine: Engine, container: str, folder: str) -> None:
    # The log is written by a background thread: give it a moment.
    deadline = time.monotonic() + 15
    listing = ""
    while time.monotonic() < deadline:
        listing = engine(
            "exec", container, "sh", "-c", f"ls {folder}/predictions-*.arrows 2>/dev/null || true"
        )
        if listing:
            return
        time.sleep(0.5)
    raise probes.ProbeError(f"no prediction log in {folder} on the volume")


def serve(engine: Engine, image: str, volume: str, timings: Timings) -> tuple[str, str]:
    port, grpc_port = free_port(), free_port()
    url, target = f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
    options = ["-v", f"{volume}:{STATE_DIR}", "-e", "TABSERVE_GRPC_HOST=127.0.0.1"]
    options += ["-e", f"TABSERVE_GRPC_PORT={grpc_port}"]
    container = engine.start("serve", image, options, ["--host", "127.0.0.1", "--port", str(port)])
    try:
        with timings.step("service ready (/readyz)"):
            probes.wait_ready(url, 180, lambda: engine.running(container))
        with timings.step("HTTP, /explain, OIP REST, gRPC, a bad request, /metrics, user, prediction log"):
            info = probes.model_info(url)
            record = probes.record_from_schema(info)
            prediction = probes.check_predict(url, info, record)
            print(f"    /predict -> {prediction!r} from {info['model']}:{info['version']}")
            probes.check_explain(url, record, prediction)
            probes.check_bad_request(url, record)
            probes.check_oip_rest(url, info, record, prediction)
            probes.check_grpc(target, info, record, prediction)
            probes.check_metrics(url)
            check_not_root(engine, container)
            # Rows for the drift report of step 5.
            probes.check_predict_batch(url, probes.records_from_schema(info, 60))
            check_log_on_volume(engine, container, f"{STATE_DIR}/predictions")
    except Exception:
        print(engine.logs(container), file=sys.stderr)
        raise
    return container, url


# The guide's blocks `<!-- run: smoke NAME -->` that run_guide runs (its `build` block is build_images').
GUIDE_RUN_BLOCKS = ("run", "jobs", "hardened")


def as_smoke_runs_it(
    text: str, engine: Engine, images: Images, container: str, ports: tuple[int, int]
) -> str:
    """A block of docs/deployment.md with this run's engine, images, volume, container name and free loopback
    ports in place of the guide's `docker`, `tabserve:latest`, `tabserve-jobs:latest`, `tabserve-data`,
    `tabserve` and 3000/3001."""
    port, grpc_port = ports
    for pattern, replacement in (
        (r"\bdocker\b", engine.name),
        (r"\btabserve-jobs:latest\b", images.jobs),
        (r"\btabserve:latest\b", images.service),
        (r"\btabserve-data\b", f"{engine.volume_name}-guide"),
        (r"--name tabserve\b", f"--name {container}"),
        (r"\b(stop -t \d+) tabserve\b", rf"\1 {container}"),
        (r"-p 3000:3000", f"-p 127.0.0.1:{port}:3000"),
        (r"-p 3001:3001", f"-p 127.0.0.1:{grpc_port}:3001"),
        (r"\blocalhost:3000\b", f"127.0.0.1:{port}"),
    ):
        text = re.sub(pattern, replacement, text)
    return text


def run_guide(engine: Engine, images: Images, record: dict[str, Any], work: Path, timings: Timings) -> None:
    """docs/deployment.md's run, jobs and hardened blocks, as written but for names and ports (bash -e: the
    first command that fails, a `curl -f` on an error status included, fails the block)."""
    (work / "record.json").write_text(json.dumps(record))
    engine.volumes.append(f"{engine.volume_name}-guide")  # the run block creates it
    ports = (free_port(), free_port())
    expected = {"run": ('"prediction"', "tabserve_predictions_total"), "jobs": ("report", "retrain")}
    for name in GUIDE_RUN_BLOCKS:
        with timings.step(f"docs/deployment.md's `{name}` block, as written"):
            container = f"tabserve-smoke-{engine.run_id}-{name}"
            engine.containers.append(container)  # if the block starts one
            text = as_smoke_runs_it(guide.block("smoke", name).text, engine, images, container, ports)
            output = run(["bash", "-e", "-c", text], cwd=work, timeout=300)
            for needle in expected.get(name, ()):
                probes.expect(
                    needle in output, f"the guide's `{name}` block printed no {needle}:\n{output[-2000:]}"
                )
            print("\n".join(f"    {line[:110]}" for line in output.strip().splitlines()[-3:]))
            engine.remove(container)


def kubernetes_api_keys(work: Path) -> tuple[Path, str]:
    """A folder laid out as Kubernetes mounts deploy/k8s's Secret tabserve-api-keys (one file per key of the
    Secret, here `keys`), holding the line of a new key; and that key."""
    folder = work / "api-keys"
    folder.mkdir()
    raw_key = auth.KEY_PREFIX + secrets.token_urlsafe(32)
    (folder / "keys").write_text(f"smoke:{auth.digest_of(raw_key).hex()}:predict\n")
    folder.chmod(0o755)  # read by the container's uid 1034, as the Secret's defaultMode lets it
    (folder / "keys").chmod(0o644)
    return folder, raw_key


def serve_like_kubernetes(engine: Engine, image: str, volume: str, work: Path, timings: Timings) -> None:
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    folder = f"{STATE_DIR}/predictions/pod-a"
    keys, raw_key = kubernetes_api_keys(work)
    deployment = kubernetes_deployment_env()
    # The settings of deploy/k8s/base/deployment.yaml that differ from a plain `run`, its API keys included.
    options = ["--read-only", "--tmpfs", "/tmp", "--user", "1034:1034", "-v", f"{volume}:{STATE_DIR}"]
    options += ["-v", f"{keys}:{deployment['TABSERVE_AUTH_KEYS_FILE']}:ro"]
    options += ["-e", f"TABSERVE_AUTH_KEYS_FILE={deployment['TABSERVE_AUTH_KEYS_FILE']}"]
    options += ["-e", "BENTOML_HOME=/tmp/bentoml", "-e", f"TABSERVE_PREDICTION_LOG_DIR={folder}"]
    options += ["-e", "TABSERVE_GRPC_HOST=127.0.0.1", "-e", f"TABSERVE_GRPC_PORT={grpc_port}"]
    container = engine.start("k8s", image, options, ["--host", "127.0.0.1", "--port", str(port)])
    key = {"Authorization": f"Bearer {raw_key}"}
    try:
        with timings.step("as deploy/k8s runs it: read-only root, /tmp, uid 1034, own log folder, API keys"):
            probes.wait_ready(url, 180, lambda: engine.running(container))  # probes need no key
            info = probes.model_info(url, key)
            probes.check_refused_without_key(url, probes.record_from_schema(info))
            record = probes.record_from_schema(info)
            probes.check_explain(url, record, probes.check_predict(url, info, record, key), key)
            # Rows for the CronJob's drift report (check_kubernetes_drift_job).
            probes.check_predict_batch(url, probes.records_from_schema(info, 60), key)
            check_log_on_volume(engine, container, folder)
    except Exception:
        print(engine.logs(container), file=sys.stderr)
        raise
    engine.remove(container)


DRIFT_ENVIRONMENT_CHECK = """
from settings import get_settings
from drift.logs import find_log_files
from models.registry import served_model
settings = get_settings()
model = served_model(settings)[0]
rows = len(model.load_reference())
logs = find_log_files(settings.log_dir)
assert logs, f"no prediction log in {settings.log_dir}"
print(f"drift job sees {model.tag} ({rows} reference rows) and {len(logs)} log file(s)")
"""
# Exit codes of `python -m drift report`: 0 no drift, 1 drift, 2 cannot judge.
DRIFT_VERDICTS = (0, 1)


def check_drift_job(engine: Engine, image: str, volume: str, timings: Timings) -> None:
    service = compose_service("drift")
    options = ["--rm", "--network", "none", "-v", f"{volume}:{STATE_DIR}", "-w", service["working_dir"]]
    for key, value in service["environment"].items():
        options += ["-e", f"{key}={value}"]
    with timings.step("drift job (compose service `drift`): environment, then one report"):
        print("    " + engine("run", *options, image, "python", "-c", DRIFT_ENVIRONMENT_CHECK, timeout=300))
        # What the schedule runs every hour, once.
        run_drift_report(engine, [*options, image, "python", "-m", "drift", "report"])
        latest = engine("run", *options, image, "sh", "-c", f"cat {STATE_DIR}/reports/*/latest.json")
        probes.expect('"drift_share"' in latest, f"no latest.json on the volume after the report: {latest}")


def run_drift_report(engine: Engine, arguments: list[str]) -> None:
    result = subprocess.run(
        [engine.name, "run", *arguments], capture_output=True, text=True, timeout=600, check=False
    )
    print("\n".join(f"    {line}" for line in result.stdout.strip().splitlines()[-6:]))
    probes.expect(
        result.returncode in DRIFT_VERDICTS,
        f"the drift report exited {result.returncode}:\n{(result.stdout + result.stderr)[-3000:]}",
    )


@functools.cache
def kubernetes_base() -> list[dict[str, Any]]:
    """deploy/k8s/base as `kubectl kustomize` renders it (once: its settings are read by several steps)."""
    return kustomize(PROJECT_ROOT / "deploy" / "k8s" / "base")


def kubernetes_resource(kind: str, name: str | None = None) -> dict[str, Any]:
    return next(
        item
        for item in kubernetes_base()
        if item["kind"] == kind and name in (None, item["metadata"]["name"])
    )


def plain_env(container: dict[str, Any]) -> dict[str, str]:
    """A container's environment variables that have a value (not those from a Secret or a field)."""
    return {item["name"]: item["value"] for item in container["env"] if "value" in item}


def kubernetes_deployment_env() -> dict[str, str]:
    """The environment that deploy/k8s/base's Deployment gives the service's container."""
    return plain_env(kubernetes_resource("Deployment")["spec"]["template"]["spec"]["containers"][0])


def kubernetes_cronjob(name: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A CronJob's container in deploy/k8s/base, and its environment with the ConfigMap's values."""
    config = kubernetes_resource("ConfigMap")["data"]
    cronjob = kubernetes_resource("CronJob", name)
    container = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    return container, {**config, **plain_env(container)}


def as_kubernetes_cronjob(name: str, volume: str) -> tuple[list[str], list[str]]:
    """The run options and command of deploy/k8s's CronJob `name`: read-only root, /tmp, uid 1034, offline."""
    container, env = kubernetes_cronjob(name)
    options = ["--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp", "--user", "1034:1034"]
    options += ["-v", f"{volume}:{STATE_DIR}", "-w", container["workingDir"]]
    for key, value in env.items():
        options += ["-e", f"{key}={value}"]
    return options, container["args"]


def check_kubernetes_jobs(engine: Engine, image: str, volume: str, timings: Timings) -> None:
    """deploy/k8s's CronJobs, as Kubernetes would run them from the jobs image."""
    with timings.step("drift CronJob of deploy/k8s: read-only root, every pod's log folder"):
        options, command = as_kubernetes_cronjob("tabserve-drift", volume)
        run_drift_report(engine, [*options, image, *command])
    with timings.step("retrain CronJob of deploy/k8s: read-only root, its store on the volume"):
        options, command = as_kubernetes_cronjob("tabserve-retrain", volume)
        result = subprocess.run(
            [engine.name, "run", *options, image, *command],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        output = (result.stdout + result.stderr).strip()
        print("\n".join(f"    {line}" for line in output.splitlines()[-4:]))
        # 0 nothing to do or promoted, 1 refused by the gate, 2 cannot judge: each an answer, not a crash.
        probes.expect(
            result.returncode in (0, 1, 2) and "Traceback" not in output,
            f"the retrain job exited {result.returncode}:\n{output[-3000:]}",
        )


def start_compose_tools(engine: Engine, image: str, volume: str) -> dict[str, tuple[str, int]]:
    """The compose file's mlflow and evidently-ui commands, from the image, on free loopback ports."""
    started: dict[str, tuple[str, int]] = {}
    for name in ("mlflow", "evidently-ui"):
        port = free_port()
        command = on_loopback(compose_service(name)["command"], port)
        container = engine.start(name, image, ["-v", f"{volume}:{STATE_DIR}"], command)
        started[name] = (container, port)
    return started


def check_compose_tools(engine: Engine, started: dict[str, tuple[str, int]], timings: Timings) -> None:
    with timings.step("compose `mlflow` and `evidently-ui` from the image"):
        container, port = started["mlflow"]
        try:
            probes.wait_http_ok(f"http://127.0.0.1:{port}/health", 180)
            # Other compose services reach MLflow by its service name; --allowed-hosts must accept it.
            probes.wait_http_ok(
                f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1",
                30,
                headers={"Host": "mlflow:5000"},
            )
        except probes.ProbeError:
            print(engine.logs(container), file=sys.stderr)
            raise
        container, port = started["evidently-ui"]
        try:
            probes.wait_http_ok(f"http://127.0.0.1:{port}/api/projects", 180)
            probes.check_evidently_project(f"http://127.0.0.1:{port}")
        except probes.ProbeError:
            print(engine.logs(container), file=sys.stderr)
            raise


def check_graceful_stop(engine: Engine, container: str, timings: Timings) -> None:
    """SIGTERM, then the time Kubernetes would give the pod (deploy/k8s) before killing it."""
    deployment = kubernetes_resource("Deployment")
    grace = int(deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])
    with timings.step("SIGTERM: the service drains and exits"):
        begun = time.monotonic()
        engine("stop", "-t", str(grace), container, timeout=grace + 30)
        took = time.monotonic() - begun
        code = engine("inspect", "--format", "{{.State.ExitCode}}", container)
        probes.expect(code == "0", f"the service exited with {code} after SIGTERM")
        probes.expect(took < grace, f"the service took {took:.0f} s to stop")


def smoke(engine: Engine, timings: Timings) -> None:
    work = Path(tempfile.mkdtemp(prefix="tabserve-smoke-", dir=os.environ.get("SMOKE_WORK_DIR", "/var/tmp")))
    try:
        images = build_images(engine, work, timings)
        check_images(engine, images)
        volume = engine.volume()
        container, url = serve(engine, images.service, volume, timings)
        run_guide(engine, images, probes.record_from_schema(probes.model_info(url)), work, timings)
        # MLflow and the Evidently UI start while the rest runs: on two cores every second counts.
        tools = start_compose_tools(engine, images.jobs, volume)
        serve_like_kubernetes(engine, images.service, volume, work, timings)
        check_drift_job(engine, images.jobs, volume, timings)
        check_kubernetes_jobs(engine, images.jobs, volume, timings)
        check_compose_tools(engine, tools, timings)
        check_drift_gauges(url, timings)
        check_graceful_stop(engine, container, timings)
    finally:
        with timings.step("clean up containers, volume, image, bento store"):
            engine.cleanup()
            shutil.rmtree(work, ignore_errors=True)


def check_drift_gauges(url: str, timings: Timings) -> None:
    """The service exports the report the drift job wrote on the shared volume (it re-reads it every 30 s)."""
    with timings.step("the service exports the drift report's gauges"):
        deadline = time.monotonic() + 60
        gauges: list[str] = []
        while time.monotonic() < deadline:
            gauges = [line for line in probes.metric_lines(url) if line.startswith("tabserve_drift_share")]
            if gauges:
                print(f"    {gauges[0]}")
                return
            time.sleep(2)
        raise probes.ProbeError("no tabserve_drift_share on /metrics 60 s after the drift report")


def main() -> int:
    parser = argparse.ArgumentParser(description="Build, run and call the service's container image.")
    default_engine = "podman" if shutil.which("podman") else "docker"
    parser.add_argument("--engine", choices=["podman", "docker"], default=default_engine)
    args = parser.parse_args()
    for tool in (args.engine, "kubectl"):  # kubectl renders deploy/k8s, whose settings the runs copy
        if shutil.which(tool) is None:
            print(f"smoke: {tool} is not installed", file=sys.stderr)
            return 2

    # SIGTERM (CI cancelling the job) unwinds like Ctrl-C, so the cleanup in `finally` runs.
    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    engine = Engine(args.engine, uuid.uuid4().hex[:8])
    timings = Timings()
    try:
        smoke(engine, timings)
    except (SmokeError, probes.ProbeError, ManifestError) as error:
        print(f"\nsmoke test FAILED: {error}", file=sys.stderr)
        print(timings.report(), file=sys.stderr)
        return 1
    print(f"\nsmoke test passed\n{timings.report()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
