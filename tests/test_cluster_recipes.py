"""The cluster recipes in cluster/ are valid for the tools that read them, and agree with the
configs they run.

- ``cluster/ray-up.yaml`` passes what ``ray up`` checks before it touches a cloud: Ray's own
  autoscaler schema shipped in the ray package (``ray/autoscaler/ray-schema.json``) after
  Ray fills in its defaults (``prepare_config`` + ``validate_config``).
- ``cluster/kuberay-rayjob*.yaml`` pass the KubeRay RayJob CRD's ``openAPIV3Schema``
  (vendored: tests/vendored/kuberay-rayjob-v1.7.0.schema.json, with its source, version,
  commit and licence). Kubernetes silently drops fields a structural schema does not
  declare, so an undeclared field is an error here (a misspelt ``minReplica`` would do
  nothing on a cluster); ``nullable`` and ``x-kubernetes-int-or-string`` are honoured. The
  CEL rules (``x-kubernetes-validations``) are not evaluated.
- Each recipe runs a PIPELINE config that loads (``crossmodal run`` expects one), writes
  to object storage by default (the shared-volume variant mounts its output path on every
  pod), sizes its GPU workers to the config's actors, mounts a memory ``/dev/shm``, takes
  credentials only from a secret or the provider chain, and names ``data.path`` (never a
  ``data.root`` that does not exist).

The object-storage configs use the ``storage_options`` field of the collect and pipeline
schemas (crossmodal/schemas/), which the object-storage work adds.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
CRD = Path(__file__).resolve().parent / "vendored" / "kuberay-rayjob-v1.7.0.schema.json"
RAYJOBS = sorted(CLUSTER.glob("kuberay-rayjob*.yaml"))


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


# ------------------------------------------------------------------------------ ray up


def _ray_up_errors(config: dict[str, Any]) -> list[str]:
    """What ``ray up`` says about ``config`` before it starts anything ([] = accepted)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except (jsonschema.ValidationError, ValueError) as err:
        return [str(err).splitlines()[0]]
    return []


def test_ray_up_recipe_passes_rays_own_schema():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = _load(CLUSTER / "ray-up.yaml")
    assert list(jsonschema.Draft7Validator(schema).iter_errors(config)) == []
    assert _ray_up_errors(config) == []
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_worker"]["min_worker"] = 1  # the check bites
    assert "'min_worker' was unexpected" in _ray_up_errors(bad)[0]


# ------------------------------------------------------------------------------ KubeRay


