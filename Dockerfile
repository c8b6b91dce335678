FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY consumer ./consumer
COPY clickhouse ./clickhouse
COPY connectors ./connectors
COPY postgres ./postgres
RUN pip install --no-cache-dir .
EXPOSE 19108 19109
ENTRYPOINT ["cdc-consumer"]
CMD ["run"]
