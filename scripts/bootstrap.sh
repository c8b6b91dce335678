#!/usr/bin/env bash
# Creates .venv with the project and its dev tools. The stack's own parts (Kafka, Connect,
# Debezium, Apicurio, ClickHouse, PostgreSQL, Prometheus) are fetched by `cdc-consumer stack up`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ needed"'

stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  # cdc_dev (stack, generator, demo, verify) is development tooling and not in the package: put
  # the checkout on the venv's path so `cdc-consumer stack ...` and friends find it.
  echo "$PWD" > "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/cdc-dev-checkout.pth"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
