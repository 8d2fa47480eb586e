# Two commands: `make serve` (set up, train the default model if the store has none, serve) and `make test`.
SHELL := /bin/bash
PORT ?= 3000
UV_VERSION := 0.13.9
UV := $(or $(shell command -v uv 2>/dev/null),.tools/bin/uv)
PY := .venv/bin/python
# Small models on small machines: one OpenMP thread per process, or worker processes fight over the cores.
export OMP_NUM_THREADS ?= 1
# Use the system's CA store, so that PyPI works behind a TLS-intercepting proxy too.
export UV_NATIVE_TLS ?= 1

.PHONY: setup train serve build test lint format clean docs docs-build drift-report simulate drift-bench containerize smoke dashboard loadtest bench bench-quick bench-image bench-swap bench-scorers profile fuzz soak

setup: .venv/.synced

.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/pip install --quiet uv==$(UV_VERSION)

# --compile-bytecode: imports stay fast even where PYTHONDONTWRITEBYTECODE is set.
.venv/.synced: pyproject.toml uv.lock | $(if $(filter .tools/bin/uv,$(UV)),.tools/bin/uv)
	$(UV) sync --frozen --compile-bytecode
	touch $@

train: setup
	$(PY) train.py

serve: setup
	$(PY) train.py --if-missing
	.venv/bin/bentoml serve service:Tabserve --port $(PORT)

# Drift (docs/drift.md): judge the last 24 h of the prediction log; send test traffic (SCENARIO=baseline,
# shift, new-category, missing-spike, concept) to a running `make serve`; the 1M-row measurement.
SCENARIO ?= baseline
drift-report: setup
	$(PY) -m drift report

simulate: setup
	$(PY) -m drift simulate $(SCENARIO) --url http://127.0.0.1:$(PORT) --rows 1000 --batch 50 --rate 500

drift-bench: setup
	$(PY) -m drift bench

# The retraining loop once (docs/lifecycle.md): exit 0 nothing to do or promoted, 1 refused by the gate, 2 cannot
# judge. MODEL=breast_cancer by default; RETRAIN_OPTS, e.g. --force --reason weekly.
.PHONY: retrain
MODEL ?= breast_cancer
retrain: setup
	$(PY) -m lifecycle retrain $(MODEL) $(RETRAIN_OPTS)

# The images' Python requirements, the lock file's exact versions: requirements.txt for the bento (the service
# image: pyproject.toml's dependencies alone), deploy/jobs/requirements.txt for the jobs image (those plus the
# `jobs` group). Committed, so that a plain `bentoml build` works in a fresh clone; remade here whenever
# uv.lock changes, and tests/test_deploy_bento.py fails while either differs from the lock.
requirements.txt: uv.lock | setup
	$(UV) export --frozen --no-default-groups --no-hashes --no-emit-project -o $@ >/dev/null

deploy/jobs/requirements.txt: uv.lock | setup
	$(UV) export --frozen --no-default-groups --group jobs --no-hashes --no-emit-project -o $@ >/dev/null

build: setup requirements.txt
	$(PY) train.py --if-missing
	.venv/bin/bentoml build

# The two images (docs/deployment.md), each tagged with the bento version and `latest`: tabserve, the service
# (the bento), and tabserve-jobs, the same plus the jobs' packages (training, drift reports, retraining,
# MLflow's server, the Evidently UI), built on top of it so that a node pulls only the difference.
# ENGINE=docker|podman; CONTAINERIZE_OPTS for bentoml containerize and JOBS_BUILD_OPTS for the jobs image, e.g.
# behind a TLS-intercepting proxy on podman:
#   CONTAINERIZE_OPTS="--opt volume=/etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro"
#   JOBS_BUILD_OPTS="--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro"
# IMAGE and JOBS_IMAGE name them (the smoke test builds under names of its own).
ENGINE ?= $(if $(shell command -v podman 2>/dev/null),podman,docker)
IMAGE ?= tabserve
JOBS_IMAGE ?= tabserve-jobs
containerize: build deploy/jobs/requirements.txt
	version=$$(.venv/bin/bentoml get tabserve:latest -o json | $(PY) -c 'import json, sys; print(json.load(sys.stdin)["version"])') && \
	.venv/bin/bentoml containerize tabserve:$$version --backend $(ENGINE) -t $(IMAGE):$$version -t $(IMAGE):latest $(CONTAINERIZE_OPTS) && \
	$(ENGINE) build --build-arg SERVICE_IMAGE=$(IMAGE):$$version -t $(JOBS_IMAGE):$$version -t $(JOBS_IMAGE):latest $(JOBS_BUILD_OPTS) deploy/jobs

# Builds the image, runs it as compose and Kubernetes do, calls it, removes what it built (~10 min).
smoke: setup
	$(PY) -m deploy.container.smoke

