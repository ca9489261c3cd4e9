# medray on a rayproject/ray image; the same image runs Ray heads, workers, RayJobs and the
# RayService, on VMs (cluster/aws-gpu.yaml) or Kubernetes (kuberay/).
#   GPU: docker build -t YOUR-REGISTRY/medray:0.1.0-gpu .
#   CPU: docker build --build-arg BASE_TAG=2.60.0-py311-cpu \
#          --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t medray:cpu .
ARG BASE_TAG=2.60.0-py311-gpu
FROM rayproject/ray:${BASE_TAG}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
WORKDIR /home/ray/medray

# torch first, from the index that matches the image's CUDA (or the CPU index), then pinned,
# so nothing below can swap in another multi-GB build.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
 && python -c "import torch; print('torch==' + torch.__version__)" > /home/ray/torch-constraint.txt

# Dependencies before the code, so a code change does not reinstall them.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users medray/__init__.py medray/__init__.py
RUN pip install --no-cache-dir -c /home/ray/torch-constraint.txt . && pip uninstall -y medray

COPY --chown=ray:users medray medray
RUN pip install --no-cache-dir --no-deps -c /home/ray/torch-constraint.txt .
# Entrypoints and manifests at fixed paths: RayJobs run `python jobs/train.py manifests/...`
# from this directory.
COPY --chown=ray:users jobs jobs
COPY --chown=ray:users manifests manifests

# vLLM in an environment of its own: its torch and transformers pins sit below medray's.
# Ray starts the vLLM actors with its interpreter (MEDRAY_VLLM_PYTHON), so it holds the same
# Ray, and medray with its dependencies under vLLM's pins. Empty VLLM_SPEC: no vLLM (CPU images: `make vllm`
# shows the CPU build's set-up).
ARG VLLM_SPEC="vllm==0.29.0"
RUN if [ -n "$VLLM_SPEC" ]; then \
      python -m venv /home/ray/vllm \
   && /home/ray/vllm/bin/pip install --no-cache-dir "$VLLM_SPEC" . \
        "ray[data,serve,train]==$(python -c 'import ray; print(ray.__version__)')" ; fi
ENV TOKENIZERS_PARALLELISM=false \
    MEDRAY_CACHE_DIR=/home/ray/.cache/medray \
    MEDRAY_VLLM_PYTHON=/home/ray/vllm/bin/python
