# Imagine: one image for `imagine bot`, `imagine worker`, `imagine web` and `imagine db upgrade`.
# Build: docker build -t imagine .   (CUDA 12.8 runtime with torch's cu128 build)
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY bot ./bot
COPY generation ./generation
COPY storage ./storage
COPY migrations ./migrations
# torch first, from the index whose CUDA matches the base image; then Imagine itself.
RUN python3 -m venv /opt/imagine \
    && /opt/imagine/bin/pip install --index-url "${TORCH_INDEX}" "torch>=2.4,<3" \
    && /opt/imagine/bin/pip install '.[quantize]'

FROM ${CUDA_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/imagine/bin:${PATH} \
    HF_HOME=/models \
    IMAGINE_DATA_DIR=/data \
    IMAGINE_METRICS_PORT=9400 \
    IMAGINE_WEB_HOST=0.0.0.0
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 imagine \
    && mkdir -p /data /models \
    && chown imagine:imagine /data /models
COPY --from=build /opt/imagine /opt/imagine
WORKDIR /home/imagine
USER 10001
VOLUME ["/data", "/models"]
EXPOSE 9400 8080
# The database and the blob store answer: what every process here needs.
HEALTHCHECK --interval=60s --timeout=20s --start-period=120s --retries=3 \
    CMD ["imagine", "doctor", "--quick"]
ENTRYPOINT ["imagine"]
CMD ["bot"]
