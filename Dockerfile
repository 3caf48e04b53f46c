# megatron-m2 on an NVIDIA NGC PyTorch image, which already carries CUDA, NCCL, torch, TransformerEngine and apex.
#   docker build -t megatron-m2:latest .
#   enroot import -o megatron-m2.sqsh dockerd://megatron-m2:latest     # for Slurm + pyxis (examples/slurm/)
# Bump the base with --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:<yy.mm>-py3; NGC images >= 25.01 ship
# Python 3.12; pip takes the newest megatron-core in the range setup.py pins (0.16.x; see there why).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # megatron-core overlaps tensor-parallel communication with compute only with a single CUDA stream queue
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /workspace/megatron-m2
COPY . .

# The container's torch, TransformerEngine and apex are built against its CUDA: pin every package already installed
# under those names so pip can only add megatron-core and our dependencies around them, never replace them. The
# editable install lets a Slurm job mount a newer checkout over this directory (examples/slurm/pretrain_m2.sbatch).
RUN pip list --format=freeze \
      | grep -iE '^(torch|torchvision|transformer[-_]engine[^=]*|apex|numpy|nvidia-[^=]+|pytorch-triton|triton)==' \
      > /tmp/container-constraints.txt \
 && python -c 'import torch; print(torch.__version__)' > /tmp/torch-before.txt \
 && pip install --no-cache-dir --no-build-isolation -c /tmp/container-constraints.txt -e ".[hf]" \
 && python -c 'import torch; print(torch.__version__)' | cmp - /tmp/torch-before.txt \
 && python -c 'import megatron.core, megatron_m2.config; print("megatron-core", megatron.core.__version__)' \
 && rm /tmp/container-constraints.txt /tmp/torch-before.txt

# No ENTRYPOINT of our own: the base image's (/opt/nvidia/nvidia_entrypoint.sh) prints the NVIDIA banner and execs
# the command; pyxis (srun --container-image) skips entrypoints unless asked. Training is always started explicitly.
CMD ["bash"]
