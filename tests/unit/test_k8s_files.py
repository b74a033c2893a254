"""docker/k8s/: the Kubernetes manifests pass kubernetes-validate (strict, offline schemas)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest

K8S = os.path.join(os.path.dirname(__file__), "..", "..", "docker", "k8s")


def test_manifests_are_valid_kubernetes() -> None:
    tool = shutil.which("kubernetes-validate")
    if tool is None:
        pytest.fail("kubernetes-validate is a test dependency: pip install -e '.[test]'")
    files = sorted(glob.glob(os.path.join(K8S, "*.yaml")))
    assert len(files) == 2
    done = subprocess.run([tool, "--strict", *files], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    passed = [line for line in (done.stdout + done.stderr).splitlines() if " passed for resource " in line]
    kinds = sorted(line.split("resource ")[1].split("/")[0] for line in passed)
    assert kinds == ["deployment", "job", "job", "persistentvolumeclaim", "service"]


def test_training_ranks_are_an_indexed_job_that_reads_its_rank() -> None:
    with open(os.path.join(K8S, "trainer.yaml")) as f:
        text = f.read()
    assert "completionMode: Indexed" in text
    assert "batch.kubernetes.io/job-completion-index" in text
    assert "BATCHUP_SERVER" in text and "tcp://batchup-server:5555" in text
