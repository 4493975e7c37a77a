"""Kubernetes launcher: render the run as manifests whose pods run the same worker entry point.

    qlorax train parallel=k8s workers=4 k8s.kind=pytorchjob|mpijob|job k8s.image=REGISTRY/qlorax:TAG
    kubectl apply -f RUN_DIR/k8s/<kind>.yaml          (or k8s.apply=true to apply and follow it)

One multi-document file per kind is written to ``RunPaths.k8s``:

    pytorchjob  ConfigMap + Kubeflow PyTorchJob (kubeflow.org/v1): Master x1 + Worker x(N-1);
                the training-operator injects RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT.
    mpijob      ConfigMap + Kubeflow MPIJob (kubeflow.org/v2beta1, Open MPI): the launcher copies
                spec.yaml and runs ``mpirun -n N``; N worker pods run sshd (image target ``k8s``).
                Ranks read OMPI_COMM_WORLD_RANK/SIZE; MASTER_ADDR is worker 0's DNS name.
    job         ConfigMap + headless Service + an Indexed batch/v1 Job: RANK comes from the
                job-completion-index annotation, MASTER_ADDR is pod 0 behind the Service.

The volume (``k8s.volume``: pvc, nfs or hostPath) is mounted at ``k8s.mount_path`` in every pod
and holds model, data and outputs. The pods' copy of spec.yaml (in the ConfigMap) differs from
the host's in exactly these keys:

    run_dir          <mount_path>/outputs/<run name>   (run name: run_dir's folder name + a short hash)
    model.path       a local host path  -> <mount_path>/model            (copy the model folder there)
    data.path        a local host path  -> <mount_path>/data/<its name>  (copy the file or folder there)
    quant.prequantized_dir  local path  -> <mount_path>/prequantized/<its name>
                     builtin:*, hub ids (owner/name) and paths already under mount_path are kept.
    hardware         profile=container, pin=false, cores=null, cores_per_worker=<OMP threads>:
                     a pod is one rank whose CPU share is a quota, not a set of cores to pin.
    parallel.preflight_timeout_s  at least 300 s: pods start minutes apart (image pulls, scheduling).

Every training pod copies spec.yaml into the run directory on the volume (when absent or
different) and runs ``python -m qlorax.launchers.worker --run-dir ... --stages <spec.stages>``;
rank 0 runs merge/verify after training. Jobs end when training ends; pods are kept
(cleanPodPolicy None) so their logs stay readable, and outputs stay on the volume.
For mpijob the image's user (uid 1000) must match ``k8s.run_as_user`` because sshd needs it.
"""
from __future__ import annotations

import hashlib
import math
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from qlorax.errors import QloraxError
from qlorax.launchers import LaunchResult
from qlorax.paths import RunPaths
from qlorax.schema import RunSpec

SPEC_DIR = "/etc/qlorax"                  # where the ConfigMap is mounted (read-only)
SPEC_KEY = "spec.yaml"
DATA_VOLUME = "qlorax-volume"
SPEC_VOLUME = "qlorax-spec"
# The k8s image target (docker/Dockerfile) runs sshd as uid 1000 with this config and port;
# mpi-operator mounts the job's SSH keys at sshAuthMountPath.
IMAGE_HOME = "/home/qlorax"
SSHD_CONFIG = f"{IMAGE_HOME}/.sshd_config"
# mpirun only starts the ranks; it needs no training-sized share of a node.
LAUNCHER_RESOURCES = {"cpu": "1", "memory": "2Gi"}
BACKOFF_LIMIT = 3
MIN_PREFLIGHT_TIMEOUT_S = 300.0
POLL_SECONDS = 10.0
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
KINDS = {"pytorchjob": "PyTorchJob", "mpijob": "MPIJob", "job": "Job"}


