# DermaSeg inference service: FastAPI + ONNX Runtime. No TensorFlow in the image.
#
#   docker build -t dermaseg .                                CPU (onnxruntime)
#   docker build --build-arg FLAVOR=gpu -t dermaseg:gpu .     GPU (onnxruntime-gpu + CUDA/cuDNN from PyPI)
#   docker run --rm -p 8000:8000 dermaseg                     serves models/dermaseg.onnx, baked in
#   docker run --rm -p 8000:8000 -v "$PWD/models:/app/models:ro" dermaseg      ... or a mounted one
#
# Settings are DERMASEG_* environment variables (service/config.py); PORT sets the port (default 8000).
ARG FLAVOR=cpu

# --- builder: a virtual environment with the service's runtime dependencies only ---------------------
FROM debian:bookworm-slim AS builder
ARG FLAVOR
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# pip comes from Debian's own pip wheel, unpacked rather than installed: installing python3-venv would pull
# in ca-certificates, whose set-up fails where the build environment mounts its CA bundle read-only over
# /etc/ssl/certs (TLS-intercepting proxies do; so does container-smoke). Hence also: ca-certificates only
# when no bundle is there. Debian stable's point releases replace package versions, so none are pinned.
WORKDIR /tmp
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && if [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then \
        apt-get install -y --no-install-recommends ca-certificates; \
    fi \
    && apt-get download python3-pip-whl \
    && dpkg-deb --fsys-tarfile python3-pip-whl_*.deb \
        | tar -xO --wildcards './usr/share/python-wheels/pip-*.whl' > /opt/pip.whl \
    && rm -rf /var/lib/apt/lists/* /tmp/*.deb
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN python3 -m venv --without-pip /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY training ./training
# The project without extras: never the [train] extra (TensorFlow, Keras, tf2onnx). The GPU flavour swaps
# onnxruntime for onnxruntime-gpu with NVIDIA's CUDA and cuDNN libraries from PyPI (no CUDA base image).
# pip runs from its wheel and is not installed into the venv: the image carries no installer.
RUN case "$FLAVOR" in cpu|gpu) ;; *) echo "FLAVOR must be cpu or gpu, not '$FLAVOR'" >&2; exit 1 ;; esac \
    && /opt/venv/bin/python /opt/pip.whl/pip install . \
    && if [ "$FLAVOR" = gpu ]; then \
        /opt/venv/bin/python /opt/pip.whl/pip uninstall -y onnxruntime \
        && /opt/venv/bin/python /opt/pip.whl/pip install "onnxruntime-gpu[cuda,cudnn]>=1.20"; \
    fi \
    && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('tensorflow') is not None)"

# --- runtime: Debian's python3 (3.11), the venv, the model, an unprivileged user --------------------
FROM debian:bookworm-slim
ARG FLAVOR
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --home-dir /app --shell /usr/sbin/nologin dermaseg
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY models/ /app/models/
# DERMASEG_PROVIDERS: "cpu", or for the GPU image "gpu", which the service reads as cuda,cpu. (One stage per
# flavour selected by `FROM runtime-${FLAVOR}` would be neater, but podman/buildah 4.3 cannot build it.)
# ORT_DISABLE_TELEMETRY: ONNX Runtime ≥ 1.2x reports usage to Microsoft from Linux too; a service that sees
# patients' photos sends nothing anywhere (it also spares a warning about the read-only home folder).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DERMASEG_HOST=0.0.0.0 \
    PORT=8000 \
    DERMASEG_MODEL_PATH=/app/models/dermaseg.onnx \
    DERMASEG_PROVIDERS=${FLAVOR} \
    ORT_DISABLE_TELEMETRY=1
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('PORT', '8000'), timeout=4)"]
CMD ["python", "-m", "service.main"]
