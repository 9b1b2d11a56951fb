# llmserve images. Two targets:
#   docker build --target trtllm -t llmserve:trtllm .   NVIDIA GPUs: TensorRT-LLM 1.2 (engines built for the GPU)
#   docker build --target cpu    -t llmserve:cpu .      anywhere: the PyTorch reference engine, demo model included
# Both serve gRPC on 50051 and the REST shim and /metrics on 8000, as a non-root user, with
# engines mounted at /app/engines.

ARG TRTLLM_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.2.0

FROM python:3.11-slim AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    LLMSERVE_HOST=0.0.0.0 LLMSERVE_ENGINES_DIR=/app/engines
WORKDIR /app
# Exactly the versions `make install` installs, hashes checked: requirements.lock (torch is its CPU wheel, from
# PyTorch's CPU index; an unpinned torch pulls gigabytes of CUDA wheels).
COPY requirements.lock ./
RUN pip install pip==26.3 \
    && pip install --require-hashes --no-deps --extra-index-url https://download.pytorch.org/whl/cpu \
       -r requirements.lock
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY service/ service/
COPY build_engine.py ./
RUN python proto/generate.py \
    && pip install --no-deps --no-build-isolation . \
    && python build_engine.py --demo \
    && useradd --create-home --uid 10001 llmserve \
    && chown -R llmserve /app
USER 10001
EXPOSE 50051 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
  CMD ["python", "-m", "service", "healthcheck", "--address", "127.0.0.1:50051"]
ENTRYPOINT ["llmserve"]
CMD ["serve"]

FROM ${TRTLLM_IMAGE} AS trtllm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    LLMSERVE_HOST=0.0.0.0 LLMSERVE_ENGINES_DIR=/app/engines LLMSERVE_DEVICE=cuda
WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
COPY proto/ proto/
COPY service/ service/
COPY build_engine.py ./
# The container's own torch and TensorRT-LLM stay: install the project without touching them, and the serving
# packages it lacks at the versions requirements.lock pins.
# hadolint ignore=DL3013
RUN pip install --no-deps . \
    && pip install -c requirements.lock grpcio grpcio-health-checking grpcio-reflection grpcio-status \
       grpcio-tools protovalidate googleapis-common-protos prometheus-client starlette uvicorn jsonschema httpx \
    && python proto/generate.py \
    && pip install --no-deps . \
    && useradd --create-home --uid 10001 llmserve \
    && chown -R llmserve /app
USER 10001
EXPOSE 50051 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=600s \
  CMD ["python", "-m", "service", "healthcheck", "--address", "127.0.0.1:50051"]
ENTRYPOINT ["llmserve"]
CMD ["serve"]
