"""cluster/kubernetes/daskjob.yaml against the Dask Kubernetes operator's own DaskJob CRD schema.

The CRD is ``crds/daskjob.yaml`` of the operator's Helm chart as shipped in the dask-kubernetes 2026.3.0
wheel (BSD-3-Clause, ``tests/data/dask-kubernetes/LICENSE``): copied, not installed, because the
package's ``kubernetes`` dependency pins a pydantic and a dateutil that conflict with ours.
"""

from __future__ import annotations

import copy
import functools

import jsonschema
import pytest
import yaml

from tilemask import Workflow
from tilemask.cli import main

from .conftest import REPO

MANIFEST = REPO / "cluster" / "kubernetes" / "daskjob.yaml"
CRD = REPO / "tests" / "data" / "dask-kubernetes" / "daskjob.yaml"


def documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}


@functools.cache
def daskjob_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "DaskJob"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def errors(document: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(daskjob_schema())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


@pytest.mark.slow
def test_the_daskjob_manifest_is_valid_under_the_operators_crd():
    job = documents()["DaskJob"]
    assert job["apiVersion"] == "kubernetes.dask.org/v1"
    assert errors(job) == []


def test_the_schema_refuses_a_broken_daskjob():
    """The validation can fail: a wrong type deep in the cluster spec and a missing job spec are found."""
    job = copy.deepcopy(documents()["DaskJob"])
    job["spec"]["cluster"]["spec"]["worker"]["replicas"] = "four"
    del job["spec"]["job"]
    found = errors(job)
    assert any("replicas" in e for e in found) and any("'job' is a required property" in e for e in found), found


def test_the_job_runs_a_valid_workflow_with_a_valid_tilemask_command():
    docs = documents()
    workflow = Workflow.from_dict(yaml.safe_load(docs["ConfigMap"]["data"]["workflow.yaml"]), base_dir="/")
    assert workflow.output.path.startswith("/data/")
    (container,) = docs["DaskJob"]["spec"]["job"]["spec"]["containers"]
    args = container["args"]
    assert args[:2] == ["tilemask", "run"]
    # The workflow is mounted as the file itself: through a ConfigMap folder it is a link into a folder kubelet
    # names anew for every pod, its job named by that folder, and the DaskJob applied again was a new job whose
    # every input failed on the first pod's outputs ("exists; pass --overwrite"), where the manifest says it resumes.
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "workflow"]
    assert (mount["mountPath"], mount.get("subPath")) == (args[2], "workflow.yaml")
    ctx = main.make_context("tilemask", args[1:])
    name, command, rest = main.resolve_command(ctx, ctx.protected_args + ctx.args)
    params = command.make_context(name, rest).params  # a usage error raises here
    assert params["scheduler"] == "$(DASK_SCHEDULER_ADDRESS)" and params["on_error"] == "skip"
    with pytest.raises(Exception):
        command.make_context(name, [*rest, "--on-error", "sometimes"])
