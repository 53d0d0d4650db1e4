"""Regenerate deploy/helm/dna/values.schema.json: the chart's own keys, and the node
settings a release may override (`bootstrap.config`, `storage.config`, `stun.config`) from
the nodes' configuration models, so a key the node would refuse is refused by Helm first, by name.

Usage: uv run python scripts/gen_chart_schema.py   (or `make chart-schema`)

tests/deploy/test_chart.py checks the committed file is what this writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "deploy" / "helm" / "dna" / "values.schema.json"

# Settings the chart sets itself (addresses, ports, paths on the pod's volume) or does
# not offer (the Redis backend: each storage node would need a database of its own):
# not overridable through `config`.
CHART_OWNED = {
    "log_level": "logLevel",
    "node.host": "the pod IP",
    "node.udp_port": "ports.udp",
    "node.grpc_port": "ports.grpc",
    "node.key_file": "/data/node.key",
    "overlay.bootstrap": "the bootstrap StatefulSet",
    "records.path": "/data/records.sqlite3",
    "ops.http_host": "the pod IP",
    "ops.http_port": "ports.http",
    "storage.backend": "sqlite",
    "storage.data_dir": "/data/mailboxes",
    "storage.redis_url": "not offered by the chart",
    # The relay (dna-stun): its address is the pod's, its ports are stun.*, its credentials
    # come from a Secret (stun.auth), never from values.
    "server.host": "the pod IP",
    "server.relay_host": "the pod IP",
    # A pod's IPv6 address is its own, not a value every pod could share.
    "server.host_ipv6": "not offered by the chart (the pod's IPv4 address serves)",
    "server.relay_host_ipv6": "not offered by the chart (the pod's IPv4 address serves)",
    "server.udp_port": "stun.udpPort",
    "server.relay_port_min": "stun.relayPortMin",
    "server.relay_port_max": "stun.relayPortMax",
    "auth.users": "not offered by the chart (a secret)",
    "auth.auth_secret": "stun.auth (a Secret)",
    "auth.previous_auth_secret": "stun.auth (a Secret)",
}


CONFIG_SCHEMAS = ROOT / "deploy" / "config-schema"  # written by scripts/gen_config_docs.py


def config_schema(role: str, prefix: str = "") -> dict[str, Any]:
    """The overridable sections of ``role``'s node config, each closed to unknown keys: the
    role's generated schema (deploy/config-schema, kept current by its own test) without
    the settings the chart owns."""
    schema = json.loads((CONFIG_SCHEMAS / f"{role}.schema.json").read_text())
    return _without_chart_owned(schema, prefix)


def _without_chart_owned(schema: dict[str, Any], prefix: str) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for name, field in schema.get("properties", {}).items():
        key = prefix + name
        if key in CHART_OWNED:
            continue
        if field.get("type") == "object" and "properties" in field:
            section = _without_chart_owned(field, key + ".")
            if section["properties"]:
                properties[name] = section
            continue
        properties[name] = field
    kept = {k: v for k, v in schema.items() if k not in ("$schema", "title", "properties")}
    return {**kept, "type": "object", "additionalProperties": False, "properties": properties}


def obj(properties: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": properties, **more}


STRING = {"type": "string"}
BOOL = {"type": "boolean"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
ANY_OBJECT = {"type": "object"}
ANY_ARRAY = {"type": "array"}
QUANTITY = {"type": ["string", "integer"], "pattern": "^[0-9]+(\\.[0-9]+)?([EPTGMk]i?|[munk])?$"}
POSITIVE = {"type": "integer", "minimum": 1}
SECRET_KEY = {"type": "string", "pattern": "^[-._a-zA-Z0-9]+$"}  # a Secret's data key
RESOURCES = obj(
    {
        "requests": {"type": "object", "additionalProperties": QUANTITY},
        "limits": {"type": "object", "additionalProperties": QUANTITY},
    }
)


def role_schema(config: str, *, replicas_min: int, extra: dict[str, Any]) -> dict[str, Any]:
    return obj(
        {
            "replicas": {"type": "integer", "minimum": replicas_min},
            "resources": RESOURCES,
            "config": config_schema(config),
            "extraEnv": ANY_ARRAY,
            "podAnnotations": {"type": "object", "additionalProperties": STRING},
            "nodeSelector": {"type": "object", "additionalProperties": STRING},
            "tolerations": ANY_ARRAY,
            "affinity": ANY_OBJECT,
            "topologySpreadConstraints": ANY_ARRAY,
            "terminationGracePeriodSeconds": {"type": "integer", "minimum": 5},
            **extra,
        }
    )


def probe(*keys: str) -> dict[str, Any]:
    return obj({key: POSITIVE for key in keys}, required=list(keys))


def values_schema() -> dict[str, Any]:
    # The levels a node's log_level takes, as its config model gives them (one list).
    node_schema = json.loads((CONFIG_SCHEMAS / "bootstrap.schema.json").read_text())
    levels = sorted(node_schema["properties"]["log_level"]["enum"])
    persistence = {
        "size": QUANTITY,
        "storageClassName": STRING,
    }
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "DNA Messenger v2 chart values (generated by scripts/gen_chart_schema.py)",
        **obj(
            {
                "nameOverride": STRING,
                "fullnameOverride": STRING,
                "global": ANY_OBJECT,  # Helm passes it to every chart, parent or not
                "image": obj(
                    {
                        "registry": STRING,
                        # Pinned tags only: `latest` moves under a running StatefulSet.
                        "tag": {"type": "string", "minLength": 1, "not": {"const": "latest"}},
                        "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                        "pullSecrets": ANY_ARRAY,
                        "bootstrap": {"type": "string", "minLength": 1},
                        "storage": {"type": "string", "minLength": 1},
                        "stun": {"type": "string", "minLength": 1},
                        "peer": {"type": "string", "minLength": 1},
                    }
                ),
                "ports": obj({"udp": PORT, "grpc": PORT, "http": PORT}),
                "logLevel": {"enum": levels},
                "clusterDomain": {"type": "string", "minLength": 1},
                "runAsUser": POSITIVE,
                "runAsGroup": POSITIVE,
                "bootstrap": role_schema(
                    "bootstrap",
                    replicas_min=1,
                    extra={
                        "perPodServices": obj(
                            {
                                "enabled": BOOL,
                                "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                                "annotations": {"type": "object", "additionalProperties": STRING},
                            }
                        ),
                        "persistence": obj({"enabled": BOOL, **persistence}),
                    },
                ),
                "storage": role_schema(
                    "storage",
                    replicas_min=1,
                    extra={
                        "partition": {"type": "integer", "minimum": 0},
                        "persistence": obj(
                            {
                                **persistence,
                                "accessModes": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {
                                        "enum": [
                                            "ReadWriteOnce",
                                            "ReadWriteOncePod",
                                            "ReadWriteMany",
                                        ]
                                    },
                                },
                            }
                        ),
                    },
                ),
                "stun": role_schema(
                    "stun",
                    replicas_min=1,
                    extra={
                        "enabled": BOOL,
                        "udpPort": PORT,
                        "service": obj(
                            {
                                "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                                "annotations": {"type": "object", "additionalProperties": STRING},
                                "externalTrafficPolicy": {"enum": ["Cluster", "Local"]},
                            }
                        ),
                        "hostNetwork": BOOL,
                        "relayPortMin": PORT,
                        "relayPortMax": PORT,
                        "auth": obj(
                            {
                                "existingSecret": STRING,
                                "secretKey": SECRET_KEY,
                                "previousSecretKey": SECRET_KEY,
                            }
                        ),
                    },
                ),
                "probes": obj(
                    {
                        "startup": probe("periodSeconds", "failureThreshold"),
                        "liveness": probe("periodSeconds", "timeoutSeconds", "failureThreshold"),
                        "readiness": probe("periodSeconds", "timeoutSeconds", "failureThreshold"),
                    }
                ),
                "podDisruptionBudget": obj(
                    {"enabled": BOOL, "maxUnavailable": {"type": "integer", "minimum": 1}}
                ),
                "networkPolicy": obj(
                    {
                        "enabled": BOOL,
                        "overlayFromAnywhere": BOOL,
                        "overlayFrom": ANY_ARRAY,
                        "opsFrom": ANY_ARRAY,
                    }
                ),
                "serviceAccount": obj({"create": BOOL, "name": STRING}),
                "serviceMonitor": obj(
                    {
                        "enabled": BOOL,
                        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        "labels": {"type": "object", "additionalProperties": STRING},
                    }
                ),
                "prometheusRule": obj(
                    {
                        "enabled": BOOL,
                        "labels": {"type": "object", "additionalProperties": STRING},
                    }
                ),
                "dashboards": obj(
                    {
                        "enabled": BOOL,
                        "labels": {"type": "object", "additionalProperties": STRING},
                        "annotations": {"type": "object", "additionalProperties": STRING},
                    }
                ),
                "tests": obj({"enabled": BOOL, "activeDeadlineSeconds": POSITIVE}),
            }
        ),
    }


def render() -> str:
    return json.dumps(values_schema(), indent=2) + "\n"


def main() -> None:
    SCHEMA.write_text(render())
    print(SCHEMA.relative_to(ROOT))


if __name__ == "__main__":
    main()
