"""The Kubernetes driver: nodes as the pods of the Helm chart (deploy/helm/dna) on a real
cluster, through kubectl.

NOT RUN HERE: this project's machines cannot run a Kubernetes API server. Its unit tests
(tests/testnet/test_harness_kubernetes.py) check the kubectl commands it would run, with a
runner that records them instead of running them.

Pods belong to StatefulSets, which recreate a deleted pod on their own: `stop`, `kill`
and `restart` delete the pod (gracefully or not) and it comes back; `start` only waits for
it. Freezing a pod needs Chaos Mesh (deploy/chaos, the frozen-replica scenario): a
container's own PID 1 ignores SIGSTOP, so `pause` and `resume` say so instead.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence

from dna_testnet.harness.driver import Cluster, NodeAddress
from dna_testnet.topology import Topology

__all__ = ["KubernetesDriver", "UnsupportedError", "kubernetes_cluster"]

Runner = Callable[[Sequence[str]], str]


class UnsupportedError(RuntimeError):
    """An operation this driver cannot do on a cluster; the message says what can."""


def run_kubectl(argv: Sequence[str]) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr}")
    return done.stdout


class KubernetesDriver:
    """The `Driver` over the pods of chart release ``release`` in ``namespace``. Topology
    node ``<role>N`` (bootstrap1, storage3) is pod ``<fullname>-<role>-<N-1>``, where the
    chart's fullname is ``<release>-dna``, or the release name when it contains "dna"
    (templates/_helpers.tpl; no nameOverride or fullnameOverride)."""

    def __init__(
        self,
        release: str,
        namespace: str,
        *,
        cluster_domain: str = "cluster.local",
        kubectl: Sequence[str] = ("kubectl",),
        runner: Runner = run_kubectl,
    ) -> None:
        self.release, self.namespace, self.cluster_domain = release, namespace, cluster_domain
        self.kubectl, self.runner = list(kubectl), runner
        self.fullname = release if "dna" in release else f"{release}-dna"

    def pod(self, name: str) -> str:
        for role in ("bootstrap", "storage"):
            index = name.removeprefix(role)
            if index != name and index.isdigit() and int(index) >= 1:
                return f"{self.fullname}-{role}-{int(index) - 1}"
        raise ValueError(f"{name!r} is not a topology node name (bootstrapN or storageN)")

    def node_name(self, pod: str) -> str | None:
        """The topology node name of a chart pod (`pod`'s inverse), None for another pod."""
        for role in ("bootstrap", "storage"):
            index = pod.removeprefix(f"{self.fullname}-{role}-")
            if index != pod and index.isdigit():
                return f"{role}{int(index) + 1}"
        return None

    def _run(self, *args: str) -> str:
        return self.runner([*self.kubectl, "-n", self.namespace, *args])

    def start(self, name: str) -> None:
        """The StatefulSet recreates a deleted pod itself: wait until it is ready."""
        self._run("wait", "--for=condition=Ready", f"pod/{self.pod(name)}", "--timeout=600s")

    def stop(self, name: str, timeout: float = 15.0) -> None:
        self._run("delete", "pod", self.pod(name), f"--grace-period={round(timeout)}", "--wait")

    def kill(self, name: str) -> None:
        self._run("delete", "pod", self.pod(name), "--grace-period=0", "--force")

    def restart(self, name: str) -> None:
        self.stop(name)
        self.start(name)

    def pause(self, name: str) -> None:
        raise UnsupportedError(
            f"cannot pause {self.pod(name)} with kubectl: apply deploy/chaos/chaos-mesh/"
            "frozen-replica.yaml (Chaos Mesh) instead"
        )

    def resume(self, name: str) -> None:
        raise UnsupportedError(
            f"cannot resume {self.pod(name)} with kubectl: delete the Chaos Mesh object that "
            "froze it"
        )

    def wipe(self, name: str) -> None:
        """Delete the pod's volume claim (`data-<pod>`, freed once the pod is gone), then the
        pod: the StatefulSet recreates both, the volume empty. As deploy/chaos/run.sh does."""
        pod = self.pod(name)
        self._run("delete", "pvc", f"data-{pod}", "--wait=false")
        self._run("delete", "pod", pod, "--grace-period=0", "--force")

    def wait_healthy(self, names: Sequence[str], timeout: float = 240) -> None:
        """Every node's pod Ready (`kubectl wait`, one node after the other)."""
        for name in names:
            pod = f"pod/{self.pod(name)}"
            self._run("wait", "--for=condition=Ready", pod, f"--timeout={timeout:.0f}s")

    def address(self, name: str) -> NodeAddress:
        """The pod's stable DNS name through its role's headless Service."""
        pod = self.pod(name)
        headless = f"{pod.rsplit('-', 1)[0]}-hl"
        return NodeAddress(f"{pod}.{headless}.{self.namespace}.svc.{self.cluster_domain}")

    def is_running(self, name: str) -> bool:
        phase = self._run("get", "pod", self.pod(name), "-o", "jsonpath={.status.phase}")
        return phase.strip() == "Running"

    def is_ready(self, name: str) -> bool:
        ready = self._run(
            "get", "pod", self.pod(name),
            "-o", 'jsonpath={.status.conditions[?(@.type=="Ready")].status}',
        )  # fmt: skip
        return ready.strip() == "True"

    def logs(self, name: str) -> str:
        return self._run("logs", self.pod(name))


def kubernetes_cluster(
    topology: Topology, release: str, namespace: str, *, runner: Runner = run_kubectl
) -> Cluster[KubernetesDriver]:
    """``topology``'s nodes as the pods of a chart release installed with as many of each
    role (`bootstrap.replicas`, `storage.replicas`)."""
    return Cluster(topology, KubernetesDriver(release, namespace, runner=runner))
