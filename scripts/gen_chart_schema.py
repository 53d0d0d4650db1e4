"""Regenerate deploy/helm/dna/values.schema.json: the chart's own keys, and the node
settings a release may override (`bootstrap.config`, `storage.config`) from the nodes'
configuration models, so a key the node would refuse is refused by Helm first, by name.

Usage: uv run python scripts/gen_chart_schema.py   (or `make chart-schema`)

tests/deploy/test_chart.py checks the committed file is what this writes.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from dna_core.ops.config import SecretStr
from dna_core.overlay.aio.server import OverlayServiceConfig
from dna_storage.node import StorageNodeConfig

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
}

# The levels a node's log_level takes: the standard library's, as a fresh node process has
# them (a library imported here, e.g. by a test run, may register more, like TRACE).
LOG_LEVELS = ("CRITICAL", "FATAL", "ERROR", "WARN", "WARNING", "INFO", "DEBUG", "NOTSET")

_JSON_TYPES: dict[Any, dict[str, Any]] = {
    str: {"type": "string"},
    Path: {"type": "string", "minLength": 1},
    SecretStr: {"type": "string"},
    int: {"type": "integer"},
    float: {"type": "number"},
    bool: {"type": "boolean"},
}


def _field_schema(annotation: Any, default: Any) -> dict[str, Any]:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple):
        schema: dict[str, Any] = {"type": "array", "items": _JSON_TYPES[args[0]]}
    else:
        schema = dict(_JSON_TYPES[annotation])
    if isinstance(default, bool | int | float | str):
        schema["default"] = default
    return schema


def config_schema(cls: type, prefix: str = "") -> dict[str, Any]:
    """The overridable sections of a node config class, each closed to unknown keys."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    properties: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        value = getattr(defaults, f.name)
        if key in CHART_OWNED:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            section = config_schema(hints[f.name], key + ".")
            if section["properties"]:
                properties[f.name] = section
        else:
            properties[f.name] = _field_schema(hints[f.name], value)
    return {"type": "object", "additionalProperties": False, "properties": properties}


def obj(properties: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": properties, **more}


STRING = {"type": "string"}
BOOL = {"type": "boolean"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
ANY_OBJECT = {"type": "object"}
ANY_ARRAY = {"type": "array"}
QUANTITY = {"type": ["string", "integer"], "pattern": "^[0-9]+(\\.[0-9]+)?([EPTGMk]i?|[munk])?$"}
POSITIVE = {"type": "integer", "minimum": 1}
RESOURCES = obj(
    {
        "requests": {"type": "object", "additionalProperties": QUANTITY},
        "limits": {"type": "object", "additionalProperties": QUANTITY},
    }
)


def role_schema(config: type, *, replicas_min: int, extra: dict[str, Any]) -> dict[str, Any]:
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
    levels = sorted(name.lower() for name in LOG_LEVELS)
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
                        "peer": {"type": "string", "minLength": 1},
                    }
                ),
                "ports": obj({"udp": PORT, "grpc": PORT, "http": PORT}),
                "logLevel": {"enum": levels},
                "clusterDomain": {"type": "string", "minLength": 1},
                "runAsUser": POSITIVE,
                "runAsGroup": POSITIVE,
                "bootstrap": role_schema(
                    OverlayServiceConfig,
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
                    StorageNodeConfig,
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