# ---------------------------------------------------------------- names and pod-side paths
@dataclass(frozen=True)
class Names:
    """Every name and pod-side path the manifests of one run use."""

    run: str          # folder under <mount_path>/outputs
    job: str          # the PyTorchJob / MPIJob / Job (and the Job's headless Service)
    config_map: str
    run_dir: str      # run directory as the pods see it

    @property
    def service(self) -> str:
        return self.job


def run_name(run_dir: str | None) -> str:
    """DNS-safe name of a run: its folder name plus a hash of the full path (Hydra's default
    folder names, e.g. 12-00-00, repeat across days)."""
    folder = Path(run_dir).name if run_dir else "run"
    base = re.sub(r"[^a-z0-9]+", "-", folder.lower()).strip("-")[:30].strip("-") or "run"
    digest = hashlib.sha256(str(run_dir or "").encode()).hexdigest()[:6]
    return f"{base}-{digest}"


def mount_run_dir(spec: RunSpec, run: str) -> str:
    return f"{spec.k8s.mount_path.rstrip('/')}/outputs/{run}"


def names(spec: RunSpec) -> Names:
    run = run_name(spec.run_dir)
    job = f"qlorax-{run}"
    return Names(run=run, job=job, config_map=f"{job}-spec", run_dir=mount_run_dir(spec, run))


def cpu_threads(quantity: str, threads: int | None = None) -> int:
    """OMP threads of a pod: ``k8s.threads``, else the CPU limit rounded down (at least 1)."""
    if threads:
        return threads
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?", str(quantity))
    if not match:
        raise QloraxError(f"k8s.cpu: '{quantity}' is not a Kubernetes quantity (e.g. 8 or 7500m)")
    value, suffix = float(match.group(1)), match.group(2) or ""
    scale = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}[suffix]
    return max(1, math.floor(value * scale))


def _is_hub_id(path: str) -> bool:
    # Same rule as the engine (qlorax.engine.model / data): owner/name that is not a local path.
    return not path.startswith((".", "/", "~")) and path.count("/") == 1 and not Path(path).exists()


def pod_path(path: str | None, mount_path: str, folder: str, keep_name: bool) -> str | None:
    """Where a model/data path of the host spec lives on the volume (see the module docstring)."""
    if not path or path.startswith("builtin:") or _is_hub_id(path):
        return path
    mount = mount_path.rstrip("/")
    if path == mount_path or path.startswith(mount + "/"):
        return path
    name = Path(path).expanduser().resolve().name
    return f"{mount}/{folder}" + (f"/{name}" if keep_name else "")


def path_mappings(spec: RunSpec) -> list[tuple[str, str, str]]:
    """(key, host path, pod path) for each path the pods see somewhere else."""
    mount = spec.k8s.mount_path
    found = []
    for key, host, folder, keep_name in (("model.path", spec.model.path, "model", False),
                                         ("data.path", spec.data.path, "data", True),
                                         ("quant.prequantized_dir", spec.quant.prequantized_dir, "prequantized", True)):
        pod = pod_path(host, mount, folder, keep_name)
        if host and pod and pod != host:
            found.append((key, host, pod))
    return found


# ---------------------------------------------------------------- the pods' spec.yaml
def pod_spec_dict(spec: RunSpec) -> dict[str, Any]:
    """The run spec as the pods read it (module docstring lists what differs from the host's)."""
    from qlorax.specfile import to_dict

    data = to_dict(spec)
    data["run_dir"] = names(spec).run_dir
    pod = {key: pod_value for key, _, pod_value in path_mappings(spec)}
    data["model"]["path"] = pod.get("model.path", spec.model.path)
    data["data"]["path"] = pod.get("data.path", spec.data.path)
    data["quant"]["prequantized_dir"] = pod.get("quant.prequantized_dir", spec.quant.prequantized_dir)
    data["hardware"].update(profile="container", pin=False, cores=None, sysfs_root="/",
                            cores_per_worker=cpu_threads(spec.k8s.cpu, spec.k8s.threads))
    data["parallel"]["preflight_timeout_s"] = max(spec.parallel.preflight_timeout_s, MIN_PREFLIGHT_TIMEOUT_S)
    return data


