"""Shared fixtures: the read-only assets (QLORAX_ASSETS), a per-session model cache, CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("QLORAX_ASSETS", REPO.parent / "shared" / "assets"))


def asset(relative: str) -> Path:
    """Path of a shared test asset, or skip the test saying which one is absent and how to provide it."""
    path = ASSETS / relative
    if not path.exists():
        pytest.skip(f"test asset {path} is absent: set QLORAX_ASSETS to the shared assets folder "
                    "(.ci/run sets it to ../shared/assets)")
    return path


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """Keep the built-in tiny model out of the user's cache unless QLORAX_CACHE says otherwise."""
    if "QLORAX_CACHE" not in os.environ:
        os.environ["QLORAX_CACHE"] = str(tmp_path_factory.mktemp("qlorax-cache"))
    yield


@pytest.fixture
def stories260k() -> Path:
    return asset("models/stories260K-hf")


@pytest.fixture
def english_quotes() -> Path:
    return asset("data/english_quotes.jsonl")


@pytest.fixture
def alpaca_data() -> Path:
    return asset("data/alpaca_en_demo_llamafactory.json")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600,
            ) -> subprocess.CompletedProcess:
    """Run `python -m qlorax ARGS` as a user would (non-TTY), capturing its output."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "qlorax", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_quotes_recipe(tmp_path_factory, name: str, *overrides: str) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """`qlorax run` of the english_quotes recipe on stories260K in a fresh run directory.

    Returns (run_dir, model_dir, result); skips when the shared assets are absent.
    """
    model, data = ASSETS / "models/stories260K-hf", ASSETS / "data/english_quotes.jsonl"
    if not model.exists() or not data.exists():
        pytest.skip(f"test assets absent under {ASSETS}: set QLORAX_ASSETS (.ci/run does)")
    run_dir = tmp_path_factory.mktemp(name) / "run"
    result = run_cli("run", "model=stories260k", f"model.path={model}", "data=english_quotes", f"data.path={data}",
                     *overrides, f"run_dir={run_dir}", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, model, result


def assert_user_error(result: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """Exit code, no traceback, and every needle in the message."""
    output = result.stdout + result.stderr
    assert result.returncode == code, f"exit {result.returncode}, expected {code}:\n{output}"
    assert "Traceback" not in output, output
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output}"
    return output


def linear4bit(n_in: int, n_out: int, quant_type: str, nested: bool, bias: bool):
    """A bitsandbytes 4-bit linear layer on the CPU with random bf16 weights (and bias), kept off bitsandbytes'
    inference repacking, as qlorax's loader keeps it."""
    import bitsandbytes as bnb
    import torch

    layer = bnb.nn.Linear4bit(n_in, n_out, bias=bias, compute_dtype=torch.bfloat16, quant_type=quant_type,
                              compress_statistics=nested, quant_storage=torch.uint8)
    layer.weight = bnb.nn.Params4bit(torch.randn(n_out, n_in, dtype=torch.bfloat16) * 0.1, requires_grad=False,
                                     quant_type=quant_type, compress_statistics=nested, quant_storage=torch.uint8)
    layer = layer.to("cpu")
    layer.support_avx512bf16_for_cpu = False
    if bias:
        layer.bias.data = torch.randn(n_out, dtype=torch.bfloat16)
        layer.bias.requires_grad_(True)
    return layer
