"""The images built and run for real (`make docker-test`): docker/build-local.sh builds docker/Dockerfile
and docker/Dockerfile.k8s with buildah (no daemon) on a Debian bookworm base made by mmdebstrap, then the
tests run containers of those images with buildah's chroot isolation: `qlorax --help` as the image's user,
and a two-rank training -> merge -> verify through the entry point with STANDALONE_DOCKER /
WORKER_COUNT_DOCKER and the model, data and outputs mounted where the image expects them.

Skipped unless QLORAX_DOCKER_TEST=1 (the build takes minutes and needs buildah and mmdebstrap as root);
QLORAX_DOCKER_BUILD holds build-local.sh's options (the Makefile passes --local-base and a local torch
wheel folder when pip has one); QLORAX_DOCKER_REUSE=1 tests the images already built instead."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, asset, run_cli
from qlorax.paths import RunPaths

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.environ.get("QLORAX_DOCKER_TEST") != "1",
                       reason="image build: run `make docker-test` (QLORAX_DOCKER_TEST=1, needs buildah, root)"),
]
STORAGE = ["--storage-driver", os.environ.get("STORAGE_DRIVER", "vfs")]
TAG, K8S_TAG = "localhost/qlorax:latest", "localhost/qlorax-k8s:latest"
IMAGE_UID = "1000"
BUILD_TIMEOUT_S = 3600


def buildah(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["buildah", *STORAGE, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def images() -> None:
    """Both images, built once per test session from this checkout."""
    if shutil.which("buildah") is None:
        pytest.fail("buildah is not installed: apt-get install buildah mmdebstrap (`make docker-test` does)")
    if os.environ.get("QLORAX_DOCKER_REUSE") == "1":
        return
    options = shlex.split(os.environ.get("QLORAX_DOCKER_BUILD", "--local-base"))
    env = dict(os.environ, TAG=TAG, K8S_TAG=K8S_TAG, STORAGE_DRIVER=STORAGE[1])
    done = subprocess.run([str(REPO / "docker" / "build-local.sh"), *options], env=env, capture_output=True,
                          text=True, timeout=BUILD_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


@pytest.fixture(scope="module")
def container(images):
    """One container per image, made on first use and shared by the tests (with vfs storage each one is a
    full copy of the image); tests write only to their own mounts. Removed at the end."""
    made: dict[str, str] = {}

    def make(image: str = TAG) -> str:
        if image not in made:
            done = buildah("from", "--pull=false", image)
            assert done.returncode == 0, done.stderr
            made[image] = done.stdout.strip().splitlines()[-1]
        return made[image]

    yield make
    for name in made.values():
        buildah("rm", name)


def run_in(container: str, *command: str, env: dict[str, str] | None = None,
           mounts: dict[Path, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`buildah run` COMMAND in the container as the image's configured user, like `docker run` would."""
    options = ["--isolation", "chroot"]
    for key, value in (env or {}).items():
        options += ["--env", f"{key}={value}"]
    for host, target in (mounts or {}).items():
        options += ["--volume", f"{host}:{target}"]
    return buildah("run", *options, container, "--", *command, timeout=timeout)


def image_config(image: str) -> dict:
    done = buildah("inspect", "--type", "image", image)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["OCIv1"]["config"]


def test_help_runs_as_the_non_root_image_user(container):
    config = image_config(TAG)
    assert config["User"].split(":")[0] == IMAGE_UID
    entrypoint = config["Entrypoint"]
    name = container()
    helped = run_in(name, *entrypoint, "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout == run_cli("--help").stdout        # the same CLI as this checkout's
    who = run_in(name, *entrypoint, "sh", "-c", "id -u; python -c 'import torch; print(torch.__version__)'")
    assert who.returncode == 0, who.stderr
    uid, torch_version = who.stdout.split()
    assert uid == IMAGE_UID and torch_version.startswith("2.13.0") and "+cu" not in torch_version


def test_standalone_two_rank_run_through_the_entrypoint(container, tmp_path):
    """STANDALONE_DOCKER=TRUE and WORKER_COUNT_DOCKER=2: no command runs `qlorax run` with two ranks on the
    mounted model and the single data file, and the results land in the mounted outputs folder."""
    model = asset("models/stories260K-hf")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(asset("data/english_quotes.jsonl"), data_dir / "quotes.jsonl")
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    os.chown(outputs, int(IMAGE_UID), int(IMAGE_UID))          # the image user writes the results
    name = container()
    done = run_in(name, *image_config(TAG)["Entrypoint"],
                  "model=stories260k", "data=english_quotes", "data.cutoff_len=64", "train.max_steps=4",
                  "train.batch_size=4", "train.micro_batch_size=2", "train.logging_steps=1", "train.save_steps=4",
                  "verify.num_prompts=1", "verify.n_predict=4",
                  env={"STANDALONE_DOCKER": "TRUE", "WORKER_COUNT_DOCKER": "2", "QLORAX_RUN_NAME": "in-image"},
                  mounts={model: "/qlorax/model:ro", data_dir: "/qlorax/data:ro", outputs: "/qlorax/outputs"},
                  timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = RunPaths(outputs / "in-image")
    spec = run.spec.read_text()
    assert "/qlorax/model" in spec and "/qlorax/data/quotes.jsonl" in spec    # the entry point's mapping
    summary = json.loads(run.train_summary.read_text())
    assert summary["world_size"] == 2
    assert sorted(p.name for p in (run.root / "logs").iterdir()) == ["rank-0.log", "rank-1.log"]
    steps = [json.loads(line)["step"] for line in run.metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert (run.merged / "config.json").exists() and run.verify.exists() and run.report.exists()
    assert {p.stat().st_uid for p in run.root.rglob("*")} == {int(IMAGE_UID)}
    said = done.stdout + done.stderr + (run.root / "logs" / "rank-0.log").read_text()
    assert "allocator tcmalloc" in said                       # the image's libtcmalloc-minimal4, preloaded
    assert "torch.compile" not in said                        # g++ is there: no eager-fallback warning
    assert "native kernels unavailable" not in said           # and qlorax's own kernels build as the image's user


def test_k8s_image_has_mpi_and_the_sshd_config(container):
    config = image_config(K8S_TAG)
    assert config["User"].split(":")[0] == IMAGE_UID
    name = container(K8S_TAG)
    done = run_in(name, "sh", "-c", "mpirun --version && test -x /usr/sbin/sshd && test -r ~/.sshd_config"
                  " && python -c 'import qlorax.launchers.worker'")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Open MPI" in done.stdout or "OpenRTE" in done.stdout
