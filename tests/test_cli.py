"""Workflows through the `uvd` entry point, and the same recipe on a real 2-node Ray cluster."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import TEST_OVERRIDES
from uvd import manifest as M
from uvd.cli import main

ROOT = Path(__file__).parents[1]


def _sets(world):
    args = ["--set", f"inputs={world['laion']['path']}"]
    for o in TEST_OVERRIDES:
        args += ["--set", o]
    return args


def test_run_then_stats_json(ray_local, world, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(ROOT / "recipes/laion.yaml"), *_sets(world), "--out", str(out), "--quiet"]) == 0
    assert "sentences" in capsys.readouterr().out
    assert main(["stats", str(tmp_path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["totals"]["sentences"] == world["laion"]["good"]
    assert stats["totals"]["rejected"] == sum(world["laion"]["expected_rejects"].values())
    assert set(stats["by_source"]["laion"]) >= {"sentences", "images", "tokens", "token_share"}
    assert stats["rejected_by_reason"] == world["laion"]["expected_rejects"]
    # a second run of the same recipe adds nothing
    assert main(["run", str(ROOT / "recipes/laion.yaml"), *_sets(world), "--out", str(out), "--quiet"]) == 0
    assert "already complete" in capsys.readouterr().out


def test_user_mistakes_are_clear_errors(tmp_path, capsys):
    assert main(["run", str(ROOT / "recipes/laion.yaml"), "--set", "image.resize=zoom", "--out", str(tmp_path)]) == 2
    assert "image.resize" in capsys.readouterr().err
    assert main(["run", str(ROOT / "recipes/laion.yaml"), "--set", f"inputs={tmp_path}/nothing*"]) == 2
    assert "matches nothing" in capsys.readouterr().err
    assert main(["stats", str(tmp_path)]) == 2


def test_validate_every_recipe(capsys):
    assert main(["validate"]) == 0
    assert capsys.readouterr().out.count("ok ") == len(list((ROOT / "recipes").glob("*.yaml")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_two_node_cluster_gives_the_same_sentences(ray_local, world, tmp_path):
    """Head on 127.0.0.2, worker on 127.0.0.3 (loopback), the CLI with --address."""
    from test_run import laion_recipe, read_all
    from uvd.runner import run_recipe

    embedded = tmp_path / "embedded"
    run_recipe(laion_recipe(world), embedded, progress=False)

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    port = _free_port()
    common = ["--num-cpus=1", "--block", "--disable-usage-stats"]
    head = subprocess.Popen(
        [bin_dir / "ray", "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.2",
         "--include-dashboard=false", f"--temp-dir=/tmp/uvd-ray-{os.getpid()}", *common],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    worker = None
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # wait for the head's GCS port
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.2", port)) == 0:
                    break
            time.sleep(0.5)
        worker = subprocess.Popen(
            [bin_dir / "ray", "start", f"--address=127.0.0.2:{port}", "--node-ip-address=127.0.0.3", *common],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        check = (
            "import ray,time; ray.init(address='127.0.0.2:%d', _node_ip_address='127.0.0.2');"
            "t=time.time()\n"
            "while len([n for n in ray.nodes() if n['Alive']])<2 and time.time()-t<60: time.sleep(1)\n"
            "print(len([n for n in ray.nodes() if n['Alive']]))" % port
        )
        nodes = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120)
        assert nodes.stdout.strip().endswith("2"), nodes.stderr[-2000:]
        cluster = tmp_path / "cluster"
        result = subprocess.run(
            [bin_dir / "uvd", "run", str(ROOT / "recipes/laion.yaml"), *_sets(world), "--out", str(cluster),
             "--address", f"127.0.0.2:{port}", "--quiet", "--set", "tokenizer.num_actors=2"],
            env=env, capture_output=True, text=True, timeout=240,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        for proc in (worker, head):
            if proc is not None:
                proc.terminate()
        for proc in (worker, head):
            if proc is not None:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    got, expected = read_all(cluster), read_all(embedded)
    assert got.keys() == expected.keys()
    # Byte-identical output: 2 nodes and 2 encoder actors vs the embedded Ray with 1.
    shards = M.read_manifest(embedded)["shards"]
    assert set(M.read_manifest(cluster)["shards"]) == set(shards)
    for name in shards:
        assert (cluster / name).read_bytes() == (embedded / name).read_bytes(), name
    for name in M.read_manifest(embedded)["rejects"]["files"]:
        assert pq.read_table(cluster / name).equals(pq.read_table(embedded / name))
