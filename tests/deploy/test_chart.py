"""The Helm chart (deploy/helm/dna), offline: no Kubernetes API server can run here, so it
is linted (`helm lint --strict`), rendered with every value set in its ci/ directory and
validated manifest by manifest with kubernetes-validate --strict against a recent
Kubernetes; its node config is loaded by the real node binaries, and its `helm test`
script sends a real message through a local testnet."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cluster import free_ips
from deploy_files import CHART, RULES, tool
from dna_storage.admission import AdmissionConfig
from dna_storage.node import StorageSection
from dna_stun.config import MAX_REALM_BYTES, AuthSection, RelaySection
from dna_testnet.network import Testnet
from pydantic import ValidationError
from support import load_script

pytestmark = pytest.mark.process  # helm, promtool, bash or node processes

KUBERNETES = "1.35.0"  # a recent release kubernetes-validate ships schemas for
OPERATOR_API = "monitoring.coreos.com/v1"
VALUE_SETS = sorted((CHART / "ci").glob("*-values.yaml"))
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}  # CRDs: checked by hand below
BIN = Path(sys.executable).parent


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("helm"), *args], capture_output=True, text=True, timeout=120, check=False
    )


def refused_by_template_and_lint(message: str, *args: str) -> None:
    """`helm template` (as `helm install`) and `helm lint --strict`, where operators check
    their values before an install, both exit non-zero naming ``message``. Lint's `fail`
    only logs (Helm's lint mode): the chart's checks stop through `dna.fail`, whose error
    lint prints on its [ERROR] line, the message quoted as a Go string."""
    for command in (["template", "t"], ["lint", "--strict"]):
        result = helm(*command, str(CHART), *args)
        assert result.returncode != 0, f"helm {command[0]} accepted {args}"
        if command[0] == "template":
            assert message in result.stderr, result.stderr
            continue
        quoted = message.replace("\\", "\\\\").replace('"', '\\"')
        errors = [line for line in result.stdout.splitlines() if line.startswith("[ERROR]")]
        assert any(f'"refused: {quoted}' in line for line in errors), result.stdout


def render(*args: str) -> list[dict[str, Any]]:
    result = helm("template", "t", str(CHART), "--namespace", "dna", *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = (d for d in by_kind(docs, kind) if d["metadata"]["name"] == name)
    return doc


@pytest.fixture(scope="module")
def default() -> list[dict[str, Any]]:
    return render()


# --- lint, render, validate -----------------------------------------------------------


def test_value_sets_exist() -> None:
    names = {p.name for p in VALUE_SETS}
    assert {"minimal-values.yaml", "monitoring-values.yaml", "public-values.yaml"} <= names


@pytest.mark.parametrize("values", [None, *VALUE_SETS], ids=lambda v: v.name if v else "default")
def test_chart_lints_strictly(values: Path | None) -> None:
    result = helm("lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", [None, *VALUE_SETS], ids=lambda v: v.name if v else "default")
def test_every_manifest_is_valid_kubernetes(values: Path | None) -> None:
    docs = render("--api-versions", OPERATOR_API, *(["-f", str(values)] if values else []))
    kinds = {doc["kind"] for doc in docs}
    assert {"StatefulSet", "Service", "ConfigMap"} <= kinds
    for doc in docs:
        if doc["kind"] in OPERATOR_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {exc.path}")


def test_the_validator_refuses_an_unknown_field(default: list[dict[str, Any]]) -> None:
    """kubernetes-validate --strict catches a misspelt field (so the test above can fail)."""
    sts = json.loads(json.dumps(named(default, "StatefulSet", "t-dna-storage")))
    sts["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFileSystem"):
        kubernetes_validate.validate(sts, KUBERNETES, strict=True)


# --- bad values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("ports.grpc=70000", "ports.grpc: Must be less than or equal to 65535"),
        ("storage.replicaz=3", "storage: Additional property replicaz is not allowed"),
        (
            "storage.config.storage.ttl_dayz=3",
            "storage.config.storage: Additional property ttl_dayz is not allowed",
        ),
        (
            "storage.config.admission.disk_high_water=full",
            "storage.config.admission.disk_high_water: Invalid type. Expected: number",
        ),
        (  # the chart sets the node's address itself
            "bootstrap.config.node.host=1.2.3.4",
            "bootstrap.config.node: Additional property host is not allowed",
        ),
        ("image.tag=latest", "image.tag: Must not validate the schema"),
        ("logLevel=loud", "logLevel: logLevel must be one of the following"),
        ("bootstrap.replicas=0", "bootstrap.replicas: Must be greater than or equal to 1"),
        (  # the relay's address is the pod's, its secret a Secret's
            "stun.config.server.host=1.2.3.4",
            "stun.config: Additional property server is not allowed",
        ),
        (
            "stun.config.auth.auth_secret=plain",
            "stun.config.auth: Additional property auth_secret is not allowed",
        ),
        ("stun.service.type=External", "stun.service.type: stun.service.type must be one of"),
        ("stun.relayPortMax=70000", "stun.relayPortMax: Must be less than or equal to 65535"),
        (  # the relay refuses it at start: its 401 would not fit a bare Refresh's 3x
            "stun.config.auth.realm=relay.example.org",
            "stun.config.auth.realm: String length must be less than or equal to 16",
        ),
    ],
)
def test_a_bad_value_fails_naming_its_key(setting: str, message: str) -> None:
    for command in (["template", "t"], ["lint", "--strict"]):
        result = helm(*command, str(CHART), "--set", setting)
        assert result.returncode != 0, f"{command[0]} accepted {setting}"
        assert message in result.stdout + result.stderr, result.stdout + result.stderr


# --- rules the schema cannot state ----------------------------------------------------

# One setting against another (or the other's default), bytes not characters: the node
# refused these at start while `helm lint` and `helm template` passed, so the pods
# crash-looped. Each case: the values, the node's config section that judges them, the
# chart's message. The defaults come from the models: a boundary moved in one place only
# fails here.
MAX_LIFETIME = RelaySection().max_lifetime_s
MAX_TTL = StorageSection().max_ttl_days
POW_BASE, POW_MAX = AdmissionConfig().pow_base_bits, AdmissionConfig().pow_max_bits
TWO_BYTE = "é"  # two bytes in UTF-8, one character to the schema's maxLength
CROSS_FIELD = [
    (
        {"stun": {"config": {"relay": {"default_lifetime_s": MAX_LIFETIME + 1}}}},
        RelaySection,
        f"stun.config.relay.default_lifetime_s ({MAX_LIFETIME + 1}) must not exceed "
        f"stun.config.relay.max_lifetime_s ({MAX_LIFETIME}, the node's default)",
    ),
    (
        {"stun": {"config": {"relay": {"default_lifetime_s": 900, "max_lifetime_s": 800}}}},
        RelaySection,
        "stun.config.relay.default_lifetime_s (900) must not exceed "
        "stun.config.relay.max_lifetime_s (800): lower default_lifetime_s or raise",
    ),
    (
        {"stun": {"config": {"auth": {"realm": TWO_BYTE * (MAX_REALM_BYTES // 2 + 1)}}}},
        AuthSection,
        f'stun.config.auth.realm ("{TWO_BYTE * (MAX_REALM_BYTES // 2 + 1)}") is '
        f"{MAX_REALM_BYTES + 2} bytes in UTF-8, at most {MAX_REALM_BYTES}",
    ),
    (
        {"storage": {"config": {"storage": {"ttl_days": MAX_TTL + 1}}}},
        StorageSection,
        f"storage.config.storage.ttl_days ({MAX_TTL + 1}) must be more than 0 and at most "
        f"storage.config.storage.max_ttl_days ({MAX_TTL}, the node's default)",
    ),
    (
        {"storage": {"config": {"storage": {"ttl_days": 0}}}},
        StorageSection,
        "storage.config.storage.ttl_days (0) must be more than 0",
    ),
    (
        {"storage": {"config": {"storage": {"max_ttl_days": 7}}}},
        StorageSection,
        f"storage.config.storage.ttl_days ({MAX_TTL}) must be more than 0 and at most "
        "storage.config.storage.max_ttl_days (7): set ttl_days within 1..max_ttl_days",
    ),
    (
        {"storage": {"config": {"admission": {"pow_base_bits": POW_MAX + 1}}}},
        AdmissionConfig,
        f"storage.config.admission.pow_base_bits ({POW_MAX + 1}) must not exceed "
        f"storage.config.admission.pow_max_bits ({POW_MAX}, the node's default)",
    ),
    (
        {"storage": {"config": {"admission": {"pow_max_bits": POW_BASE - 1}}}},
        AdmissionConfig,
        f"storage.config.admission.pow_base_bits ({POW_BASE}) must not exceed "
        f"storage.config.admission.pow_max_bits ({POW_BASE - 1}): lower pow_base_bits",
    ),
]
# ...and at the boundary both the chart and the node take them.
AT_THE_BOUNDARY = [
    ({"stun": {"config": {"relay": {"default_lifetime_s": MAX_LIFETIME}}}}, RelaySection),
    ({"stun": {"config": {"auth": {"realm": TWO_BYTE * (MAX_REALM_BYTES // 2)}}}}, AuthSection),
    ({"storage": {"config": {"storage": {"ttl_days": MAX_TTL}}}}, StorageSection),
    ({"storage": {"config": {"storage": {"ttl_days": 1, "max_ttl_days": 1}}}}, StorageSection),
    ({"storage": {"config": {"admission": {"pow_base_bits": POW_MAX}}}}, AdmissionConfig),
    ({"storage": {"config": {"admission": {"pow_max_bits": POW_BASE}}}}, AdmissionConfig),
]


def _values_file(values: dict[str, Any], tmp_path: Path) -> str:
    if "stun" in values:
        values = {**values, "stun": {**values["stun"], "enabled": True}}
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values, allow_unicode=True), encoding="utf-8")
    return str(path)


def _section(values: dict[str, Any]) -> dict[str, Any]:
    """The one config section ``values`` set (the node's own TOML table)."""
    ((_, role),) = values.items()
    ((_, section),) = role["config"].items()
    assert isinstance(section, dict)
    return section


@pytest.mark.parametrize(("values", "model", "message"), CROSS_FIELD)
def test_a_rule_across_settings_fails_the_render_naming_the_values(
    values: dict[str, Any], model: type[Any], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ValidationError):  # the node refuses it: the chart does not guess
        model.model_validate(_section(values))
    # `helm lint` passed these (exit 0, an [INFO] line) before dna.fail
    refused_by_template_and_lint(message, "-f", _values_file(values, tmp_path))


@pytest.mark.parametrize(("values", "model"), AT_THE_BOUNDARY)
def test_settings_at_the_rules_boundary_render(
    values: dict[str, Any], model: type[Any], tmp_path: Path
) -> None:
    model.model_validate(_section(values))
    render("-f", _values_file(values, tmp_path))


# What the relay's [relay] allowed_peers and denied_peers take (ipaddress.ip_network with
# strict=False): the chart takes the same, with one exception (a mask after the slash is
# taken for its shape; the relay checks it is a mask).
NETWORKS = [
    "10.0.0.0/8", "192.0.2.7", "0.0.0.0/0", "1.2.3.4/08", "1.2.3.4/032", "1.2.3.4/255.255.0.0",
    "10.0.0.0/0.255.255.255", "::", "::/0", "::1", "2001:db8::/32", "2001:DB8::/032",
    "1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7::", "::2:3:4:5:6:7:8", "1::8", "::ffff:1.2.3.4",
    "1:2:3:4:5:6:1.2.3.4", "::1.2.3.4/128", "fe80::1%eth0/64", "fe80::%1", "::/0128",
]  # fmt: skip
NOT_NETWORKS = [
    "10.0.0.256/8", "010.0.0.1", "10", "1.2.3.4/33", "1.2.3.4/", "1.2.3.4/+8", " 10.0.0.1",
    "1.2.3.4/8 ", "1.2.3.4/8/8", "1:2:3:4:5:6:7:8:9", "1::2::3", "12345::", "::/129",
    "::%/64", "1.2.3.4%x", "::1/ffff::", "1:2:3:4:5:6:7:1.2.3.4", "relay.example.org", "",
]  # fmt: skip


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def test_the_relay_takes_every_network_the_chart_takes(tmp_path: Path) -> None:
    assert all(map(_is_network, NETWORKS)) and not any(map(_is_network, NOT_NETWORKS))
    RelaySection(allowed_peers=tuple(NETWORKS), denied_peers=tuple(NETWORKS))
    relay = {"allowed_peers": NETWORKS, "denied_peers": NETWORKS}
    docs = render("-f", _values_file({"stun": {"config": {"relay": relay}}}, tmp_path))
    toml = tomllib.loads(named(docs, "ConfigMap", "t-dna-stun")["data"]["stun.toml"])
    assert toml["relay"]["allowed_peers"] == NETWORKS == toml["relay"]["denied_peers"]


@pytest.mark.parametrize("key", ["allowed_peers", "denied_peers"])
@pytest.mark.parametrize("bad", NOT_NETWORKS)
def test_a_relay_peer_that_is_no_network_fails_the_render(
    key: str, bad: str, tmp_path: Path
) -> None:
    with pytest.raises(ValidationError):
        RelaySection.model_validate({key: ["10.0.0.0/8", bad]})
    values = {"stun": {"config": {"relay": {key: ["10.0.0.0/8", bad]}}}}
    message = f'stun.config.relay.{key}: "{bad}" is not an address or network'
    refused_by_template_and_lint(message, "-f", _values_file(values, tmp_path))


def test_every_check_in_the_chart_stops_helm_lint_too() -> None:
    # A bare `fail` stops `helm template` and `helm install` but only logs under `helm lint`
    # (the dashboards' and rules' checks, and the relay port range's, were such).
    helper = '{{- define "dna.fail" -}}\n{{- fail . -}}\n'
    for template in sorted((CHART / "templates").rglob("*")):
        if template.is_file():
            text = template.read_text().replace(helper, "")
            assert "fail " not in text.replace("failureThreshold", ""), template.name
    assert helper in (CHART / "templates" / "_checks.tpl").read_text()


# --- what the manifests say -----------------------------------------------------------


def _pods(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for workload in by_kind(docs, "StatefulSet") + by_kind(docs, "Deployment"):
        yield workload["metadata"]["name"], workload["spec"]["template"]["spec"]
    for pod in by_kind(docs, "Pod"):
        yield pod["metadata"]["name"], pod["spec"]


@pytest.mark.parametrize("values", [None, "public-values.yaml"])
def test_every_container_is_locked_down(values: str | None) -> None:
    pods = dict(_pods(render(*(["-f", str(CHART / "ci" / values)] if values else []))))
    expected = {"t-dna-bootstrap", "t-dna-storage", "t-dna-test-send-message"}
    assert set(pods) == expected | ({"t-dna-stun"} if values else set())
    for name, spec in pods.items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        assert spec["automountServiceAccountToken"] is False, name
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert container["resources"]["requests"] and container["resources"]["limits"]


def test_nodes_are_probed_on_healthz_and_readyz(default: list[dict[str, Any]]) -> None:
    for sts in by_kind(default, "StatefulSet"):
        (container,) = sts["spec"]["template"]["spec"]["containers"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert sts["spec"]["podManagementPolicy"] == "Parallel"


def test_bootstrap_nodes_have_stable_names_and_storage_nodes_volumes(
    default: list[dict[str, Any]],
) -> None:
    boot = named(default, "StatefulSet", "t-dna-bootstrap")
    headless = named(default, "Service", boot["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    store = named(default, "StatefulSet", "t-dna-storage")
    (claim,) = store["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert store["spec"]["replicas"] == 6
    budgets = {
        pdb["metadata"]["name"]: pdb["spec"] for pdb in by_kind(default, "PodDisruptionBudget")
    }
    assert budgets == {
        name: {
            "maxUnavailable": 1,
            "selector": named(default, "StatefulSet", name)["spec"]["selector"],
        }
        for name in ("t-dna-bootstrap", "t-dna-storage")
    }


def test_network_policy_lets_dns_and_the_overlay_through(default: list[dict[str, Any]]) -> None:
    (policy,) = by_kind(default, "NetworkPolicy")
    egress_ports = [p for rule in policy["spec"]["egress"] for p in rule["ports"]]
    assert {"port": 53, "protocol": "UDP"} in egress_ports
    assert {"port": 53, "protocol": "TCP"} in egress_ports
    ops = [r for r in policy["spec"]["ingress"] if {"port": 7480, "protocol": "TCP"} in r["ports"]]
    assert ops and all(rule.get("from") for rule in ops), "the ops port must not be open to all"


def test_monitoring_objects_only_where_the_operator_api_exists() -> None:
    monitoring = str(CHART / "ci" / "monitoring-values.yaml")
    without = render("-f", monitoring)
    assert not [d for d in without if d["kind"] in OPERATOR_KINDS]
    docs = render("-f", monitoring, "--api-versions", OPERATOR_API)
    (rule,) = by_kind(docs, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load((RULES / "dna.yml").read_text())["groups"]
    assert "{{ $labels.instance }}" in json.dumps(rule["spec"])  # not eaten by the template
    (monitor,) = by_kind(docs, "ServiceMonitor")
    selected = monitor["spec"]["selector"]["matchLabels"]
    services = [
        s for s in by_kind(docs, "Service") if selected.items() <= s["metadata"]["labels"].items()
    ]
    assert {s["metadata"]["name"] for s in services} == {
        "t-dna-bootstrap",
        "t-dna-storage",
        "t-dna-stun",
    }
    assert all(s["spec"].get("clusterIP") != "None" for s in services)  # not headless
    dashboards = [
        d for d in by_kind(docs, "ConfigMap") if "grafana_dashboard" in d["metadata"]["labels"]
    ]
    files = {key for d in dashboards for key in d["data"]}
    assert files == {"dna-overlay.json", "dna-storage.json", "dna-stun.json"}


def test_per_pod_services_select_one_bootstrap_pod_each() -> None:
    docs = render("-f", str(CHART / "ci" / "public-values.yaml"))
    pods = {
        s["metadata"]["name"]: s["spec"]
        for s in by_kind(docs, "Service")
        if "statefulset.kubernetes.io/pod-name" in s["spec"]["selector"]
    }
    assert set(pods) == {f"t-dna-bootstrap-{i}" for i in range(3)}
    for name, spec in pods.items():
        assert spec["selector"]["statefulset.kubernetes.io/pod-name"] == name
        assert spec["type"] == "LoadBalancer"
        assert {
            "name": "overlay",
            "port": 17400,
            "targetPort": "overlay",
            "protocol": "UDP",
        } in spec["ports"]


# --- the STUN/TURN relay ---------------------------------------------------------------


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {var["name"]: var for var in container["env"]}


def test_the_relay_is_off_unless_enabled(default: list[dict[str, Any]]) -> None:
    assert not [d for d in default if d["metadata"]["name"].startswith("t-dna-stun")]


def test_the_relay_takes_udp_its_secret_from_a_secret_and_is_probed() -> None:
    docs = render("-f", str(CHART / "ci" / "public-values.yaml"))
    relay = named(docs, "Deployment", "t-dna-stun")
    pod = relay["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and relay["spec"]["strategy"] == {"type": "Recreate"}
    assert relay["spec"]["replicas"] == 2
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.org/dna/dna-stun:2.0.0"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = _env(container)
    assert env["DNA_STUN__AUTH__AUTH_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": "dna-turn",
        "key": "current",
    }
    assert env["DNA_STUN__AUTH__PREVIOUS_AUTH_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": "dna-turn",
        "key": "previous",
        "optional": True,
    }
    assert not by_kind(docs, "Secret")  # existingSecret: the chart makes none
    udp = named(docs, "Service", "t-dna-stun-udp")["spec"]
    assert udp["type"] == "LoadBalancer" and udp["externalTrafficPolicy"] == "Local"
    assert udp["ports"] == [{"name": "stun", "port": 3478, "targetPort": "stun", "protocol": "UDP"}]
    assert udp["selector"] == relay["spec"]["selector"]["matchLabels"]
    policy = named(docs, "NetworkPolicy", "t-dna-stun")["spec"]
    open_to_all = [rule["ports"] for rule in policy["ingress"] if "from" not in rule]
    assert open_to_all == [
        [
            {"port": 3478, "protocol": "UDP"},
            {"port": 50000, "endPort": 50999, "protocol": "UDP"},
        ]
    ]
    ops = [
        rule for rule in policy["ingress"] if {"port": 17480, "protocol": "TCP"} in rule["ports"]
    ]
    assert ops and all(rule.get("from") for rule in ops), "the ops port must not be open to all"
    budget = named(docs, "PodDisruptionBudget", "t-dna-stun")["spec"]
    assert budget["selector"] == relay["spec"]["selector"]


def test_without_an_existing_secret_the_chart_makes_a_random_one() -> None:
    monitoring = ["-f", str(CHART / "ci" / "monitoring-values.yaml")]
    secrets = [named(render(*monitoring), "Secret", "t-dna-stun-auth") for _ in range(2)]
    values = [s["data"]["auth-secret"] for s in secrets]
    assert len(base64.b64decode(values[0])) == 48 and values[0] != values[1]
    assert "auth_secret" not in (CHART / "values.yaml").read_text()  # never in values


@pytest.mark.parametrize("values", ["public-values.yaml", "monitoring-values.yaml"])
def test_the_relay_accepts_the_chart_config(values: str, tmp_path: Path) -> None:
    docs = render("-f", str(CHART / "ci" / values))
    (container,) = named(docs, "Deployment", "t-dna-stun")["spec"]["template"]["spec"]["containers"]
    path = tmp_path / "stun.toml"
    path.write_text(named(docs, "ConfigMap", "t-dna-stun")["data"]["stun.toml"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("DNA_")}
    env |= _pod_env(container, "10.1.2.3") | {"DNA_STUN__AUTH__AUTH_SECRET": "from-the-secret"}
    result = subprocess.run(
        [str(BIN / "dna-stun"), "check-config", "--config", str(path)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert effective["server"]["host"] == "10.1.2.3" == effective["ops"]["http_host"]
    assert effective["server"]["udp_port"] == ports["stun"]
    assert effective["ops"]["http_port"] == ports["http"]
    assert effective["auth"]["auth_secret"] == "***"  # set, and not printed
    if values == "public-values.yaml":
        assert (effective["server"]["relay_port_min"], effective["server"]["relay_port_max"]) == (
            50000,
            50999,
        )
        assert effective["relay"]["max_allocations"] == 5000
        assert effective["auth"]["realm"] == "dna.example.org"


def test_a_relay_port_range_upside_down_fails_naming_it() -> None:
    refused_by_template_and_lint(
        "stun.relayPortMin (60000) must not exceed stun.relayPortMax (50000)",
        "--set", "stun.enabled=true",
        "--set", "stun.relayPortMin=60000", "--set", "stun.relayPortMax=50000",
    )  # fmt: skip


# --- the nodes accept the config the chart writes --------------------------------------


def _pod_env(container: dict[str, Any], pod_ip: str) -> dict[str, str]:
    """The container's plain env as the kubelet would expand it for ``pod_ip``."""
    env = {"POD_IP": pod_ip}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"].replace("$(POD_IP)", pod_ip)
    return env


@pytest.mark.parametrize("values", [None, *VALUE_SETS], ids=lambda v: v.name if v else "default")
def test_the_nodes_accept_the_chart_config(values: Path | None, tmp_path: Path) -> None:
    docs = render(*(["-f", str(values)] if values else []))
    for sts in by_kind(docs, "StatefulSet"):
        (container,) = sts["spec"]["template"]["spec"]["containers"]
        config = named(docs, "ConfigMap", sts["metadata"]["name"])["data"]["node.toml"]
        path = tmp_path / f"{sts['metadata']['name']}.toml"
        path.write_text(config)
        binary, run, flag, _ = container["command"]
        assert (run, flag) == ("run", "--config")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DNA_")}
        result = subprocess.run(
            [str(BIN / binary), "check-config", "--config", str(path)],
            env={**env, **_pod_env(container, "10.1.2.3")},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        effective = json.loads(result.stdout)
        assert (
            effective["node"]["host"] == "10.1.2.3" and effective["ops"]["http_host"] == "10.1.2.3"
        )
        seeds = effective["overlay"]["bootstrap"]
        replicas = named(docs, "StatefulSet", "t-dna-bootstrap")["spec"]["replicas"]
        assert len(seeds) == replicas and all(".svc." in seed for seed in seeds)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert effective["node"]["udp_port"] == ports["overlay"]
        assert effective["node"]["grpc_port"] == ports["grpc"]
        assert effective["ops"]["http_port"] == ports["http"]


def test_config_overrides_reach_the_node(tmp_path: Path) -> None:
    docs = render("-f", str(CHART / "ci" / "public-values.yaml"))
    config = named(docs, "ConfigMap", "t-dna-storage")["data"]["node.toml"]
    parsed = tomllib.loads(config)
    assert parsed["admission"]["disk_high_water"] == 0.85
    assert (
        parsed["storage"]["ttl_days"] == 14 and parsed["storage"]["data_dir"] == "/data/mailboxes"
    )
    assert parsed["log_level"] == "debug"


# --- values.schema.json is generated ---------------------------------------------------


def test_values_schema_is_what_the_generator_writes() -> None:
    module = load_script("gen_chart_schema")
    committed = (CHART / "values.schema.json").read_text()
    assert module.render() == committed, "stale values.schema.json: run `make chart-schema`"


# --- the helm test hook sends a real message -------------------------------------------


def test_the_helm_test_script_sends_a_message_through_a_real_network(
    default: list[dict[str, Any]], tmp_path: Path
) -> None:
    """The hook pod's script, as rendered, run against a local testnet (3 bootstrap and 6
    storage processes) instead of the cluster: the same `dna` commands."""
    (pod,) = by_kind(default, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["metadata"]["annotations"]["helm.sh/hook-delete-policy"] == "before-hook-creation"
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "dna-peer:local"
    shell, flag, script = container["command"]
    assert (shell, flag) == ("sh", "-c")
    env = _pod_env(container, "10.1.2.3")
    assert env["DNA_BOOTSTRAP"].startswith("t-dna-bootstrap-0.t-dna-bootstrap-hl.dna.svc.")
    net = Testnet(tmp_path / "net", addresses=free_ips(9))
    try:
        net.up()
        seeds = ",".join(f"{host}:{port}" for host, port in net.seeds)
        clean = {k: v for k, v in os.environ.items() if not k.startswith("DNA_")}
        result = subprocess.run(
            ["sh", "-c", script],
            env={**clean, **env, "DNA_BOOTSTRAP": seeds, "TMPDIR": str(tmp_path),
                 "HOME": str(tmp_path), "PATH": f"{BIN}:{os.environ['PATH']}"},
            capture_output=True, text=True, timeout=240, check=False,
        )  # fmt: skip
    finally:
        net.down()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: helm-b-" in result.stdout and "received" in result.stdout


def test_the_relay_holds_no_more_allocations_than_relay_ports() -> None:
    # An allocation takes a relay port: the default range (256 ports) with dna-stun's default
    # 1000 allocations refused the 257th after 64 bind tries each, and warned at start.
    def relay_section(*args: str) -> dict[str, Any]:
        docs = render("--set", "stun.enabled=true", *args)
        config = named(docs, "ConfigMap", "t-dna-stun")["data"]["stun.toml"]
        section: dict[str, Any] = tomllib.loads(config)["relay"]
        return section

    assert relay_section() == {"max_allocations": 256}
    wide = ("--set", "stun.relayPortMin=40000", "--set", "stun.relayPortMax=60000")
    assert relay_section(*wide) == {"max_allocations": 1000}
    assert relay_section("--set", "stun.config.relay.max_allocations=50")["max_allocations"] == 50
