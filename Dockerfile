# megatron_patch on NVIDIA's NGC PyTorch image (CUDA, NCCL, apex, Transformer Engine), or, with
# --target cpu, on plain Python 3.11 for machines without GPUs (README, "Docker").
#
#   docker build -t megatron-patch .                          # GPU image (NGC)
#   docker build -t megatron-patch:cpu --target cpu .         # CPU image
#   docker run --rm megatron-patch:cpu bash docker/build_check.sh
#
# The CPU stage comes first: the legacy builder (a docker client without buildx) builds every
# stage up to the target, so a CPU build never looks up the NGC image. BuildKit builds only what
# the target needs. No "# syntax=" line: an offline machine cannot pull a Dockerfile frontend.
#
# Build arguments (all optional):
#   CPU_IMAGE       the CPU base: Debian-based, Python 3.11 (docker/base_image.sh makes one from
#                   Debian's packages where no registry is reachable)
#   NGC_IMAGE       the NGC PyTorch tag (Python 3.12). Our choice, not checked here (no registry
#                   access): take one whose Transformer Engine is in 2.9-2.11, the range
#                   megatron-core 0.16.1 is tested with (install.sh prints the versions).
#   WHEEL_DIR       a directory inside the build context with wheels pip may use (CPU image: the
#                   torch 2.13.0 CPU wheel, else torch comes from TORCH_INDEX_URL). Its files stay
#                   in the image's source layer; keep only what the build needs in it.
#   CA_BUNDLE       a PEM file inside the build context, added to the image's trusted CAs (a site
#                   whose HTTPS proxy re-signs certificates); stays trusted when the image runs
#   PIP_INDEX_URL   the package index pip uses (default PyPI); TORCH_INDEX_URL: where the CPU
#                   image's torch comes from without a wheel (default PyTorch's CPU index)
#   HTTP_PROXY, HTTPS_PROXY, NO_PROXY: Docker passes these to the build when given
ARG CPU_IMAGE=python:3.11-slim-bookworm
ARG NGC_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3

FROM ${CPU_IMAGE} AS cpu
ARG WHEEL_DIR="" CA_BUNDLE="" PIP_INDEX_URL TORCH_INDEX_URL
# The venv sits where tools/setup_env.sh and examples/quickstart.sh expect it (.venv). HOME is
# writable by any user, so `docker run --user "$(id -u):$(id -g)"` works (caches, compiled kernels).
ENV VENV=/workspace/megatron_patch/.venv HOME=/workspace/home LANG=C.UTF-8 PYTHONUNBUFFERED=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
ENV PYTHON=${VENV}/bin/python PATH=${VENV}/bin:${PATH}
WORKDIR /workspace/megatron_patch
COPY . .
RUN bash docker/install.sh --variant cpu --wheel-dir "${WHEEL_DIR}" --ca-bundle "${CA_BUNDLE}" --any-user
CMD ["bash"]

FROM ${NGC_IMAGE} AS gpu
ARG WHEEL_DIR="" CA_BUNDLE="" PIP_INDEX_URL
ENV PYTHON=python3 HOME=/workspace/home PYTHONUNBUFFERED=1
WORKDIR /workspace/megatron_patch
COPY . .
RUN bash docker/install.sh --variant gpu --wheel-dir "${WHEEL_DIR}" --ca-bundle "${CA_BUNDLE}" --any-user
CMD ["bash"]
