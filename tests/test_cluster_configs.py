"""cluster/: the autoscaler YAML against Ray's own schema, the KubeRay manifests' required fields, the
study commands they document compose, and the local GPU/CPU request checks of ``init_ray``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from workflows.execute import ClusterConfig, init_ray

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
AUTOSCALER = CLUSTER / "autoscaler-gpu.yaml"
KUBERAY = CLUSTER / "kuberay-raycluster.yaml"
STUDY_COMMAND = re.compile(r"python -m workflows\.study((?:[ \t]+(?:\\\n)?\s*[^\s#\\]+)*)")


def _schema() -> dict:
    import ray

    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    if not path.exists():
        pytest.skip(f"this ray {ray.__version__} ships no {path}: nothing to validate against")
    return json.loads(path.read_text())


def _autoscaler() -> dict:
    return yaml.safe_load(AUTOSCALER.read_text())


def _kuberay() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(KUBERAY.read_text()) if doc}


def test_autoscaler_yaml_matches_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema, config = _schema(), _autoscaler()
    jsonschema.validate(config, schema)
    legacy = config | {"min_workers": 0}  # the validator bites: the pre-2.x top-level field is refused
    with pytest.raises(jsonschema.ValidationError, match="min_workers"):
        jsonschema.validate(legacy, schema)


def test_autoscaler_yaml_survives_ray_up_preparation():
    """The path `ray up` takes offline: provider defaults filled in, then validated again."""
    pytest.importorskip("jsonschema")
    util = pytest.importorskip("ray.autoscaler._private.util")
    prepared = util.prepare_config(_autoscaler())
    util.validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["head"]["max_workers"] == 0


def test_autoscaler_gpu_workers_install_the_project():
    config = _autoscaler()
    types = config["available_node_types"]
    gpu = types["gpu_worker"]
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= config["max_workers"]
    assert gpu["node_config"]["InstanceType"].startswith("g")  # an AWS GPU family
    install = "pip install -q -e /home/ray/susc"
    assert install in gpu["worker_setup_commands"] and install in config["head_setup_commands"]
    assert any("download.pytorch.org/whl/cpu" in c for c in config["head_setup_commands"])  # CPU torch on the head
    assert not any("whl/cpu" in c for c in gpu["worker_setup_commands"])  # CUDA torch on GPU workers
    assert "/home/ray/susc" in config["file_mounts"]
    assert all("RAY_AUTH_MODE=token" in " ".join(config[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands"))


def test_kuberay_raycluster_has_required_fields():
    docs = _kuberay()
    assert set(docs) == {"PersistentVolumeClaim", "RayCluster", "RayJob"}
    cluster = docs["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["name"] == "susc-gpu"
    head = cluster["spec"]["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container["image"] and "nvidia.com/gpu" not in head_container["resources"]["limits"]
    groups = cluster["spec"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["gpu"]
    for group in groups:
        assert isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] == head_container["image"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    claim = docs["PersistentVolumeClaim"]["metadata"]["name"]
    for spec in [head["template"]["spec"]] + [g["template"]["spec"] for g in groups]:
        assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim


def test_kuberay_rayjob_targets_the_cluster():
    docs = _kuberay()
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == docs["RayCluster"]["metadata"]["name"]
    assert job["spec"]["entrypoint"].startswith("python -m workflows.study ")
    mount = docs["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]
    assert f"cache_dir={mount['mountPath']}/" in job["spec"]["entrypoint"]  # the cache outlives pods


def test_ray_versions_agree_across_cluster_files():
    tags = re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-(?:cpu|gpu)", AUTOSCALER.read_text()
                      + (CLUSTER / "Dockerfile").read_text())
    assert len(tags) == 3 and len(set(tags)) == 1
    assert _kuberay()["RayCluster"]["spec"]["rayVersion"] == tags[0]


def _documented_commands() -> list[tuple[str, list[str]]]:
    """(file, overrides) of every `python -m workflows.study ...` in the cluster docs and manifests."""
    found = []
    for path in (CLUSTER / "README.md", KUBERAY, AUTOSCALER):
        text = path.read_text()
        if path == KUBERAY:  # the RayJob's folded entrypoint
            text += "\n" + _kuberay()["RayJob"]["spec"]["entrypoint"]
        for match in STUDY_COMMAND.finditer(text):
            tokens = match.group(1).replace("\\\n", " ").split()
            found.append((path.name, [t for t in tokens if t != "..." and not t.startswith("-")]))
    return found


def test_documented_study_commands_compose():
    from hydra import compose, initialize_config_module

    from workflows.runtime import register_resolvers
    from workflows.study_config import register

    register()
    register_resolvers()
    commands = _documented_commands()
    assert {name for name, _ in commands} == {"README.md", KUBERAY.name, AUTOSCALER.name}
    assert len(commands) >= 4
    with initialize_config_module(version_base="1.3", config_module="conf"):
        for name, overrides in commands:
            cfg = compose("study", overrides=overrides, return_hydra_config=True)
            assert cfg.cluster.executor == "ray" and cfg.cluster.address == "auto", (name, overrides)
            if "model.device=cuda" in overrides:
                assert cfg.cluster.task_gpus == 0.25, (name, overrides)
        gpu = compose("study", overrides=["cluster=gpu"]).cluster
        attach = compose("study", overrides=["cluster=attach"]).cluster
        assert (gpu.task_gpus, gpu.task_cpus, gpu.wait_timeout_s) == (attach.task_gpus, attach.task_cpus, 1800)


def test_local_runtime_refuses_gpu_requests_it_cannot_place(ray_session):
    """The session runtime advertises 2 CPUs and no GPU: a fractional GPU request fails before any task."""
    resources = init_ray(ClusterConfig(address="local", task_cpus=1, task_gpus=0.0))
    assert resources["CPU"] == 2 and resources.get("GPU", 0) == 0
    with pytest.raises(ValueError, match=r"cluster\.task_gpus=0\.25 .* 0 GPUs"):
        init_ray(ClusterConfig(address="local", task_gpus=0.25))
    with pytest.raises(ValueError, match=r"cluster\.task_cpus=3 exceeds .* 2\.0 CPUs"):
        init_ray(ClusterConfig(address="local", task_cpus=3))


def test_attached_cluster_defers_placement_to_ray(ray_session):
    """On an attached cluster the autoscaler may still add GPU nodes: no local refusal."""
    resources = init_ray(ClusterConfig(address="auto", task_gpus=0.25))
    assert resources["CPU"] == 2 and resources.get("GPU", 0) == 0
