# The service image: the wheel of this repository on a slim Python, run as an unprivileged user.
#   docker build -t cdc-consumer .
#   docker run --env-file cdc-consumer.env -p 19108:19108 cdc-consumer            # the consumer
#   docker run --env-file cdc-consumer.env -p 19109:19109 cdc-consumer lag --serve 19109
# The development tooling (stack, generate, demo, verify) is not in it: it runs from a checkout.

FROM python:3.11-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir build==1.6.1
COPY . .
RUN python -m build --wheel --outdir /dist .

FROM python:3.11-slim
RUN groupadd --system --gid 10001 cdc \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /var/lib/cdc-consumer cdc
COPY --from=build /dist/ /tmp/dist/
RUN pip install --no-cache-dir /tmp/dist/*.whl && rm -rf /tmp/dist
# The ops server listens on every interface of the container (its default is loopback only), and
# an embedded ClickHouse (no CDC_CLICKHOUSE_URL) writes into the user's home, the one writable place.
ENV PYTHONUNBUFFERED=1 \
    CDC_METRICS_BIND_ADDRESS=0.0.0.0 \
    CDC_METRICS_PORT=19108 \
    CDC_CLICKHOUSE_EMBEDDED_PATH=/var/lib/cdc-consumer/clickhouse
USER 10001:10001
WORKDIR /var/lib/cdc-consumer
EXPOSE 19108 19109
# Liveness of whatever listens on CDC_METRICS_PORT (the lag exporter: set it to the --serve port).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['CDC_METRICS_PORT'], timeout=4)"
# SIGTERM: the batches in flight are inserted and committed before it exits; allow it the time
# (docker stop -t 120, stop_grace_period in compose, terminationGracePeriodSeconds in Kubernetes).
STOPSIGNAL SIGTERM
ENTRYPOINT ["cdc-consumer"]
CMD ["run"]
