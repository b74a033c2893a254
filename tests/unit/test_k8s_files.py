"""docker/k8s/: the Kubernetes manifests pass kubernetes-validate (strict, offline schemas)."""

from __future__ import annotations

import glob
import os
import subprocess

import yaml

from tests.tools import tool_path

K8S = os.path.join(os.path.dirname(__file__), "..", "..", "docker", "k8s")


def test_manifests_are_valid_kubernetes() -> None:
    tool = tool_path("kubernetes-validate", "pip install kubernetes-validate")
    files = sorted(glob.glob(os.path.join(K8S, "*.yaml")))
    assert len(files) == 2
    done = subprocess.run([tool, "--strict", *files], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    passed = [line for line in (done.stdout + done.stderr).splitlines() if " passed for resource " in line]
    kinds = sorted(line.split("resource ")[1].split("/")[0] for line in passed)
    assert kinds == ["job", "job", "persistentvolumeclaim", "service", "statefulset"]


def test_training_ranks_are_an_indexed_job_that_reads_its_rank() -> None:
    with open(os.path.join(K8S, "trainer.yaml")) as f:
        text = f.read()
    assert "completionMode: Indexed" in text
    assert "batch.kubernetes.io/job-completion-index" in text
    assert "BATCHUP_SERVER" in text


def _docs(name: str) -> list[dict]:
    with open(os.path.join(K8S, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def test_every_rank_reaches_every_server_pod_by_its_own_name() -> None:
    """A StatefulSet behind a headless Service gives each server pod a DNS name; the
    trainers list all of them, so batches fan out over every server (not one per rank)."""
    server = {d["kind"]: d for d in _docs("server.yaml")}
    sset, service = server["StatefulSet"], server["Service"]
    assert service["spec"]["clusterIP"] == "None"
    assert sset["spec"]["serviceName"] == service["metadata"]["name"]
    name, svc, replicas = sset["metadata"]["name"], service["metadata"]["name"], sset["spec"]["replicas"]
    port = service["spec"]["ports"][0]["port"]
    (job,) = _docs("trainer.yaml")
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    addresses = env["BATCHUP_SERVER"].split(",")
    assert addresses == [f"tcp://{name}-{i}.{svc}:{port}" for i in range(replicas)]


def test_probes_ping_the_keyless_health_endpoint_the_server_binds() -> None:
    server = {d["kind"]: d for d in _docs("server.yaml")}
    (container,) = server["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    health = command[command.index("--health-bind") + 1]
    assert health.startswith("tcp://127.0.0.1:")
    for probe in ("readinessProbe", "livenessProbe"):
        ping = container[probe]["exec"]["command"]
        assert ping[:3] == ["batchup-server", "ping", health] and "--client-key" not in ping