def pod_spec_yaml(spec: RunSpec) -> str:
    import yaml

    return ("# qlorax run spec for the pods (from the host's spec.yaml; run_dir, local paths, hardware\n"
            "# and the rendezvous timeout rewritten for the cluster). Workers read this file.\n"
            + yaml.safe_dump(pod_spec_dict(spec), sort_keys=False))


# ---------------------------------------------------------------- shared building blocks
def _labels(spec: RunSpec, component: str | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "qlorax", "app.kubernetes.io/instance": names(spec).job}
    if component:
        labels["app.kubernetes.io/component"] = component
    return labels


def _metadata(spec: RunSpec, name: str, component: str | None = None) -> dict[str, Any]:
    return {"name": name, "namespace": spec.k8s.namespace, "labels": _labels(spec, component)}


def config_map(spec: RunSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(spec, names(spec).config_map),
            "data": {SPEC_KEY: pod_spec_yaml(spec)}}


def _volume_source(spec: RunSpec) -> dict[str, Any]:
    k = spec.k8s
    if k.volume == "pvc":
        return {"persistentVolumeClaim": {"claimName": k.claim_name}}
    if k.volume == "nfs":
        return {"nfs": {"server": k.nfs_server, "path": k.volume_path}}
    return {"hostPath": {"path": k.volume_path, "type": "DirectoryOrCreate"}}


def _volumes(spec: RunSpec, with_spec: bool) -> list[dict[str, Any]]:
    volumes = [{"name": DATA_VOLUME, **_volume_source(spec)}]
    if with_spec:
        volumes.append({"name": SPEC_VOLUME, "configMap": {"name": names(spec).config_map}})
    return volumes


def _mounts(spec: RunSpec, with_spec: bool) -> list[dict[str, Any]]:
    mounts = [{"name": DATA_VOLUME, "mountPath": spec.k8s.mount_path}]
    if with_spec:
        mounts.append({"name": SPEC_VOLUME, "mountPath": SPEC_DIR, "readOnly": True})
    return mounts


def _resources(cpu: str, memory: str) -> dict[str, Any]:
    # requests = limits: Guaranteed QoS, so a rank is never throttled below what it planned for.
    amount = {"cpu": str(cpu), "memory": str(memory)}
    return {"requests": dict(amount), "limits": dict(amount)}


def _container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _pod_security(spec: RunSpec) -> dict[str, Any]:
    uid = spec.k8s.run_as_user
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _hub_token_env(spec: RunSpec) -> list[dict[str, Any]]:
    """The hub token as a Secret reference: its value never appears in a manifest."""
    if not spec.k8s.hub_token_secret:
        return []
    secret, _, key = spec.k8s.hub_token_secret.partition(":")
    return [{"name": spec.model.hub_token_env, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}]


def _rank_env(spec: RunSpec, run_dir: str) -> dict[str, str]:
    """Variables every rank needs besides its rank: one rank per pod, threads from the CPU limit."""
    threads = str(cpu_threads(spec.k8s.cpu, spec.k8s.threads))
    return {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
            "HF_HOME": f"{spec.k8s.mount_path.rstrip('/')}/cache/huggingface",   # shared download cache
            "QLORAX_RANK_LOG_DIR": f"{run_dir}/logs"}


def _env_list(values: dict[str, str]) -> list[dict[str, Any]]:
    return [{"name": name, "value": value} for name, value in values.items()]


def _pod_spec(spec: RunSpec, containers: list[dict[str, Any]], with_spec: bool, **extra: Any) -> dict[str, Any]:
    pod: dict[str, Any] = {"securityContext": _pod_security(spec), "containers": containers,
                           "volumes": _volumes(spec, with_spec)}
    if spec.k8s.node_selector:
        pod["nodeSelector"] = dict(spec.k8s.node_selector)
    if spec.k8s.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.k8s.tolerations]
    pod.update(extra)
    return pod


