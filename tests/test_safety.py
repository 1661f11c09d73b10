"""Nothing UVD did not write is ever deleted or overwritten; every damaged state gives a clear
error naming the file and the fix, and --overwrite recovers from it."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TEST_OVERRIDES
from uvd import layout as L
from uvd import manifest as M
from uvd.cli import main
from uvd.recipe import load_recipe
from uvd.runner import run_recipe

ROOT = Path(__file__).parents[1]


def laion(world, *extra):
    return load_recipe(ROOT / "recipes/laion.yaml", [f"inputs={world['laion']['path']}", *TEST_OVERRIDES, *extra])


def cli_run(world, out, *extra):
    args = ["run", str(ROOT / "recipes/laion.yaml"), "--out", str(out), "--quiet", "--set", f"inputs={world['laion']['path']}"]
    for o in TEST_OVERRIDES:
        args += ["--set", o]
    return main([*args, *extra])


@pytest.fixture(scope="module")
def finished(ray_local, world, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "laion"
    run_recipe(laion(world), out, progress=False)
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_with_foreign_files_is_refused_and_left_alone(world, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "data").mkdir(parents=True)
    (out / "sentinel.txt").write_text("the user's")
    (out / "laion-00000.parquet").write_text("a file that merely looks like a shard")
    (out / "data" / "notes.md").write_text("mine too")
    before = _snapshot(out)
    for extra in ([], ["--overwrite"]):
        assert cli_run(world, out, *extra) == 2
        err = capsys.readouterr().err
        assert "holds files UVD did not write" in err and "sentinel.txt" in err
        assert _snapshot(out) == before
    assert main(["stats", str(out)]) == 2 and _snapshot(out) == before
    assert main(["audit", str(out), "--json"]) == 2 and _snapshot(out) == before


def test_out_naming_a_file_is_a_clear_error(world, tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("x")
    assert cli_run(world, target) == 2
    assert "is an existing file" in capsys.readouterr().err and target.read_text() == "x"


def test_overwrite_deletes_only_what_uvd_wrote_never_a_path_from_the_manifest(finished, tmp_path, world):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    victim = tmp_path / "victim.txt"
    victim.write_text("outside the run")
    manifest = M.read_manifest(run)
    manifest["shards"]["../victim.txt"] = {"sentences": 1, "images": 1, "tokens": 256, "by_task": {}}
    M.write_manifest(run, manifest)
    with pytest.raises(ValueError, match="not a shard name UVD writes"):
        M.shard_paths(run, manifest)
    assert main(["stats", str(run)]) == 2  # refused, never followed
    removed = L.clear_run(run)
    assert removed > 0 and victim.read_text() == "outside the run"
    assert not any(run.iterdir())


def test_overwrite_with_a_typo_in_inputs_keeps_the_previous_run(finished, world, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = _snapshot(run)
    args = ["run", str(ROOT / "recipes/laion.yaml"), "--out", str(run), "--quiet", "--overwrite",
            "--set", f"inputs={world['laion']['path']}/no_such_shards*"]
    assert main(args) == 2
    assert "matches nothing" in capsys.readouterr().err
    assert _snapshot(run) == before


def test_a_second_run_into_the_same_folder_is_refused_while_one_works(world, tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    with L.RunLock(out):
        with pytest.raises(ValueError, match=rf"another `uvd run` is writing this folder \(pid {os.getpid()}"):
            run_recipe(laion(world), out, progress=False)
    # the lock dies with its holder: a killed process never leaves a stale lock
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, %r); from uvd.layout import RunLock; "
                               "from pathlib import Path; l = RunLock(Path(%r)).__enter__(); print('held', flush=True); "
                               "time.sleep(60)" % (str(ROOT), str(out))], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ValueError, match=f"pid {holder.pid}"):
        L.RunLock(out).__enter__()
    holder.kill()
    holder.wait()
    with L.RunLock(out):
        pass


def test_a_damaged_manifest_names_the_file_and_overwrite_recovers(finished, world, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    text = (run / M.MANIFEST).read_text()
    (run / M.MANIFEST).write_text(text[: len(text) // 2])  # a copy cut short
    assert cli_run(world, run) == 2
    err = capsys.readouterr().err
    assert str(run / M.MANIFEST) in err and "--overwrite" in err
    assert main(["stats", str(run)]) == 2 and str(run / M.MANIFEST) in capsys.readouterr().err
    (run / M.MANIFEST).write_text("")
    assert cli_run(world, run, "--overwrite") == 0
    assert M.read_manifest(run)["status"] == "complete"
    assert set(M.read_manifest(run)["shards"]) == set(M.read_manifest(finished)["shards"])


def test_recipe_values_outside_the_contract_are_refused():
    for override, field in (("output.compression_level=999", "output.compression_level"),
                            ("image.size=32", "image.size"), ("output.units_per_part=0", "output.units_per_part")):
        with pytest.raises(ValueError, match=field):
            load_recipe(ROOT / "recipes/laion.yaml", [override])


def test_an_encoder_pool_larger_than_the_cluster_is_refused(ray_local, world, tmp_path):
    with pytest.raises(ValueError, match="tokenizer.num_actors: 100 actors"):
        run_recipe(laion(world, "tokenizer.num_actors=100"), tmp_path / "big", progress=False)


def test_disk_full_is_said_plainly_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import builtins
    import errno

    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(builtins, "open", lambda path, mode="r", *a, **k: Full(real_open(path, mode, *a, **k))
                        if "w" in mode and ".tmp" in str(path) else real_open(path, mode, *a, **k))
    with pytest.raises(L.DiskFullError, match="no space left .* run the same command again"):
        L.atomic_write_bytes(tmp_path / "data" / "x.parquet", b"123")
    assert not list((tmp_path / "data").iterdir())


def test_stats_and_audit_skip_or_name_a_failed_run(ray_local, world, tmp_path, capsys):
    from uvd.runner import JobFailed

    out = tmp_path / "failed"
    with pytest.raises(JobFailed):
        run_recipe(laion(world, "limits.max_reject_rate=0.01"), out, progress=False)
    assert M.read_manifest(out)["status"] == "failed"
    assert main(["audit", str(out), "--json", "--samples", "0"]) == 2
    assert "no complete UVD run" in capsys.readouterr().err
    assert main(["audit", str(out), "--json", "--samples", "0", "--include-incomplete", "--out", str(tmp_path / "a.html")]) == 0
    # Raising the limit resumes without tokenizing again (max_reject_rate is not part of the recipe's identity).
    summary = run_recipe(laion(world, "limits.max_reject_rate=0.9"), out, progress=False)
    assert summary.parts_tokenized == 0 and M.read_manifest(out)["status"] == "complete"
