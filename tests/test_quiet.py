"""The terminal of a `uvd run`: UVD's own lines and bars, none of Ray's start-up chatter; and
`--dashboard` reaches the embedded Ray."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TEST_OVERRIDES

ROOT = Path(__file__).parents[1]

# Lines Ray printed into UVD's progress bars before quiet_ray (issue 14).
NOISE = {
    "token-auth warning": "Token authentication is",
    "constructor arguments error": "constructor arguments in the object store",
    "Ray Data progress-bar warning": "progress bars",
    "C++ log-level banner": "Set ray log level from environment variable",
    "Python traceback": "Traceback (most recent call last)",
}


def _uvd_run(world, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_BACKEND_LOG_LEVEL", "RAY_ADDRESS", "RAY_DATA_DISABLE_PROGRESS_BARS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    sets = [a for o in TEST_OVERRIDES for a in ("--set", o)]
    cmd = [sys.executable, "-m", "uvd.cli", "run", str(ROOT / "recipes/laion.yaml"), "--set",
           f"inputs={world['laion']['path']}", *sets, "--out", str(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)


@pytest.mark.timeout(300)
def test_a_default_run_prints_none_of_rays_chatter(world, tmp_path):
    result = _uvd_run(world, tmp_path / "run")
    terminal = result.stdout + result.stderr
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{world['laion']['good']} sentences" in result.stdout  # the run did happen, with its bars on
    assert "laion: tokenize" in result.stderr and "laion: write" in result.stderr
    found = {name: next(line for line in terminal.splitlines() if text in line)
             for name, text in NOISE.items() if text in terminal}
    assert not found, found


@pytest.mark.timeout(300)
def test_dashboard_flag_reaches_the_embedded_ray(world, tmp_path):
    """With ray[default] the run logs the dashboard's address; with a minimal Ray it stops with a
    clear error naming the package (never Ray's traceback) and leaves no empty --out."""
    import ray._private.utils as ray_utils

    out = tmp_path / "dash"
    result = _uvd_run(world, out, "--dashboard", "--quiet")
    missing = ray_utils.get_dashboard_dependency_error()
    if missing:
        assert result.returncode == 2, result.stderr[-3000:]
        assert "--dashboard: the Ray dashboard needs ray[default]" in result.stderr
        assert "Traceback" not in result.stderr and not out.exists()
    else:
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Ray dashboard: http://" in result.stderr
