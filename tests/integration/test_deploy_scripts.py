"""The deployment scripts, run: docker/entrypoint.sh and docker/smoke.sh through sh/bash, and
`docker compose config` where Docker is installed. The static checks of the same files are in
tests/unit/test_deploy_manifests.py.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


def test_compose_config_with_docker_compose_if_present(tmp_path):
    """`docker compose config` where Docker is installed (Debian's podman-compose 1.0.3 has no `config`)."""
    import os
    import shutil

    if shutil.which("docker") is None or subprocess.run(["docker", "compose", "version"],
                                                         capture_output=True).returncode != 0:
        pytest.skip("no docker compose on this machine")
    secret = tmp_path / "pw"
    secret.write_text("x\n")
    env = {**os.environ, "SEGQ_REDIS_PASSWORD_FILE": str(secret)}
    for profile in ("gpu", "cpu"):
        result = subprocess.run(["docker", "compose", "-f", str(DOCKER / "compose.yaml"), "--profile", profile,
                                 "config", "--quiet"], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr


def test_entrypoint_puts_the_secret_file_into_redis_url(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("p@ss/word:1\n")
    env = {"PATH": os.environ["PATH"], "REDIS_URL": "redis://redis:6379/2", "REDIS_PASSWORD_FILE": str(secret)}
    out = subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), "sh", "-c", 'printf %s "$REDIS_URL"'],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert out == "redis://:p%40ss%2Fword%3A1@redis:6379/2"
    import redis

    kwargs = redis.connection.parse_url(out)
    assert kwargs["password"] == "p@ss/word:1" and kwargs["host"] == "redis" and kwargs["db"] == 2
    out = subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), "sh", "-c", 'printf %s "$REDIS_URL"'],
                         capture_output=True, text=True, env={"PATH": os.environ["PATH"], "REDIS_URL": "redis://x:1/0"},
                         check=True).stdout
    assert out == "redis://x:1/0"  # no secret file: untouched
    missing = subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), "true"], capture_output=True, text=True,
                             env={"PATH": os.environ["PATH"], "REDIS_PASSWORD_FILE": str(tmp_path / "nope")})
    assert missing.returncode == 2 and "not readable" in missing.stderr


def test_smoke_script_parses_and_cleans_up():
    script = DOCKER / "smoke.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "trap cleanup EXIT" in text
    for needle in ("--metrics-port", "/readyz", "/livez", "/metrics", "producer enqueue /data/in --out /data/out",
                   "--appendonly yes", "requirepass", "/engines:ro", "engines synth"):
        assert needle in text, needle
    assert shlex.split("bash docker/smoke.sh")  # documented entry point


def test_podman_compose_dry_run_gives_each_gpu_worker_its_own_gpu(tmp_path):
    """podman-compose's own reading of compose.yaml (`--dry-run up`: the podman commands it would run, none run):
    each per-GPU profile creates one container per GPU, each with a different `--device nvidia.com/gpu=<id>`.
    Needs podman-compose (pip install 'podman-compose==1.6.*') and podman (its dry run still lists containers)."""
    import re
    import shutil

    if shutil.which("podman-compose") is None or shutil.which("podman") is None:
        pytest.skip("podman-compose or podman not installed")
    secret = tmp_path / "pw"
    secret.write_text("x\n")
    env = {**os.environ, "SEGQ_REDIS_PASSWORD_FILE": str(secret), "SEGQ_GPU3": "GPU-4f1c"}
    for profile, expected in (("gpu1", ["0"]), ("gpu2", ["0", "1"]), ("gpu4", ["0", "1", "2", "GPU-4f1c"]),
                              ("gpu8", ["0", "1", "2", "GPU-4f1c", "4", "5", "6", "7"]), ("gpu-all", ["all"])):
        result = subprocess.run(["podman-compose", "--verbose", "--dry-run", "-f", str(DOCKER / "compose.yaml"),
                                 "--profile", profile, "up", "-d"], capture_output=True, text=True, env=env,
                                timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        creates = [line for line in (result.stdout + result.stderr).splitlines() if "podman create" in line]
        gpus = [re.findall(r"--device nvidia\.com/gpu=(\S+)", line) for line in creates]
        workers = [ids for ids in gpus if ids]
        assert all(len(ids) == 1 for ids in workers), creates
        assert sorted(ids[0] for ids in workers) == sorted(expected), profile
