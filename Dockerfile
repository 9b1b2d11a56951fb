# llmserve images. Two targets:
#   docker build --target cpu    -t llmserve:cpu .      llmserve itself: the gateway in front of gRPC workers
#                                                        (TensorRT-LLM, vLLM, SGLang), or the PyTorch reference engine;
#                                                        gRPC on 50051, the REST shim and /metrics on 8000
#   docker build --target trtllm -t llmserve:trtllm .   a TensorRT-LLM worker on NVIDIA GPUs: `llmserve trtllm-worker
#                                                        MODEL` runs TensorRT-LLM's gRPC server on the model's profile
#                                                        for the GPUs (gRPC on 50051); it also builds engines
# Both run as a non-root user with models mounted at /app/engines. TRTLLM_IMAGE must be a TensorRT-LLM release
# whose `trtllm-serve --grpc` serves trtllm.TrtllmService (docs/tensorrt-llm.md); the PyTorch backend needs 1.3 or
# later, engines are served by the release that built them.

ARG TRTLLM_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.3.0

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
    LLMSERVE_ENGINES_DIR=/app/engines
WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
COPY proto/ proto/
COPY service/ service/
COPY build_engine.py ./
# The container's own torch and TensorRT-LLM stay: install the project without touching them, and the packages it
# lacks at the versions requirements.lock pins (smg-grpc-proto: the protocol TensorRT-LLM's gRPC server speaks).
# hadolint ignore=DL3013
RUN pip install --no-deps . \
    && pip install -c requirements.lock grpcio grpcio-health-checking grpcio-reflection grpcio-status \
       grpcio-tools protovalidate googleapis-common-protos prometheus-client starlette uvicorn jsonschema httpx \
       smg-grpc-proto \
    && python proto/generate.py \
    && pip install --no-deps . \
    && useradd --create-home --uid 10001 llmserve \
    && chown -R llmserve /app
USER 10001
EXPOSE 50051
# TensorRT-LLM's gRPC server has no grpc.health.v1: its own HealthCheck is asked.
HEALTHCHECK --interval=10s --timeout=10s --start-period=1800s \
  CMD ["python", "-m", "service", "healthcheck", "--worker", "trtllm://127.0.0.1:50051", "--timeout", "5"]
ENTRYPOINT ["llmserve", "trtllm-worker", "--host", "0.0.0.0"]
CMD ["--help"]
