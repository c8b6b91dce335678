"""deploy/kubernetes: valid Kubernetes objects that agree with the consumer they deploy.

The built-in kinds are validated against the Kubernetes API's own schemas (kubernetes-validate,
strict: an unknown or misspelt field fails). KEDA's ScaledObject and TriggerAuthentication are
custom resources those schemas do not hold: their fields are checked here against what KEDA's
CRD requires (spec.scaleTargetRef.name, spec.triggers[].type and .metadata; the Kafka scaler's
bootstrapServers and consumerGroup; secretTargetRef's parameter, name and key), and against the
Deployment and ConfigMap they refer to.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from consumer.settings import Settings, load_settings
from consumer.transform.mapping import load_mapping

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.37.0"


def _objects() -> list[dict]:
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name == "kustomization.yaml":  # kustomize's own file, not an API object
            continue
        found += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def _one(kind: str) -> dict:
    matching = [o for o in _objects() if o["kind"] == kind]
    assert len(matching) == 1, kind
    return matching[0]


def _container() -> dict:
    (container,) = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _env() -> dict[str, dict]:
    return {item["name"]: item for item in _container()["env"]}


def _config() -> dict:
    return tomllib.loads(_one("ConfigMap")["data"]["config.toml"])


@pytest.mark.parametrize(
    "obj", [o for o in _objects() if not o["apiVersion"].startswith("keda.sh/")], ids=lambda o: o["kind"]
)
def test_builtin_kinds_validate_against_the_kubernetes_schemas(obj: dict) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_validator_rejects_a_misspelt_field() -> None:
    broken = json.loads(json.dumps(_one("Deployment")))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 120
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    expected = sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted([*kustomization["resources"], "secret.example.yaml"]) == expected


def test_the_config_map_is_a_valid_consumer_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config()
    assert set(config) <= set(Settings.model_fields)
    path = tmp_path / "config.toml"
    path.write_text(_one("ConfigMap")["data"]["config.toml"])
    for name in [n for n in os.environ if n.startswith("CDC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("CDC_CONFIG", str(path))
    settings = load_settings()
    assert settings.group_id == config["group_id"]
    assert settings.metrics_port == config["metrics_port"]


def test_the_deployment_runs_the_service_as_the_docs_promise() -> None:
    deployment = _one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _container()
    env = _env()
    assert container["args"] == ["run"]
    # The drain allowance matches the systemd unit's.
    unit = (REPO / "deploy" / "cdc-consumer.service").read_text()
    assert f"TimeoutStopSec={pod['terminationGracePeriodSeconds']}\n" in unit
    assert env["CDC_GROUP_INSTANCE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    (port,) = container["ports"]
    assert port["containerPort"] == _config()["metrics_port"]
    assert {container[p]["httpGet"]["port"] for p in ("livenessProbe", "readinessProbe", "startupProbe")} == {
        port["name"]
    }
    assert env["CDC_METRICS_BIND_ADDRESS"]["value"] == "0.0.0.0"
    assert env["CDC_CONFIG"]["value"].startswith(
        next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config")
    )
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def test_secrets_are_mounted_files_named_by_the_file_settings() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    env = _env()
    (secret_volume,) = [v for v in pod["volumes"] if "secret" in v]
    mount = next(m for m in _container()["volumeMounts"] if m["name"] == secret_volume["name"])
    mounted = {f"{mount['mountPath']}/{item['path']}" for item in secret_volume["secret"]["items"]}
    for variable in (
        "CDC_KAFKA_SASL_PASSWORD_FILE",
        "CDC_CLICKHOUSE_PASSWORD_FILE",
        "CDC_SCHEMA_REGISTRY_PASSWORD_FILE",
    ):
        assert env[variable]["value"] in mounted, variable
    # No secret travels as a plain variable or in the config map.
    assert not [name for name in env if re.search(r"PASSWORD|SECRET|TOKEN", name) and not name.endswith("_FILE")]
    assert not [key for key in _config() if re.search(r"password|secret|token", key)]
    example = _one("Secret")
    assert {item["key"] for item in secret_volume["secret"]["items"]} <= set(example["stringData"])
    assert secret_volume["secret"]["secretName"] == example["metadata"]["name"]


def test_the_disruption_budget_selects_the_deployment_pods() -> None:
    budget = _one("PodDisruptionBudget")["spec"]
    labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert budget["maxUnavailable"] == 1


def test_keda_scales_the_deployment_on_its_group_lag_up_to_the_partition_count() -> None:
    scaled = _one("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == _one("Deployment")["metadata"]["name"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    metadata = trigger["metadata"]
    assert all(isinstance(v, str) for v in metadata.values())  # KEDA's trigger metadata is string to string
    config = _config()
    assert metadata["consumerGroup"] == config["group_id"]
    assert metadata["bootstrapServers"] == config["kafka_bootstrap"]
    assert "topic" not in metadata  # every topic of the group
    assert int(metadata["lagThreshold"]) > 0
    assert metadata["allowIdleConsumers"] == "false"
    # The cap: one member per partition of the topics the mapping consumes.
    connector = json.loads((REPO / "connectors" / "debezium-postgres.json").read_text())
    per_topic = int(connector["config"]["topic.creation.default.partitions"])
    partitions = per_topic * len(load_mapping(topic_prefix=config["topic_prefix"]).topics)
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] == partitions

    auth = _one("TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    secret = _one("Secret")
    for ref in auth["spec"]["secretTargetRef"]:
        assert set(ref) == {"parameter", "name", "key"}
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    # The trigger's SASL matches the consumer's.
    keda_names = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
    assert metadata["sasl"] == keda_names[_env()["CDC_KAFKA_SASL_MECHANISM"]["value"]]
    assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} == {"username", "password"}


def test_keda_scale_down_behaviour_is_a_valid_autoscaler_behaviour() -> None:
    behavior = _one("ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "keda-hpa-cdc-consumer"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "cdc-consumer"},
            "maxReplicas": 16,
            "behavior": behavior,
        },
    }
    kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)
