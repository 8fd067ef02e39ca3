# syntax=docker/dockerfile:1
# The outbox-relay image: the `outbox-relay` command (and the outbox_lib/relay packages, so
# `python -m relay.sample_app` runs from the same image). Built in two stages: the first
# installs the exact versions of uv.lock (hashes checked) and then the project itself into a
# virtualenv, the second copies only that virtualenv onto a slim Python. No compiler in
# either: psycopg[binary] and confluent-kafka ship manylinux wheels with libpq and
# librdkafka inside.
#
#   docker build -t outbox-relay:0.1.0 .
#   docker run --rm -e OUTBOX_DATABASE_URL=postgresql://... outbox-relay:0.1.0 migrate
#   docker run -e OUTBOX_DATABASE_URL=... -e OUTBOX_KAFKA_BOOTSTRAP_SERVERS=kafka:9092 outbox-relay:0.1.0
#
# docs/deployment.md, section "Docker image", describes it.
ARG PYTHON_IMAGE=python:3.11.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# The extra to install with the relay ("otel" lets `--otel-spans true` work; empty for none).
ARG EXTRAS=otel
# The same uv as the Makefile's UV_VERSION.
ARG UV_VERSION=0.13.9
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_NO_CACHE=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv
WORKDIR /src
RUN python -m pip install "uv==${UV_VERSION}"
# The dependencies first, from the lock alone, so this layer is rebuilt only when uv.lock
# changes; --locked fails the build when uv.lock is stale against pyproject.toml.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --locked --no-install-project ${EXTRAS:+--extra "$EXTRAS"} --python /usr/local/bin/python
# Then the project, as a wheel (not editable): only the virtualenv goes to the next stage.
COPY outbox_lib/ outbox_lib/
COPY relay/ relay/
COPY migrations/ migrations/
RUN uv sync --locked --no-editable ${EXTRAS:+--extra "$EXTRAS"} --python /usr/local/bin/python \
 && /opt/venv/bin/outbox-relay --help > /dev/null

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="outbox-relay" \
      org.opencontainers.image.description="Transactional outbox relay: PostgreSQL to Kafka and webhooks" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed, numeric non-root uid/gid (10001), so Kubernetes can check runAsNonRoot.
RUN groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid relay --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin relay
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OUTBOX_METRICS_PORT=9464
USER 10001:10001
# /metrics, /healthz and /readyz (OUTBOX_METRICS_PORT).
EXPOSE 9464
# Liveness of `outbox-relay run` through /healthz, with the standard library: the image has
# neither curl nor wget. Other commands (migrate, the sample app) should disable it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('OUTBOX_METRICS_PORT', '9464') + '/healthz', timeout=4)"]
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
