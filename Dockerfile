# First working version: CPU, embedded mode. The GPU image comes with the deployment issue.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    IMAGINE_DATA_DIR=/data

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY bot ./bot
COPY generation ./generation
COPY storage ./storage
COPY migrations ./migrations
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.4,<3" \
    && pip install .

RUN useradd --create-home --uid 1000 imagine && mkdir -p /data && chown imagine /data
USER imagine
VOLUME ["/data"]

ENTRYPOINT ["imagine"]
CMD ["db", "upgrade"]
