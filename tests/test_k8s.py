"""The Kubernetes launcher: manifests valid against the Kubeflow CRDs and the core API schemas,
secure by default, no secret in clear, apply-and-follow through kubectl, and a PyTorchJob whose
pods' commands really train when run locally with the variables the operator would inject."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from qlorax.errors import ConfigError, QloraxError
from qlorax.launchers import k8s
from qlorax.spec import compose
from qlorax.specfile import save_spec

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("QLORAX_ASSETS", REPO.parent / "shared" / "assets"))
CRDS = {"PyTorchJob": "kubeflow.org_pytorchjobs.training-operator-v1.9.0.yaml",
        "MPIJob": "kubeflow.org_mpijobs.mpi-operator-v2beta1.yaml"}
K8S_VERSION = "1.30"
# workers=2 needs a global batch divisible by micro_batch_size x workers.
BASE = ["parallel=k8s", "workers=2", "train.batch_size=4", "train.micro_batch_size=2"]


def make_spec(tmp_path: Path, *overrides: str):
    return compose(BASE + [f"run_dir={tmp_path / 'run'}", *overrides])


def pod_templates(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every pod template of a PyTorchJob, MPIJob or Job, by replica type."""
    if obj["kind"] == "PyTorchJob":
        return {name: r["template"] for name, r in obj["spec"]["pytorchReplicaSpecs"].items()}
    if obj["kind"] == "MPIJob":
        return {name: r["template"] for name, r in obj["spec"]["mpiReplicaSpecs"].items()}
    if obj["kind"] == "Job":
        return {"Job": obj["spec"]["template"]}
    return {}


def workload(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] in ("PyTorchJob", "MPIJob", "Job"))


def all_kinds(tmp_path: Path, *overrides: str) -> dict[str, list[dict[str, Any]]]:
    return {kind: k8s.render(make_spec(tmp_path, f"k8s.kind={kind}", *overrides)) for kind in k8s.KINDS}


