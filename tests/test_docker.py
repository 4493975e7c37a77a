"""Docker images and entry point: the Dockerfiles are linted (base, CPU torch pin, non-root user,
entry point, sources that exist and survive the .dockerignore), and docker/entrypoint.sh is run
with a fake qlorax to check the STANDALONE_DOCKER / WORKER_COUNT_DOCKER and mount mappings."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from qlorax.launchers import k8s

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


# ---------------------------------------------------------------- Dockerfile lint
def parse(name: str) -> list[dict]:
    """The instructions of docker/<name>, comments left out."""
    dockerfile_parse = pytest.importorskip("dockerfile_parse")
    parser = dockerfile_parse.DockerfileParser(fileobj=io.BytesIO((DOCKER / name).read_bytes()))
    return [i for i in parser.structure if i["instruction"] != "COMMENT"]


def values(instructions: list[dict], kind: str) -> list[str]:
    return [i["value"] for i in instructions if i["instruction"] == kind]


def is_root(user: str) -> bool:
    name = user.split(":")[0]
    return name in ("root", "0")


def copy_sources(instructions: list[dict]) -> list[str]:
    sources = []
    for value in values(instructions, "COPY"):
        parts = [p for p in value.split() if not p.startswith("--")]
        sources += parts[:-1]
    return sources


def dockerignore_keeps(dockerfile: str, source: str) -> bool:
    """Whether <dockerfile>.dockerignore (ignore-everything-then-allow style) lets ``source`` in."""
    ignore = DOCKER / f"{dockerfile}.dockerignore"
    allowed = [line[1:].rstrip("/") for line in ignore.read_text().splitlines() if line.startswith("!")]
    return any(source == a or source.startswith(a + "/") or re.sub(r"\[.*\]", "d", source) == a for a in allowed)


def test_standalone_dockerfile():
    instructions = parse("Dockerfile")
    froms = values(instructions, "FROM")
    args = dict(v.split("=", 1) for v in values(instructions, "ARG") if "=" in v)
    assert len(froms) == 1 and froms[0] == "${BASE_IMAGE}" and args["BASE_IMAGE"].startswith("python:3.11-slim")
    users = values(instructions, "USER")
    assert users and not is_root(users[-1]), "the image must end as a non-root user"
    assert instructions[-1]["instruction"] in ("ENTRYPOINT", "CMD")
    entrypoint = json.loads(values(instructions, "ENTRYPOINT")[-1])        # exec form: signals reach qlorax
    assert any(v.startswith("docker/entrypoint.sh ") and v.split()[-1] == entrypoint[0]
               for v in values(instructions, "COPY"))
    runs = values(instructions, "RUN")
    torch_runs = [r for r in runs if "torch==" in r]
    assert torch_runs, "torch must be pinned"
    # The CPU wheel index by default; build-local.sh empties TORCH_INDEX only to use a local CPU wheel instead.
    assert args["TORCH_INDEX"] == TORCH_INDEX and '--index-url "$TORCH_INDEX"' in torch_runs[0]
    pinned = re.search(r"torch==([0-9.]+)", torch_runs[0]).group(1)
    makefile = (REPO / "Makefile").read_text()
    assert f"torch=={pinned}" in makefile, "the image and `make install` should pin the same torch"
    install = runs.index(torch_runs[0])
    assert any("pip install ." in r for r in runs[install + 1:]), "qlorax is installed after torch"
    # Pods must not build the built-in model themselves (ranks > 0 would write it without weights).
    assert any("QLORAX_CACHE=" in v for v in values(instructions, "ENV"))
    assert any("tiny_model_dir()" in r for r in runs)


def test_k8s_dockerfile_matches_the_mpijob_manifest():
    instructions = parse("Dockerfile.k8s")
    assert values(instructions, "FROM"), "FROM missing"
    users = values(instructions, "USER")
    assert users and not is_root(users[-1])
    installs = " ".join(values(instructions, "RUN"))
    for package in ("openmpi-bin", "openssh-server", "openssh-client"):
        assert package in installs
    copies = values(instructions, "COPY")
    assert any(c.split()[-1] == k8s.SSHD_CONFIG for c in copies), "sshd config where the MPIJob worker reads it"
    sshd = (DOCKER / "ssh" / "sshd_config").read_text()
    ssh = (DOCKER / "ssh" / "ssh_config").read_text()
    assert re.search(r"^Port 2222$", sshd, re.M) and re.search(r"^\s*Port 2222$", ssh, re.M)
    assert f"HostKey {k8s.IMAGE_HOME}/.ssh/" in sshd      # where mpi-operator mounts the job's keys


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.k8s"])
def test_copied_sources_exist_and_pass_the_dockerignore(dockerfile):
    for source in copy_sources(parse(dockerfile)):
        if not any(ch in source for ch in "*?["):
            assert (REPO / source).exists(), f"{dockerfile} copies missing {source}"
        assert dockerignore_keeps(dockerfile, source), f"{dockerfile}.dockerignore drops {source}"


def test_entrypoint_is_executable_posix_sh():
    assert os.access(ENTRYPOINT, os.X_OK)
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    assert subprocess.run(["sh", "-n", str(ENTRYPOINT)]).returncode == 0


# ---------------------------------------------------------------- entrypoint behaviour
SHELLS = [s for s in ("dash", "bash") if shutil.which(s)] or ["sh"]
FAKE_QLORAX = """#!/bin/sh
# Records its arguments, one per line.
: > "$ARGV_FILE"
for arg in "$@"; do printf '%s\\n' "$arg" >> "$ARGV_FILE"; done
"""


@pytest.fixture(params=SHELLS)
def entry(request, tmp_path):
    """Run docker/entrypoint.sh under one POSIX shell with a fake qlorax; returns (rc, argv, stderr)."""
    fake = tmp_path / "fake-qlorax"
    fake.write_text(FAKE_QLORAX)
    fake.chmod(0o755)
    root = tmp_path / "mnt"
    argv_file = tmp_path / "argv"

    def run(*args: str, **env: str) -> tuple[int, list[str] | None, str]:
        argv_file.unlink(missing_ok=True)
        full_env = {"PATH": os.environ["PATH"], "QLORAX_BIN": str(fake), "QLORAX_MOUNT_ROOT": str(root),
                    "ARGV_FILE": str(argv_file), **env}
        done = subprocess.run([request.param, str(ENTRYPOINT), *args], env=full_env, capture_output=True,
                              text=True, timeout=30)
        argv = argv_file.read_text().splitlines() if argv_file.exists() else None
        return done.returncode, argv, done.stderr + done.stdout

    run.root = root      # type: ignore[attr-defined]
    return run


def mounts(root: Path, model: bool = True, data: list[str] | None = None, outputs: bool = True) -> None:
    if model:
        (root / "model").mkdir(parents=True)
        (root / "model" / "config.json").write_text("{}")
    if data is not None:
        (root / "data").mkdir(parents=True)
        for name in data:
            (root / "data" / name).write_text("{}\n")
    if outputs:
        (root / "outputs").mkdir(parents=True)


def test_arguments_pass_straight_through_without_mounts(entry):
    assert entry("train", "lora.r=4", "train.max_steps=10")[:2] == (0, ["train", "lora.r=4", "train.max_steps=10"])
    assert entry()[:2] == (0, [])                       # no command: qlorax prints its help
    assert entry("--help")[:2] == (0, ["--help"])
    assert entry("qlorax", "plan")[:2] == (0, ["plan"])   # a leading `qlorax` is dropped


def test_standalone_maps_mounts_and_worker_count(entry):
    root = entry.root
    mounts(root, data=["quotes.jsonl"])
    rc, argv, _ = entry(STANDALONE_DOCKER="TRUE", WORKER_COUNT_DOCKER="2", QLORAX_RUN_NAME="demo")
    assert rc == 0
    assert argv == ["run", f"model.path={root}/model", f"data.path={root}/data/quotes.jsonl",
                    f"run_dir={root}/outputs/demo", "parallel=ccl", "workers=2"]


def test_standalone_overrides_without_a_command_run(entry):
    mounts(entry.root, model=False, outputs=False)
    rc, argv, _ = entry("data=english_quotes", "train.max_steps=4", STANDALONE_DOCKER="TRUE", WORKER_COUNT_DOCKER="2")
    assert (rc, argv) == (0, ["run", "data=english_quotes", "train.max_steps=4", "parallel=ccl", "workers=2"])
    # Not standalone: qlorax gets the overrides as they are (and says a command is missing).
    assert entry("data=english_quotes")[:2] == (0, ["data=english_quotes"])


def test_one_worker_needs_no_parallel_launcher(entry):
    mounts(entry.root, model=False, outputs=False)
    rc, argv, _ = entry("train", "model=tiny", STANDALONE_DOCKER="TRUE", WORKER_COUNT_DOCKER="1")
    assert (rc, argv) == (0, ["train", "model=tiny"])


def test_worker_count_needs_standalone(entry):
    rc, argv, err = entry("train", WORKER_COUNT_DOCKER="4")
    assert (rc, argv) == (0, ["train"])
    assert "only honoured with STANDALONE_DOCKER=TRUE" in err


def test_bad_worker_count_is_refused(entry):
    rc, argv, err = entry("train", STANDALONE_DOCKER="TRUE", WORKER_COUNT_DOCKER="two")
    assert rc == 2 and argv is None and "WORKER_COUNT_DOCKER" in err


def test_user_overrides_win_over_the_mapping(entry):
    root = entry.root
    mounts(root, data=["rows.csv"])
    args = ["train", "model.path=/models/x", "run_dir=/runs/y", "parallel=ccl", "workers=3"]
    rc, argv, _ = entry(*args, STANDALONE_DOCKER="TRUE", WORKER_COUNT_DOCKER="2")
    assert (rc, argv) == (0, args + [f"data.path={root}/data/rows.csv"])


def test_empty_mounts_are_not_mapped(entry):
    root = entry.root
    (root / "model" / "lost+found").mkdir(parents=True)
    (root / "model" / ".keep").write_text("")
    (root / "data").mkdir()
    rc, argv, _ = entry("plan")
    assert (rc, argv) == (0, ["plan"])


def test_data_folder_rules(entry):
    root = entry.root
    mounts(root, model=False, outputs=False, data=["a.jsonl", "b.jsonl"])
    rc, argv, err = entry("train")
    assert rc == 2 and argv is None and "data.path=" in err
    (root / "data" / "dataset_info.json").write_text("{}")    # a datasets.save_to_disk folder
    rc, argv, _ = entry("train")
    assert (rc, argv) == (0, ["train", f"data.path={root}/data"])


def test_default_run_name_and_other_commands(entry):
    root = entry.root
    mounts(root, model=False)
    rc, argv, _ = entry("train")
    assert rc == 0 and len(argv) == 2 and re.fullmatch(rf"run_dir={root}/outputs/train-\d{{8}}-\d{{6}}", argv[1])
    assert entry("runs")[:2] == (0, ["runs", f"{root}/outputs"])
    assert entry("merge", QLORAX_RUN_NAME="demo")[:2] == (0, ["merge", f"run_dir={root}/outputs/demo"])
    assert entry("verify", "run_dir=/x")[:2] == (0, ["verify", "run_dir=/x"])


def test_other_programs_run_directly(entry):
    rc, argv, out = entry("sh", "-c", "echo hello from the image")
    assert rc == 0 and argv is None and "hello from the image" in out
