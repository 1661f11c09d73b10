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


def test_user_mistakes_are_clear_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # hermetic: whatever the repo's out/ holds does not matter, and nothing lands there
    out = str(tmp_path / "out")
    assert main(["run", str(ROOT / "recipes/laion.yaml"), "--set", "image.resize=zoom", "--out", out]) == 2
    assert "image.resize" in capsys.readouterr().err
    assert main(["run", str(ROOT / "recipes/laion.yaml"), "--set", f"inputs={tmp_path}/nothing*", "--out", out]) == 2
    assert "matches nothing" in capsys.readouterr().err
    assert main(["stats", str(tmp_path)]) == 2
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("value", ["[1,2", "{a: 1", "a: b: c"])
def test_malformed_set_yaml_is_a_clear_error(value, tmp_path, capsys):
    assert main(["run", str(ROOT / "recipes/laion.yaml"), "--set", f"inputs={value}", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--set inputs={value}: the value is not valid YAML" in err and "Traceback" not in err


def test_numeric_strings_are_numbers_for_float_fields(tmp_path):
    from uvd.recipe import load_recipe

    # YAML 1.1 reads 2e0 (no dot) as a string; a float field takes it as the number.
    recipe = load_recipe(ROOT / "recipes/laion.yaml", ["filters.max_aspect=2e0", "limits.max_reject_rate=5e-1"])
    assert recipe.filters.max_aspect == 2.0 and recipe.limits.max_reject_rate == 0.5
    with pytest.raises(ValueError, match="filters.max_aspect: expected a number, got 'wide'"):
        load_recipe(ROOT / "recipes/laion.yaml", ["filters.max_aspect=wide"])
    with pytest.raises(ValueError, match="limits.max_items: expected an integer"):
        load_recipe(ROOT / "recipes/laion.yaml", ["limits.max_items=1e3"])  # integers stay strict


def test_validate_every_config(capsys):
    """No arguments: every YAML file under recipes/, each with its own schema (recipes, train/, tokenizer/, mixes/)."""
    assert main(["validate"]) == 0
    out = capsys.readouterr().out
    files = sorted((ROOT / "recipes").rglob("*.yaml"))
    assert out.count("ok ") == len(files) and "FAIL" not in out
    for path, kind in (("train/tiny.yaml", "training config"), ("tokenizer/demo_small.yaml", "tokenizer training recipe"),
                       ("mixes/uvdv1.yaml", "target mix"), ("laion.yaml", "recipe: source laion")):
        assert f"recipes/{path}  ({kind}" in out


@pytest.mark.parametrize("text, kind, message", [
    ("source: laion\ninputs: x\nimage: {size: 250}\n", "dataset recipe", "image.size"),
    ("model: {size: tiny}\ntrain: {max_stepz: 3}\n", "training config", "train.max_stepz: unknown key"),
    ("model: {size: tiny}\noptim: {lr: fast}\n", "training config", "optim.lr: expected a number"),
    ("data: [{recipe: recipes/laion.yaml}]\nout: x\ntrain: {crop_size: 40}\n", "tokenizer recipe", "train.crop_size"),
    ("data: [{recipe: recipes/nope.yaml}]\nout: x\n", "tokenizer recipe", "data[0].recipe: recipes/nope.yaml not found"),
    ("tolerance: 0.02\nsources: [laion, video]\n", "target mix", "sources: expected a mapping"),
    ("tolerance: 0.02\nsources: {laion: 0.9\n", "target mix", "not valid YAML"),
    ("- just\n- a list\n", "list", "a recipe is a mapping"),
])
def test_validate_names_the_bad_field_per_schema(text, kind, message, tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"FAIL  {path}") and message in out, (kind, out)


def test_shipped_train_and_tokenizer_configs_take_numeric_strings():
    from uvd.registry import plugin

    config = plugin("train_config")(ROOT / "recipes/train/tiny.yaml", ["optim.lr=3e-4"])
    assert config.optim.lr == pytest.approx(3e-4)
    tok = plugin("tokenizer_train_config")(ROOT / "recipes/tokenizer/demo_small.yaml", ["train.lr=3e-4"])
    assert tok.train.lr == pytest.approx(3e-4)


def test_malformed_target_mix_is_exit_2(tmp_path, capsys):
    run = _tiny_run(tmp_path / "run")
    for text, message in (("sources: {laion: 0.9\n", "not valid YAML"), ("sources: [laion]\n", "sources: expected a mapping"),
                          ("categories: {a: 1}\n", "categories: expected a list")):
        target = tmp_path / "mix.yaml"
        target.write_text(text)
        assert main(["audit", str(run), "--target", str(target), "--json"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def _tiny_run(run):
    import numpy as np

    from uvd import manifest as M
    from uvd.shards import write_shard

    run.mkdir(parents=True)
    rows = [{"id": "s0", "source": "laion", "task": "single", "num_images": 1, "tokens": np.arange(256, dtype=np.uint16),
             "images": ["00000.tar/0"], "meta": "{}"}]
    (run / "data").mkdir()
    write_shard(rows, run / "data/laion-000000-000.parquet", 16, "zstd", 3)
    M.write_manifest(run, {"schema_version": 2, "source": "laion", "recipe_hash": "0", "status": "complete",
                           "tokenizer": {"id": "t", "trained": False},
                           "shards": {"data/laion-000000-000.parquet": {
                               "sentences": 1, "images": 1, "tokens": 256,
                               "by_task": {"single": {"sentences": 1, "images": 1, "tokens": 256}}}}})
    return run


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


def test_missing_file_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    """`uvd stats` reaching a run whose listed shard is gone: exit 2 naming the file."""
    run = _tiny_run(tmp_path / "elsewhere" / "laion")
    (run / "data/laion-000000-000.parquet").unlink()
    assert main(["stats", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "laion-000000-000.parquet" in err and "uvd run" in err and "Traceback" not in err


def test_eval_uses_the_trained_window_length(tmp_path):
    from uvd.cli import trained_seq_len

    out = tmp_path / "train"
    ckpt = out / "checkpoints" / "step_0000004"
    ckpt.mkdir(parents=True)
    assert trained_seq_len(out) is None
    (out / "config.yaml").write_text("data: {seq_len: 1024, runs: [x]}\ntrain: {out: x}\n")
    assert trained_seq_len(out) == 1024 and trained_seq_len(ckpt) == 1024  # the folder or one of its checkpoints
    assert trained_seq_len(tmp_path / "elsewhere") is None


def test_a_run_that_fails_at_once_leaves_no_empty_out(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "new" / "laion"
    assert main(["run", str(ROOT / "recipes/laion.yaml"), "--set", f"inputs={empty}", "--out", str(out), "--quiet"]) == 2
    assert "holds no img2dataset shards (looked for *.tar" in capsys.readouterr().err
    assert not out.exists() and not out.parent.exists()
    kept = tmp_path / "kept"
    kept.mkdir()  # a folder the user made is theirs: left in place
    assert main(["run", str(ROOT / "recipes/laion.yaml"), "--set", f"inputs={empty}", "--out", str(kept), "--quiet"]) == 2
    assert kept.is_dir()


def test_config_kind_by_folder_then_by_keys(tmp_path):
    from uvd.cli import config_kind

    (tmp_path / "recipes" / "train").mkdir(parents=True)
    assert config_kind(tmp_path / "recipes" / "train" / "x.yaml", {"source": "laion"}) == "training config"
    assert config_kind(tmp_path / "train" / "x.yaml", {"model": "tiny"}) == "training config"  # not under recipes/: keys
    assert config_kind(tmp_path / "x.yaml", {"source": "laion", "inputs": "x"}) == "recipe"
    assert config_kind(tmp_path / "x.yaml", {"tolerance": 0.1, "tasks": {"single": 1}}) == "target mix"
    assert config_kind(tmp_path / "x.yaml", {"data": [], "out": "o", "model": "small"}) == "tokenizer training recipe"
    assert config_kind(tmp_path / "x.yaml", ["a"]) == "recipe"