def _copy_spec_lines(run_dir: str) -> list[str]:
    """Shell lines that put the ConfigMap's spec.yaml into the run directory on the volume.

    Written only when absent or different, through a per-pod temporary file and a rename, so
    that ranks starting together never read a half-written file.
    """
    q = shlex.quote(run_dir)
    return ["set -eu",
            f"run_dir={q}",
            'mkdir -p "$run_dir/logs"',
            'if ! cmp -s "$QLORAX_SPEC_SOURCE" "$run_dir/spec.yaml"; then',
            '  tmp="$run_dir/.spec.yaml.${HOSTNAME:-$$}"',
            '  cp "$QLORAX_SPEC_SOURCE" "$tmp" && mv -f "$tmp" "$run_dir/spec.yaml"',
            "fi"]


def worker_command(spec: RunSpec) -> list[str]:
    """The worker entry point every rank runs (torchrun and the local launcher run the same one)."""
    return ["python", "-m", "qlorax.launchers.worker", "--run-dir", names(spec).run_dir,
            "--stages", ",".join(spec.stages)]


def _shell(lines: list[str]) -> list[str]:
    return ["/bin/sh", "-c", "\n".join(lines) + "\n"]


def _training_container(spec: RunSpec, name: str, script: list[str], env: list[dict[str, Any]],
                        ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {"name": name, "image": spec.k8s.image, "imagePullPolicy": spec.k8s.image_pull_policy,
                                 "command": _shell(script), "env": env,
                                 "resources": _resources(spec.k8s.cpu, spec.k8s.memory),
                                 "volumeMounts": _mounts(spec, with_spec=True),
                                 "securityContext": _container_security()}
    if ports:
        container["ports"] = ports
    return container


def _training_env(spec: RunSpec, extra: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    n = names(spec)
    fixed = {"QLORAX_SPEC_SOURCE": f"{SPEC_DIR}/{SPEC_KEY}", **_rank_env(spec, n.run_dir),
             "HOME": "/tmp"}   # any run_as_user gets a writable home (matplotlib, torch caches)
    return (extra or []) + _env_list(fixed) + _hub_token_env(spec)


def _template(spec: RunSpec, component: str, pod: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"labels": _labels(spec, component)}, "spec": pod}


# ---------------------------------------------------------------- PyTorchJob
def render_pytorchjob(spec: RunSpec) -> list[dict[str, Any]]:
    """ConfigMap + PyTorchJob: Master x1, Worker x(workers-1); the operator sets the rank variables."""
    n = names(spec)
    script = _copy_spec_lines(n.run_dir) + ["exec " + shlex.join(worker_command(spec))]

    def replica(count: int, component: str) -> dict[str, Any]:
        # The training-operator reads MASTER_PORT from the port named pytorchjob-port of the
        # container named pytorch.
        container = _training_container(spec, "pytorch", script, _training_env(spec),
                                        ports=[{"name": "pytorchjob-port", "containerPort": spec.k8s.port}])
        return {"replicas": count, "restartPolicy": "OnFailure",
                "template": _template(spec, component, _pod_spec(spec, [container], with_spec=True))}

    replicas = {"Master": replica(1, "master")}
    if spec.workers > 1:
        replicas["Worker"] = replica(spec.workers - 1, "worker")
    job = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": _metadata(spec, n.job),
           "spec": {"nprocPerNode": "1",
                    # cleanPodPolicy None: finished pods (and their logs) stay until the job is deleted.
                    "runPolicy": {"backoffLimit": BACKOFF_LIMIT, "cleanPodPolicy": "None"},
                    "pytorchReplicaSpecs": replicas}}
    return [config_map(spec), job]


