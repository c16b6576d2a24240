# csm with its server and Ray Serve, from this checkout.
#   docker build -t csm:cpu .                              # CPU
#   docker build --build-arg VARIANT=cuda -t csm:cuda .    # NVIDIA GPUs (the host's driver, via the NVIDIA container toolkit)
#   docker run -p 8000:8000 csm:cpu csm serve --host 0.0.0.0
# The same image is what KubeRay runs (deploy/kubernetes/rayservice.yaml): it starts `ray start` in it.
FROM python:3.11-slim
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# PyTorch's own wheel index for each variant; the CUDA wheels carry their CUDA libraries.
ARG CUDA_INDEX=https://download.pytorch.org/whl/cu128
RUN case "$VARIANT" in \
        cpu) index=https://download.pytorch.org/whl/cpu ;; \
        cuda) index="$CUDA_INDEX" ;; \
        *) echo "VARIANT must be cpu or cuda, got $VARIANT" >&2; exit 1 ;; \
    esac \
    && pip install --no-cache-dir --index-url "$index" "torch==$TORCH_VERSION"
WORKDIR /opt/csm
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir '.[serve,ray]'
RUN useradd --create-home --uid 1000 csm && mkdir -p /var/cache/huggingface /mnt/csm-voices \
    && chown csm /var/cache/huggingface /mnt/csm-voices
USER csm
ENV HF_HOME=/var/cache/huggingface RAY_USAGE_STATS_ENABLED=0
EXPOSE 8000
CMD ["csm", "serve", "--host", "0.0.0.0", "--voices-dir", "/mnt/csm-voices"]
