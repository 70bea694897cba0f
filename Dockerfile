# megatron_patch on NVIDIA's NGC PyTorch image (CUDA, NCCL, apex, Transformer Engine), or, with
# --build-arg VARIANT=cpu, on plain Python 3.11 for machines without GPUs.
#
#   docker build -t megatron-patch .                                # GPU image (NGC)
#   docker build -t megatron-patch:cpu --build-arg VARIANT=cpu .    # CPU image
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 --rm -it \
#       -v /data:/data -v /runs:/runs megatron-patch \
#       bash examples/paper/pretrain.sh --size 350m --method scaled_embed --run-dir /runs/350m-se
#
# Build arguments:
#   VARIANT      gpu (default) or cpu
#   NGC_IMAGE    the NGC PyTorch tag (Python 3.12). Our choice, not checked here (no registry
#                access). The image installs the newest megatron-core 0.19.x, whose release
#                branch's CI pins Transformer Engine 2.17.1 (pyproject.toml: TE git 4329ff84); its
#                `te` extra names no bound and its code gates features on TE >= 1.13 .. 2.14: take
#                a tag with TE 2.17 (install.sh prints the versions).
#   CPU_IMAGE    the CPU base (Python 3.11, like the development machines)
#   BUILD_CHECK  1 (default): run docker/build_check.sh (CPU unit tests, a paper dry run) in the
#                build; 0 to skip (then: docker run --rm IMAGE bash docker/build_check.sh)
ARG VARIANT=gpu
ARG NGC_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
ARG CPU_IMAGE=python:3.11-slim-bookworm

FROM ${NGC_IMAGE} AS base-gpu
ENV PYTHON=python3

FROM ${CPU_IMAGE} AS base-cpu
ENV VENV=/opt/venv PYTHON=/opt/venv/bin/python PATH=/opt/venv/bin:${PATH}

# hadolint ignore=DL3006
FROM base-${VARIANT}
ARG VARIANT
ARG BUILD_CHECK=1
ENV PYTHONUNBUFFERED=1
WORKDIR /workspace/megatron_patch
COPY . .
RUN bash docker/install.sh --variant "${VARIANT}"
RUN if [ "${BUILD_CHECK}" = 1 ]; then bash docker/build_check.sh; fi
CMD ["bash"]