# ---------------------------------------------------------------- MPIJob
def mpirun_command(spec: RunSpec) -> str:
    """The launcher's mpirun line (shell text): one rank per worker pod, from mpi-operator's hostfile.

    Open MPI starts ranks through ssh, whose sessions have neither the pod's nor the image's
    environment: the variables the ranks need are exported with -x (the hub token by name,
    never by value; the image's QLORAX_CACHE, which holds the ready-built demo model, when set).
    """
    n = names(spec)
    master = f"{n.job}-worker-0.{n.job}-worker.{spec.k8s.namespace}.svc"   # mpi-operator's worker DNS
    env = {"MASTER_ADDR": master, "MASTER_PORT": str(spec.k8s.port), "PYTHONUNBUFFERED": "1",
           **_rank_env(spec, n.run_dir)}
    env.pop("LOCAL_RANK")   # Open MPI's OMPI_COMM_WORLD_LOCAL_RANK already says 0
    cmd = ["mpirun", "-n", str(spec.workers), "--bind-to", "none", "--map-by", "slot"]
    for name, value in env.items():
        cmd += ["-x", f"{name}={value}"]
    if spec.k8s.hub_token_secret:
        cmd += ["-x", spec.model.hub_token_env]
    return f"{shlex.join(cmd)} ${{QLORAX_CACHE:+-x QLORAX_CACHE}} {shlex.join(worker_command(spec))}"


def render_mpijob(spec: RunSpec) -> list[dict[str, Any]]:
    """ConfigMap + MPIJob: a small launcher running mpirun, and one sshd worker pod per rank."""
    n = names(spec)
    script = _copy_spec_lines(n.run_dir) + ["exec " + mpirun_command(spec)]
    launcher = {"name": "launcher", "image": spec.k8s.image, "imagePullPolicy": spec.k8s.image_pull_policy,
                "command": _shell(script),
                "env": _env_list({"QLORAX_SPEC_SOURCE": f"{SPEC_DIR}/{SPEC_KEY}"}) + _hub_token_env(spec),
                "resources": _resources(**LAUNCHER_RESOURCES), "volumeMounts": _mounts(spec, with_spec=True),
                "securityContext": _container_security()}
    # Workers only run sshd (non-root, port 2222, see docker/ssh/); the ranks are started in
    # them by mpirun and inherit the pod's CPU/memory limits.
    worker = {"name": "worker", "image": spec.k8s.image, "imagePullPolicy": spec.k8s.image_pull_policy,
              "command": ["/usr/sbin/sshd", "-De", "-f", SSHD_CONFIG],
              "resources": _resources(spec.k8s.cpu, spec.k8s.memory), "volumeMounts": _mounts(spec, with_spec=False),
              "securityContext": _container_security()}
    job = {"apiVersion": "kubeflow.org/v2beta1", "kind": "MPIJob", "metadata": _metadata(spec, n.job),
           "spec": {"slotsPerWorker": 1, "mpiImplementation": "OpenMPI",
                    "sshAuthMountPath": f"{IMAGE_HOME}/.ssh",
                    "launcherCreationPolicy": "WaitForWorkersReady",
                    # Running: idle sshd workers go when the launcher ends; the launcher pod and
                    # its log (all ranks' output) stay.
                    "runPolicy": {"backoffLimit": BACKOFF_LIMIT, "cleanPodPolicy": "Running"},
                    "mpiReplicaSpecs": {
                        "Launcher": {"replicas": 1, "restartPolicy": "OnFailure",
                                     "template": _template(spec, "launcher",
                                                           _pod_spec(spec, [launcher], with_spec=True))},
                        "Worker": {"replicas": spec.workers, "restartPolicy": "OnFailure",
                                   "template": _template(spec, "worker",
                                                         _pod_spec(spec, [worker], with_spec=False))}}}}
    return [config_map(spec), job]