# ---------------------------------------------------------------- strict CRD validation
def strict(schema: Any) -> Any:
    """A CRD's openAPIV3Schema as strict JSON Schema (see ../shared/assets/README.md)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: strict(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = strict(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [strict(s) for s in value]
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if ("properties" in out and "additionalProperties" not in out
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False   # a typo in a field name must fail
    return out


def crd_validator(kind: str):
    jsonschema = pytest.importorskip("jsonschema")
    path = ASSETS / "k8s" / CRDS[kind]
    if not path.is_file():
        pytest.skip(f"CRD {path} not found: set QLORAX_ASSETS to the shared assets folder")
    crd = yaml.safe_load(path.read_text())
    return {f"{crd['spec']['group']}/{v['name']}": jsonschema.Draft7Validator(strict(v["schema"]["openAPIV3Schema"]))
            for v in crd["spec"]["versions"]}


def validate_crd(obj: dict[str, Any]) -> None:
    validators = crd_validator(obj["kind"])
    assert obj["apiVersion"] in validators, f"{obj['apiVersion']} not served by the CRD ({list(validators)})"
    errors = sorted(validators[obj["apiVersion"]].iter_errors(obj), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def validate_core(obj: dict[str, Any]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def as_pod_template(template: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}


@pytest.mark.assets
def test_strict_crd_check_rejects_a_misspelt_field(tmp_path):
    job = workload(k8s.render(make_spec(tmp_path)))
    job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(AssertionError, match="imagePullPolicyy"):
        validate_crd(job)


@pytest.mark.assets
def test_pytorchjob_is_valid(tmp_path):
    objects = k8s.render(make_spec(tmp_path, "k8s.kind=pytorchjob"))
    assert [o["kind"] for o in objects] == ["ConfigMap", "PyTorchJob"]
    job = objects[1]
    validate_crd(job)
    validate_core(objects[0])
    for template in pod_templates(job).values():
        validate_core(as_pod_template(template))
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 1
    assert {r["restartPolicy"] for r in replicas.values()} <= {"OnFailure", "Never"}
    assert job["spec"]["runPolicy"]["cleanPodPolicy"] == "None"
    assert job["spec"]["runPolicy"]["backoffLimit"] >= 1
    container = replicas["Master"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch"      # the operator injects its variables into this container
    assert {"name": "pytorchjob-port", "containerPort": 29500} in container["ports"]


@pytest.mark.assets
def test_mpijob_is_valid(tmp_path):
    spec = make_spec(tmp_path, "k8s.kind=mpijob")
    objects = k8s.render(spec)
    assert [o["kind"] for o in objects] == ["ConfigMap", "MPIJob"]
    job = objects[1]
    validate_crd(job)
    for template in pod_templates(job).values():
        validate_core(as_pod_template(template))
    replicas = job["spec"]["mpiReplicaSpecs"]
    assert replicas["Launcher"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    script = replicas["Launcher"]["template"]["spec"]["containers"][0]["command"][-1]
    name = k8s.names(spec).job
    assert "mpirun -n 2 " in script
    assert f"-x MASTER_ADDR={name}-worker-0.{name}-worker.default.svc" in script
    assert f"python -m qlorax.launchers.worker --run-dir {k8s.names(spec).run_dir} --stages train,merge,verify" in script
    assert "sleep" not in script      # the launcher ends with mpirun, so the job ends with training


def test_mpijob_launcher_script_copies_the_spec_and_forwards_the_environment(tmp_path):
    """Run the launcher container's script with a fake mpirun that records its arguments."""
    volume = tmp_path / "volume"
    spec = make_spec(tmp_path, "k8s.kind=mpijob", f"k8s.mount_path={volume}", "k8s.hub_token_secret=hf:token")
    config_map, job = k8s.render(spec)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(config_map["data"]["spec.yaml"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mpirun").write_text('#!/bin/sh\nfor a in "$@"; do printf \'%s\\n\' "$a"; done > "$ARGS_OUT"\n')
    (bin_dir / "mpirun").chmod(0o755)
    container = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    for cache in ("/opt/qlorax/cache", None):
        env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "QLORAX_SPEC_SOURCE": str(spec_file),
               "ARGS_OUT": str(tmp_path / "args"), **({"QLORAX_CACHE": cache} if cache else {})}
        subprocess.run(container["command"], env=env, check=True, timeout=30)
        args = (tmp_path / "args").read_text().splitlines()
        assert args[:2] == ["-n", "2"]
        assert args[args.index("python"):] == k8s.worker_command(spec)
        exported = [args[i + 1] for i, a in enumerate(args) if a == "-x"]
        assert "HF_TOKEN" in exported and "LOCAL_WORLD_SIZE=1" in exported
        assert ("QLORAX_CACHE" in exported) == (cache is not None)
    run_dir = Path(k8s.names(spec).run_dir)
    assert (run_dir / "spec.yaml").read_text() == spec_file.read_text() and (run_dir / "logs").is_dir()


def test_job_and_service_are_valid(tmp_path):
    spec = make_spec(tmp_path, "k8s.kind=job")
    objects = k8s.render(spec)
    assert [o["kind"] for o in objects] == ["ConfigMap", "Service", "Job"]
    for obj in objects:
        validate_core(obj)
    service, job = objects[1], objects[2]
    assert service["spec"]["clusterIP"] == "None"
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    assert all(job["spec"]["template"]["metadata"]["labels"][k] == v for k, v in service["spec"]["selector"].items())
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["WORLD_SIZE"]["value"] == "2"
    assert env["MASTER_ADDR"]["value"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"


def test_every_kind_runs_the_worker_entry_point_with_the_spec_from_the_configmap(tmp_path):
    for kind, objects in all_kinds(tmp_path, "k8s.mount_path=/data").items():
        cm = objects[0]
        pod_spec = yaml.safe_load(cm["data"]["spec.yaml"])
        run_dir = pod_spec["run_dir"]
        assert run_dir.startswith("/data/outputs/run-")
        text = k8s.to_yaml(objects)
        assert f"python -m qlorax.launchers.worker --run-dir {run_dir} --stages train,merge,verify" in text, kind
        for template in pod_templates(workload(objects)).values():
            pod = template["spec"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
            assert volumes[k8s.DATA_VOLUME]["persistentVolumeClaim"]["claimName"] == "qlorax-data"
            assert mounts[k8s.DATA_VOLUME] == "/data"
            if k8s.SPEC_VOLUME in volumes:    # MPI workers only run sshd: no spec needed there
                assert volumes[k8s.SPEC_VOLUME]["configMap"]["name"] == cm["metadata"]["name"]


def test_security_context_resources_and_placement(tmp_path):
    tolerations = "[{key: dedicated, operator: Equal, value: training, effect: NoSchedule}]"
    kinds = all_kinds(tmp_path, "k8s.cpu=7500m", "k8s.memory=16Gi", "k8s.run_as_user=1234",
                      "++k8s.node_selector={node.kubernetes.io/instance-type: xeon}",
                      f"k8s.tolerations={tolerations}", "k8s.namespace=ml", "k8s.image=reg.example/qlorax:1",
                      "k8s.image_pull_policy=Always")
    for kind, objects in kinds.items():
        assert {o["metadata"]["namespace"] for o in objects} == {"ml"}, kind
        for replica, template in pod_templates(workload(objects)).items():
            pod = template["spec"]
            sec = pod["securityContext"]
            assert sec["runAsNonRoot"] is True and sec["runAsUser"] == 1234
            assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "xeon"}
            assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "training",
                                           "effect": "NoSchedule"}]
            for container in pod["containers"]:
                assert container["securityContext"]["allowPrivilegeEscalation"] is False
                assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
                assert container["image"] == "reg.example/qlorax:1"
                assert container["imagePullPolicy"] == "Always"
                res = container["resources"]
                assert res["requests"] == res["limits"]
                if replica != "Launcher":
                    assert res["limits"] == {"cpu": "7500m", "memory": "16Gi"}
    pytorch = workload(kinds["pytorchjob"])["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pytorch["containers"][0]["env"]}
    assert env["OMP_NUM_THREADS"] == "7"       # 7500m rounded down
    assert "-x OMP_NUM_THREADS=7 " in k8s.to_yaml(kinds["mpijob"])


def test_threads_follow_k8s_threads_or_the_cpu_limit():
    assert k8s.cpu_threads("8") == 8
    assert k8s.cpu_threads("7500m") == 7
    assert k8s.cpu_threads("500m") == 1
    assert k8s.cpu_threads("2.5") == 2
    assert k8s.cpu_threads("8", threads=3) == 3


def test_volume_kinds(tmp_path):
    nfs = k8s.render(make_spec(tmp_path, "k8s.volume=nfs", "k8s.nfs_server=nfs.example", "k8s.volume_path=/export/q"))
    host = k8s.render(make_spec(tmp_path, "k8s.volume=hostPath", "k8s.volume_path=/mnt/q", "k8s.kind=job"))
    nfs_pod = pod_templates(workload(nfs))["Master"]["spec"]
    host_pod = pod_templates(workload(host))["Job"]["spec"]
    assert nfs_pod["volumes"][0]["nfs"] == {"server": "nfs.example", "path": "/export/q"}
    assert host_pod["volumes"][0]["hostPath"]["path"] == "/mnt/q"
    validate_core(as_pod_template(pod_templates(workload(nfs))["Master"]))
    validate_core(workload(host))


def test_hub_token_comes_from_a_secret_and_is_never_written(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret-value")
    kinds = all_kinds(tmp_path, "k8s.hub_token_secret=hf-token:token")
    spec = make_spec(tmp_path, "k8s.hub_token_secret=hf-token:token")
    save_spec(spec, Path(spec.run_dir) / "spec.yaml")
    written = k8s.write_manifests(spec)
    texts = [k8s.to_yaml(objs) for objs in kinds.values()] + [written.read_text(),
                                                             (Path(spec.run_dir) / "spec.yaml").read_text()]
    assert all("secret-value" not in text for text in texts)
    for kind, objects in kinds.items():
        refs = [e for t in pod_templates(workload(objects)).values() for c in t["spec"]["containers"]
                for e in c.get("env", []) if e["name"] == "HF_TOKEN"]
        assert refs, kind
        assert all(e == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}
                   for e in refs)
    assert "-x HF_TOKEN " in k8s.to_yaml(kinds["mpijob"])   # forwarded by name to the ranks


def test_bad_cpu_quantity_fails_at_compose_time(tmp_path):
    with pytest.raises(ConfigError) as err:
        make_spec(tmp_path, "k8s.cpu=abc")
    assert "k8s.cpu" in [p.key for p in err.value.problems]


def test_local_paths_are_mapped_onto_the_volume(tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "completion": "b"}\n')
    spec = make_spec(tmp_path, f"model.path={model}", "data=local", f"data.path={rows}", "k8s.mount_path=/vol")
    pod = k8s.pod_spec_dict(spec)
    assert pod["model"]["path"] == "/vol/model"
    assert pod["data"]["path"] == "/vol/data/rows.jsonl"
    assert pod["run_dir"] == k8s.names(spec).run_dir
    assert pod["hardware"]["pin"] is False and pod["hardware"]["cores_per_worker"] == 8
    kept = make_spec(tmp_path, "model.path=meta-llama/Llama-2-7b-hf", "data=local", "data.path=/vol/data/x.csv",
                     "k8s.mount_path=/vol")
    assert k8s.path_mappings(kept) == []
    assert k8s.pod_spec_dict(kept)["model"]["path"] == "meta-llama/Llama-2-7b-hf"


def test_names_are_valid_dns_labels(tmp_path):
    spec = compose(BASE + [f"run_dir={tmp_path / ('Very_Long Run Name ' * 6)}"])
    n = k8s.names(spec)
    for name in (n.job, n.config_map, f"{n.job}-worker-99", f"{n.job}-launcher"):
        assert len(name) <= 63 and name[0].isalpha() and all(c.isalnum() or c == "-" for c in name)
        assert name == name.lower()


def test_describe_writes_nothing(tmp_path):
    spec = make_spec(tmp_path, "k8s.kind=mpijob")
    lines = k8s.describe(spec)
    assert any("MPIJob" in line for line in lines)
    assert any(line.startswith("start: kubectl apply -f ") for line in lines)
    assert not (Path(spec.run_dir) / "k8s").exists()


def test_launch_writes_one_file_and_prints_the_apply_command(tmp_path, capsys):
    spec = make_spec(tmp_path)
    result = k8s.launch(spec)
    path = Path(spec.run_dir) / "k8s" / "pytorchjob.yaml"
    assert result.ok and result.details["manifests"] == [str(path)]
    assert [d["kind"] for d in yaml.safe_load_all(path.read_text())] == ["ConfigMap", "PyTorchJob"]
    assert f"kubectl apply -f {path}" in capsys.readouterr().out


# ---------------------------------------------------------------- kubectl apply + follow
FAKE_KUBECTL = """#!/bin/sh
# Records its arguments; answers like a cluster whose job runs once, then ends in $FAKE_END.
printf '%s\\n' "$*" >> "$KUBECTL_LOG"
case "$1" in
  apply) echo "applied" ;;
  get)
    if [ -f "$KUBECTL_LOG.polled" ]; then printf 'Created=True\\nRunning=False\\n%s=True\\n' "$FAKE_END"
    else touch "$KUBECTL_LOG.polled"; printf 'Created=True\\nRunning=True\\n'; fi ;;
  logs) echo "{'loss': 1.0, 'learning_rate': 0.0002, 'epoch': 0.1}" ;;
esac
"""


@pytest.fixture
def fake_kubectl(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "kubectl"
    script.write_text(FAKE_KUBECTL)
    script.chmod(0o755)
    log = tmp_path / "kubectl.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("KUBECTL_LOG", str(log))
    monkeypatch.setenv("FAKE_END", "Succeeded")
    monkeypatch.setattr(k8s, "POLL_SECONDS", 0.01)
    return log


def test_apply_then_follow_until_success(tmp_path, fake_kubectl):
    spec = make_spec(tmp_path, "k8s.apply=true")
    result = k8s.launch(spec)
    assert result.ok and result.details["state"] == "Succeeded"
    calls = fake_kubectl.read_text().splitlines()
    name = k8s.names(spec).job
    assert calls[0] == f"apply -f {Path(spec.run_dir) / 'k8s' / 'pytorchjob.yaml'}"
    assert any(c.startswith(f"get pytorchjobs.kubeflow.org {name} -n default -o jsonpath=") for c in calls)
    assert f"logs -f -n default pod/{name}-master-0" in calls


def test_follow_reports_a_failed_job(tmp_path, fake_kubectl, monkeypatch):
    monkeypatch.setenv("FAKE_END", "Failed")
    spec = make_spec(tmp_path, "k8s.apply=true", "k8s.kind=job")
    with pytest.raises(QloraxError, match="failed"):
        k8s.launch(spec)
    calls = fake_kubectl.read_text().splitlines()
    assert any(c.startswith("get jobs.batch ") for c in calls)


def test_apply_without_kubectl_is_a_clear_error(tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(QloraxError, match="kubectl.*k8s.apply"):
        k8s.launch(make_spec(tmp_path, "k8s.apply=true"))


# ---------------------------------------------------------------- pods' commands, run locally
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_pods(job: dict[str, Any], port: int) -> list[tuple[list[str], dict[str, str]]]:
    """(command, env) of each rank's container, with what the cluster would add to the env.

    PyTorchJob: the training-operator injects MASTER_ADDR/PORT, WORLD_SIZE and RANK. Indexed
    Job: RANK comes from the completion-index annotation, and MASTER_ADDR (pod 0's DNS name
    behind the headless Service) resolves to this machine.
    """
    pods = []
    if job["kind"] == "PyTorchJob":
        replicas = job["spec"]["pytorchReplicaSpecs"]
        ranks = [("Master", 0, 0), ("Worker", 0, 1)]
        for replica, index, rank in ranks:
            container = replicas[replica]["template"]["spec"]["containers"][0]
            env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(len(ranks)), RANK=str(rank),
                       PYTHONUNBUFFERED="0", HOSTNAME=f"{job['metadata']['name']}-{replica.lower()}-{index}")
            pods.append((container["command"], env))
    else:
        container = job["spec"]["template"]["spec"]["containers"][0]
        for rank in range(job["spec"]["completions"]):
            env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
            assert "RANK" not in env and env["WORLD_SIZE"] == "2"
            env.update(RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       HOSTNAME=f"{job['metadata']['name']}-{rank}")
            pods.append((container["command"], env))
    return pods


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["pytorchjob", "job"])
def test_pod_commands_train_on_a_local_volume(tmp_path, kind):
    """Run each rank's container command as the cluster would start it, on this machine.

    The volume is a temporary folder (k8s.mount_path points at it) and the ConfigMap's
    spec.yaml is a file; commands and env are otherwise taken verbatim from the manifests.
    """
    volume = tmp_path / "volume"
    volume.mkdir()
    spec = compose(BASE + [f"run_dir={tmp_path / 'host-run'}", f"k8s.kind={kind}", f"k8s.mount_path={volume}",
                           "k8s.cpu=1", "train.max_steps=4", "train.save_steps=2", "train.logging_steps=1",
                           "quiet=true", "stages=[train]"])
    objects = k8s.render(spec)
    spec_file = tmp_path / "configmap" / "spec.yaml"
    spec_file.parent.mkdir()
    spec_file.write_text(objects[0]["data"]["spec.yaml"])
    # The image ships the built-in model ready-built (docker/Dockerfile); so does this "image".
    # Built by a rank > 0 it would lack its weights: transformers saves only on rank 0.
    from qlorax.engine.tiny import tiny_model_dir

    tiny_model_dir()
    inherited = {k: v for k, v in os.environ.items()
                 if not k.startswith(("PMI_", "OMPI_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    path = f"{Path(sys.executable).parent}{os.pathsep}{inherited.get('PATH', '')}"   # `python` is this venv's
    processes = []
    for command, env in local_pods(workload(objects), free_port()):
        env = {**inherited, **env, "QLORAX_SPEC_SOURCE": str(spec_file), "PATH": path}   # spec: the ConfigMap
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
    outputs = []
    try:
        for p in processes:
            outputs.append(p.communicate(timeout=600)[0])
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(processes, outputs)):
        assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{out[-4000:]}"
    run_dir = Path(k8s.names(spec).run_dir)
    assert run_dir.parent == volume / "outputs"
    assert (run_dir / "checkpoints" / "step-000004" / "adapter_model.safetensors").is_file()
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip()
    assert (run_dir / "spec.yaml").read_text() == spec_file.read_text()
    assert {p.name for p in (run_dir / "logs").iterdir()} == {"rank-0.log", "rank-1.log"}
    assert not (tmp_path / "host-run" / "checkpoints").exists()
