# syntax=docker/dockerfile:1
# multichannel-gateway: multi-stage build; the runtime image holds only the installed wheels.
#   docker build -t multichannel-gateway .
#   docker run -p 8080:8080 -p 9090:9090 -e META_APP_SECRET multichannel-gateway
# Without --config the gateway runs on its embedded defaults (SQLite journal and storage under
# $GATEWAY_DATA_DIR=/data); the Helm chart passes `serve --config /etc/gateway/gateway.toml`.

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY channels ./channels
COPY sinks ./sinks
# The project's wheel (with its package data, e.g. sinks/firestore/indexes.json) and every
# dependency's wheel, so that the runtime stage installs offline.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GATEWAY_DATA_DIR=/data \
    GATEWAY_HEALTHCHECK_PORT=8080
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --home-dir /app --shell /usr/sbin/nologin gateway \
 && mkdir -p /data /etc/gateway /app \
 && chown gateway:gateway /data /app
# Bind-mounted from the build stage: the wheels never become a layer of this image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels multichannel-gateway
WORKDIR /app
USER 10001:10001
EXPOSE 8080 9090
VOLUME ["/data"]
# /healthz on the HTTP port: GATEWAY_HEALTHCHECK_PORT (docker run -e ...) when server.port is not 8080.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('GATEWAY_HEALTHCHECK_PORT') or '8080'; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["gateway"]
CMD ["serve"]