# ---------------------------------------------------------------- Indexed Job + headless Service
def render_job(spec: RunSpec) -> list[dict[str, Any]]:
    """ConfigMap + headless Service + Indexed Job: no operator needed, pod 0 is the rendezvous."""
    n = names(spec)
    master = f"{n.job}-0.{n.service}"   # Indexed Jobs name pod i's host <job>-<i>; subdomain = Service
    service = {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(spec, n.service),
               "spec": {"clusterIP": "None", "selector": _labels(spec, "rank"),
                        # DNS for pod 0 as soon as it has an address: nothing waits for readiness.
                        "publishNotReadyAddresses": True,
                        "ports": [{"name": "rendezvous", "port": spec.k8s.port, "targetPort": spec.k8s.port}]}}
    wait_for_master = [  # ranks > 0 start before pod 0's DNS record exists; torch would fail at once
        'if [ "$RANK" != 0 ]; then',
        "  tries=0",
        '  until getent hosts "$MASTER_ADDR" >/dev/null 2>&1; do',
        "    tries=$((tries + 1))",
        '    if [ "$tries" -ge 300 ]; then echo "rank $RANK: $MASTER_ADDR did not resolve in 10 minutes" >&2; exit 1; fi',
        "    sleep 2",
        "  done",
        "fi"]
    script = _copy_spec_lines(n.run_dir) + wait_for_master + ["exec " + shlex.join(worker_command(spec))]
    rank = {"name": "RANK", "valueFrom": {"fieldRef": {
        "fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}}
    env = [rank] + _env_list({"WORLD_SIZE": str(spec.workers), "MASTER_ADDR": master,
                              "MASTER_PORT": str(spec.k8s.port), "PYTHONUNBUFFERED": "1"})
    container = _training_container(spec, "qlorax", script, _training_env(spec, env),
                                    ports=[{"name": "rendezvous", "containerPort": spec.k8s.port}])
    pod = _pod_spec(spec, [container], with_spec=True, restartPolicy="OnFailure", subdomain=n.service)
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(spec, n.job),
           "spec": {"completionMode": "Indexed", "completions": spec.workers, "parallelism": spec.workers,
                    "backoffLimit": BACKOFF_LIMIT, "template": _template(spec, "rank", pod)}}
    return [config_map(spec), service, job]


RENDERERS: dict[str, Callable[[RunSpec], list[dict[str, Any]]]] = {
    "pytorchjob": render_pytorchjob, "mpijob": render_mpijob, "job": render_job}


def render(spec: RunSpec) -> list[dict[str, Any]]:
    """The manifests of ``spec.k8s.kind`` as plain dicts (no files written)."""
    return RENDERERS[spec.k8s.kind](spec)


# ---------------------------------------------------------------- files
def to_yaml(objects: list[dict[str, Any]]) -> str:
    """Multi-document YAML; multi-line strings (the pod scripts, spec.yaml) as literal blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:   # replicas share dicts; no &id001 anchors
            return True

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return yaml.dump_all(objects, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=120)


def manifest_path(spec: RunSpec) -> Path:
    return RunPaths(spec.run_dir or ".").k8s / f"{spec.k8s.kind}.yaml"


def write_manifests(spec: RunSpec) -> Path:
    """Render ``spec.k8s.kind`` into RUN_DIR/k8s/<kind>.yaml and return the file."""
    path = manifest_path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# qlorax {KINDS[spec.k8s.kind]} for run {spec.run_dir}\n"
                    f"# start: kubectl apply -f {path}\n" + to_yaml(render(spec)))
    return path


# ---------------------------------------------------------------- describe / launch
def _pods_text(spec: RunSpec) -> str:
    w = spec.workers
    if spec.k8s.kind == "pytorchjob":
        return f"1 master + {w - 1} worker pod(s)" if w > 1 else "1 master pod"
    if spec.k8s.kind == "mpijob":
        return f"1 launcher + {w} worker pod(s)"
    return f"{w} indexed pod(s) + headless Service"


def _volume_text(spec: RunSpec) -> str:
    k = spec.k8s
    source = {"pvc": f"PersistentVolumeClaim {k.claim_name}", "nfs": f"NFS {k.nfs_server}:{k.volume_path}",
              "hostPath": f"hostPath {k.volume_path} (single-node clusters only)"}[k.volume]
    return f"volume: {source} mounted at {k.mount_path}"


def _copy_hints(spec: RunSpec) -> list[str]:
    return [f"{key}: {host} -> {pod} in the pods (copy it onto the volume there)"
            for key, host, pod in path_mappings(spec)]


def describe(spec: RunSpec) -> list[str]:
    """What ``launch`` would render (for ``qlorax plan``); writes nothing."""
    k = spec.k8s
    if spec.run_dir:
        n = names(spec)
        job, run_dir, cm, manifests = n.job, n.run_dir, n.config_map, str(manifest_path(spec))
    else:   # `qlorax plan` without run_dir: names come from the run directory train will create
        job, run_dir, cm = "qlorax-<run name>", mount_run_dir(spec, "<run name>"), "qlorax-<run name>-spec"
        manifests = f"<run_dir>/k8s/{k.kind}.yaml"
    pods_run = shlex.join(worker_command(spec)).replace(names(spec).run_dir, run_dir)
    return ([f"launcher: k8s {KINDS[k.kind]} '{job}' in namespace {k.namespace}: {_pods_text(spec)}, image {k.image}",
             f"each rank: cpu {k.cpu}, memory {k.memory} (requests = limits), "
             f"OMP_NUM_THREADS={cpu_threads(k.cpu, k.threads)}",
             _volume_text(spec),
             f"run directory in the pods: {run_dir} (spec.yaml from ConfigMap {cm})",
             f"pods run: {pods_run}"]
            + _copy_hints(spec)
            + [f"manifests: {manifests}",
               f"start: kubectl apply -f {manifests}"
               + (" (k8s.apply=true: qlorax applies it and follows the job)" if k.apply else "")])


def launch(spec: RunSpec) -> LaunchResult:
    """Write the manifests; with k8s.apply, apply them and follow the job to its end."""
    path = write_manifests(spec)
    n = names(spec)
    apply_cmd = f"kubectl apply -f {shlex.quote(str(path))}"
    details: dict[str, Any] = {"manifests": [str(path)], "kind": spec.k8s.kind, "job": n.job,
                               "namespace": spec.k8s.namespace, "pod_run_dir": n.run_dir,
                               "apply_command": apply_cmd}
    for hint in _copy_hints(spec):
        print(f"qlorax: {hint}", flush=True)
    if not spec.k8s.apply:
        print(apply_cmd, flush=True)
        return LaunchResult(ok=True, details=details,
                            message=f"rendered {KINDS[spec.k8s.kind]} {n.job} ({_pods_text(spec)}) to {path}; "
                                    f"start it with: {apply_cmd}")
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise QloraxError(f"k8s.apply=true but kubectl is not on PATH: install kubectl and point it at your "
                          f"cluster, or drop k8s.apply and run `{apply_cmd}` where kubectl is set up "
                          f"(the manifests are written)")
    _kubectl_apply(kubectl, path)
    state = follow(kubectl, spec)
    details["state"] = state
    return LaunchResult(ok=True, details=details,
                        message=f"{KINDS[spec.k8s.kind]} {n.job} succeeded; outputs in {n.run_dir} on the volume")


def _kubectl_apply(kubectl: str, path: Path) -> None:
    print(f"kubectl apply -f {path}", flush=True)
    done = subprocess.run([kubectl, "apply", "-f", str(path)], capture_output=True, text=True)
    sys.stdout.write(done.stdout)
    if done.returncode != 0:
        raise QloraxError(f"kubectl apply -f {path} failed (exit {done.returncode}): {done.stderr.strip()[-800:]}\n"
                          "  If the kind is unknown, install its operator (Kubeflow training-operator for "
                          "PyTorchJob, mpi-operator for MPIJob) or use k8s.kind=job.")


# ---------------------------------------------------------------- following a job
@dataclass(frozen=True)
class Target:
    """How to ask kubectl about one job and rank 0's log."""

    resource: str          # kubectl get <resource> <name>
    name: str
    namespace: str
    logs: tuple[str, ...]  # kubectl logs -f <these>

    def get_args(self) -> list[str]:
        jsonpath = '{range .status.conditions[*]}{.type}={.status}{"\\n"}{end}'
        return ["get", self.resource, self.name, "-n", self.namespace, "-o", f"jsonpath={jsonpath}"]

    def logs_args(self) -> list[str]:
        return ["logs", "-f", "-n", self.namespace, *self.logs]


def follow_target(spec: RunSpec) -> Target:
    n, ns = names(spec), spec.k8s.namespace
    if spec.k8s.kind == "pytorchjob":
        return Target("pytorchjobs.kubeflow.org", n.job, ns, (f"pod/{n.job}-master-0",))
    if spec.k8s.kind == "mpijob":   # mpi-operator runs the launcher as a batch Job <name>-launcher
        return Target("mpijobs.kubeflow.org", n.job, ns, (f"job/{n.job}-launcher",))
    # Kubernetes >= 1.28 also sets the completion index as a pod label of the same name.
    selector = f"app.kubernetes.io/instance={n.job},{COMPLETION_INDEX_ANNOTATION}=0"
    return Target("jobs.batch", n.job, ns, ("-l", selector))


def job_state(conditions: str) -> str | None:
    """'Succeeded' / 'Failed' from the condition lines ``Type=Status``, or None while running."""
    true = {line.split("=", 1)[0] for line in conditions.splitlines() if line.endswith("=True")}
    if true & {"Succeeded", "Complete"}:
        return "Succeeded"
    if "Failed" in true:
        return "Failed"
    return None


def follow(kubectl: str, spec: RunSpec, poll_s: float | None = None) -> str:
    """Stream rank 0's log and poll the job's conditions until it succeeds (or raise when it fails)."""
    target = follow_target(spec)
    poll_s = POLL_SECONDS if poll_s is None else poll_s
    logs: subprocess.Popen | None = None
    streamed, errors = False, 0
    state: str | None = None
    try:
        while True:
            if not streamed and (logs is None or logs.poll() is not None):
                streamed = logs is not None and logs.returncode == 0   # the log ended with its container
                if not streamed:   # not started yet (pod pending): try again next poll
                    logs = subprocess.Popen([kubectl, *target.logs_args()], stderr=subprocess.DEVNULL)
            got = subprocess.run([kubectl, *target.get_args()], capture_output=True, text=True)
            if got.returncode != 0:
                errors += 1
                if errors >= 5:
                    raise QloraxError(f"kubectl {' '.join(target.get_args()[:3])} keeps failing: "
                                      f"{got.stderr.strip()[-400:]}")
            else:
                errors = 0
                state = job_state(got.stdout)
                if state:
                    break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print(f"\nqlorax: stopped following; the job keeps running. Watch it with "
              f"`kubectl {shlex.join(target.logs_args())}`; stop it with `kubectl delete -f {manifest_path(spec)}`",
              file=sys.stderr, flush=True)
        raise
    finally:
        _stop_logs(logs)
    if state == "Failed":
        raise QloraxError(f"{KINDS[spec.k8s.kind]} {target.name} failed; see `kubectl describe "
                          f"{target.resource} {target.name} -n {target.namespace}` and "
                          f"`kubectl {shlex.join(target.logs_args()).replace('logs -f', 'logs')}`. "
                          f"Checkpoints stay on the volume: apply again to resume.")
    return state


def _stop_logs(logs: subprocess.Popen | None) -> None:
    """Let `kubectl logs -f` print what it still has, then stop it."""
    if logs is None or logs.poll() is not None:
        return
    try:
        logs.wait(timeout=10)
    except subprocess.TimeoutExpired:
        logs.terminate()
        logs.wait(timeout=10)