def _structural(schema: Any) -> Any:
    """The CRD schema as Kubernetes applies it, in JSON Schema: undeclared fields are
    errors (Kubernetes prunes them), ``nullable`` admits null, int-or-string is either."""
    if isinstance(schema, list):
        return [_structural(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _structural(v) for k, v in schema.items() if k != "properties"}
    if "properties" in schema:
        out["properties"] = {k: _structural(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@pytest.fixture(scope="module")
def rayjob_validator() -> jsonschema.Draft7Validator:
    vendored = json.loads(CRD.read_text())
    assert vendored["_vendored"]["version"] == "v1.7.0"
    assert vendored["_vendored"]["path"] == "ray-operator/config/crd/bases/ray.io_rayjobs.yaml"
    return jsonschema.Draft7Validator(_structural(vendored["openAPIV3Schema"]))


def _crd_errors(validator: jsonschema.Draft7Validator, doc: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


@pytest.mark.parametrize("path", RAYJOBS, ids=[p.name for p in RAYJOBS])
def test_rayjob_recipes_pass_the_kuberay_crd_schema(path, rayjob_validator):
    doc = _load(path)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    assert _crd_errors(rayjob_validator, doc) == []


def test_the_crd_check_catches_undeclared_fields_and_wrong_types(rayjob_validator):
    doc = _load(CLUSTER / "kuberay-rayjob.yaml")
    group = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["minReplica"] = 1
    group["replicas"] = "four"
    doc["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] = None
    errors = "\n".join(_crd_errors(rayjob_validator, doc))
    assert "'minReplica' was unexpected" in errors
    assert "replicas: 'four' is not of type 'integer'" in errors
    assert "enableInTreeAutoscaling: None is not of type 'boolean'" in errors


# ------------------------------------------------------------------------------ agreement


def _entry_config(command: str) -> Path:
    """The config file a ``[cd /opt/crossmodal &&] python -m jobs.pipeline CONFIG`` runs."""
    words = shlex.split(command.split("&&")[-1])
    assert words[:3] == ["python", "-m", "jobs.pipeline"], command
    return REPO / words[3]


def _pods(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def _pipeline(path: Path):
    from crossmodal.pipeline import load_pipeline

    return load_pipeline(path)


@pytest.mark.parametrize("path", RAYJOBS, ids=[p.name for p in RAYJOBS])
def test_rayjob_runs_a_pipeline_config_sized_to_its_workers(path, monkeypatch):
    doc = _load(path)
    assert "cd /opt/crossmodal &&" in doc["spec"]["entrypoint"]  # cluster/Dockerfile's WORKDIR
    monkeypatch.chdir(REPO)
    pipeline = _pipeline(_entry_config(doc["spec"]["entrypoint"]))
    actors = pipeline.collect.actors
    spec = doc["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is False  # fixed size: replicas are what runs
    gpus = 0
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus += group["replicas"] * int(limits.get("nvidia.com/gpu", 0))
    assert gpus == actors.count * actors.num_gpus  # one GPU per Collector, none idle
    for pod in _pods(doc):
        shm = {m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
        shm = [v for v in pod["volumes"] if v["name"] in shm and "emptyDir" in v]
        mounts = {m["name"]: m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]}
        assert any(v["emptyDir"].get("medium") == "Memory" for v in shm)
        assert "/dev/shm" in [mounts[v["name"]] for v in shm]


def test_the_default_recipes_write_to_object_storage_with_credentials_outside_configs(
    monkeypatch,
):
    monkeypatch.chdir(REPO)
    rayjob = _load(CLUSTER / "kuberay-rayjob.yaml")
    pipeline = _pipeline(_entry_config(rayjob["spec"]["entrypoint"]))
    assert str(pipeline.collect.output).startswith("s3://BUCKET/")
    for pod in _pods(rayjob):
        for container in pod["containers"]:
            assert {"secretRef": {"name": "crossmodal-s3"}} in container["envFrom"]
            literal = [e["name"] for e in container.get("env", []) if "value" in e]
            assert not [n for n in literal if re.search("KEY|SECRET|TOKEN", n)], literal
    ray_up = (CLUSTER / "ray-up.yaml").read_text()
    submit = [line for line in ray_up.splitlines() if line.startswith("#   $ ray job submit")]
    assert len(submit) == 1
    command = shlex.split(submit[0].removeprefix("#   $ "))[-1]
    up_pipeline = _pipeline(_entry_config(command))
    assert up_pipeline.collect_path == pipeline.collect_path
    assert _load(CLUSTER / "ray-up.yaml")["max_workers"] == up_pipeline.collect.actors.count
    assert "data.path" in ray_up and "data.root" not in ray_up
    for text in (ray_up, *(p.read_text() for p in RAYJOBS)):
        assert not re.search(r"AKIA[0-9A-Z]{16}|SECRET_ACCESS_KEY\W+[A-Za-z0-9/+]{40}", text)


def test_the_shared_volume_variant_mounts_its_output_on_every_pod(monkeypatch):
    monkeypatch.chdir(REPO)
    doc = _load(CLUSTER / "kuberay-rayjob-shared-volume.yaml")
    pipeline = _pipeline(_entry_config(doc["spec"]["entrypoint"]))
    output = Path("/opt/crossmodal") / pipeline.collect.output  # relative to the WORKDIR
    for pod in _pods(doc):
        mounts = [m for c in pod["containers"] for m in c["volumeMounts"]]
        shared = [m for m in mounts if m["name"] == "data" and not m.get("readOnly")]
        assert any(output.is_relative_to(m["mountPath"]) for m in shared), mounts
        claims = {v["name"]: v.get("persistentVolumeClaim") for v in pod["volumes"]}
        assert claims["data"] == {"claimName": "crossmodal-data"}