# Regenerates deploy/compose/grafana/dashboards/tabserve.json from deploy/dashboard.py.
dashboard: setup
	$(PY) -m deploy.dashboard

# Scenario load test of every transport (locust, headless, loopback): starts `bentoml serve` on free ports,
# stops after LOADTEST_TIME; reports in loadtests/results/ (locust.html, locust_*.csv); fails on any error.
LOADTEST_TIME ?= 60s
LOADTEST_USERS ?= 8
loadtest: setup
	$(PY) train.py --if-missing
	$(PY) -m loadtests.run_locust --run-time $(LOADTEST_TIME) --users $(LOADTEST_USERS)

# tabserve vs FastAPI and MLServer with wrk and h2load (apt-get install wrk nghttp2-client), on the default model
# and on a tree model the bench trains into its own stores (loadtests/tree_model.py). bench: ~13 min, rewrites
# BENCHMARKS.md's generated section (targets included) and BENCHMARKS.json. bench-quick: 32 connections, ~3 min.
bench: setup
	$(PY) train.py --if-missing
	$(PY) -m loadtests.bench

bench-quick: setup
	$(PY) train.py --if-missing
	$(PY) -m loadtests.bench --quick

# Each candidate model in-process, compiled scorer against scikit-learn (~2 min); rewrites its section of
# BENCHMARKS.md.
bench-scorers: setup
	$(PY) -m loadtests.scorers --update

# The images' sizes and the service image's cold start beside a bare `bentoml serve` of the same bento (builds
# both images into throwaway stores, as `make smoke`; ~4 min; ENGINE as for containerize); rewrites the image
# section of BENCHMARKS.md.
bench-image: setup
	$(PY) -m loadtests.image --engine $(ENGINE) --update

# 32 connections while `promote` moves the champion, and with the shadow challenger on, each beside steady
# state (own stores in loadtests/results; ~3 min); rewrites the swap section of BENCHMARKS.md.
bench-swap: setup
	$(PY) -m loadtests.swap --update

# The long fuzzing run (~10 min) on a `bentoml serve` of its own (own stores, free loopback ports): Schemathesis
# with every applicable check (>= 20,000 cases), the gRPC fuzzer (>= 5,000 messages), the raw HTTP framing
# cases, the server tree's memory before and after; writes loadtests/results/fuzz.json; fails on any failure.
fuzz: setup
	$(PY) -m loadtests.fuzz

# Every transport together at SOAK_SHARE of its measured peak for SOAK_MINUTES (not in CI): fails on any error,
# resident memory growing over 5% after the warm-up, or a prediction log short of the answered requests;
# figures in loadtests/results/soak.json (~12 min with the defaults).
SOAK_MINUTES ?= 10
SOAK_SHARE ?= 0.7
soak: setup
	$(PY) train.py --if-missing
	$(PY) -m loadtests.soak --minutes $(SOAK_MINUTES) --share $(SOAK_SHARE)

# Where the workers' CPU goes under load (py-spy): TRANSPORT=http|oip-rest|grpc, ROWS=1|1000.
TRANSPORT ?= grpc
ROWS ?= 1
profile: setup
	$(PY) train.py --if-missing
	$(PY) -m loadtests.profile $(TRANSPORT) --rows $(ROWS) --connections $(if $(filter 1,$(ROWS)),32,4)

test: setup
	.venv/bin/pytest

# The documentation site (mkdocs.yml): `docs` serves it with live reload on http://127.0.0.1:8000, `docs-build`
# builds it into site/ and fails on any warning (a broken link or anchor, a page outside the nav), as CI does.
# NO_MKDOCS_2_WARNING: Material's banner about MkDocs 2 on every run, which says nothing about this site.
docs: setup
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs serve --dev-addr 127.0.0.1:8000

docs-build: setup
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir site

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

format: setup
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

# The Open Inference Protocol's gRPC stubs, checked in. They are loaded into a private descriptor pool, not
# protobuf's default one: tritonclient's stubs define the same `inference.*` messages there, and a process
# that imports both (the tests: our server, tritonclient's client) would fail with "duplicate symbol".
.PHONY: proto
proto: setup
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. serving/oip/grpc_predict_v2.proto
	perl -pi -e 's/_descriptor_pool\.Default\(\)\.AddSerializedFile\(/_descriptor_pool.DescriptorPool().AddSerializedFile(/' \
		serving/oip/grpc_predict_v2_pb2.py
	grep -q '_descriptor_pool.DescriptorPool().AddSerializedFile(' serving/oip/grpc_predict_v2_pb2.py

clean:
	rm -rf .venv .tools .pytest_cache .ruff_cache .mypy_cache loadtests/.mlserver-venv
