"""Benchmark: what the driver costs as the number of images grows (issue 10, "How we will know").

    .venv/bin/python bench/scale.py [--sizes 10000 100000] [--per-shard 10000] [--tokenizer test]
                                    [--no-cluster] [--cache ~/.cache/uvd-bench/scale]

For each N: synthetic img2dataset webdataset shards (64x64 JPEGs with .txt/.json members and the
status parquet, `--per-shard` images a tar, generated once into `--cache` and reused) go through
the real CLI, `uvd run recipes/laion.yaml` (tokenizer preset `--tokenizer` on CPU, 2 encoder
actors, dedup on), first on an embedded Ray and then on a 2-node loopback Ray cluster (head
127.0.0.2, worker 127.0.0.3, half the cores each). Measured on the driver, the `uvd run`
process alone (Ray's daemons and workers excluded): peak RSS and user+system CPU seconds, from
its own getrusage(RUSAGE_SELF) when it exits; and the end-to-end images/s (wall clock of the
command, Ray's start-up included). Prints a table; `--json FILE` also writes the rows.

The goal (issue 10): driver RSS within +10% from 10k to 1M, driver CPU per 1k images falling
with N. The 2-node figures on a machine of few cores share the same cores, so they can show the
cluster path works and what it costs the driver, not a speed-up.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # the repo root, not bench/: bench/tokenize.py would shadow the stdlib

import numpy as np  # noqa: E402

# Runs the CLI in this process and reports the process's own resource use when it exits.
DRIVER = """
import atexit, json, resource, sys
stats_file = sys.argv[1]
def dump():
    u = resource.getrusage(resource.RUSAGE_SELF)
    with open(stats_file, "w") as f:
        json.dump({"cpu_s": u.ru_utime + u.ru_stime, "peak_rss_mb": u.ru_maxrss / 1024}, f)
atexit.register(dump)
from uvd.cli import main
sys.exit(main(sys.argv[2:]))
"""


# ---------------------------------------------------------------- inputs

def write_shard(path: Path, shard: int, count: int) -> None:
    """One img2dataset webdataset shard: NNNNN.tar (KEY.jpg/.txt/.json) + NNNNN.parquet (status)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(shard)
    yy, xx = np.mgrid[0:64, 0:64]
    keys = []
    tmp = path.with_suffix(".tar.partial")
    with tarfile.open(tmp, "w") as tar:
        for i in range(count):
            key = f"{shard:05d}{i:04d}" if count <= 10_000 else f"{shard:05d}{i:06d}"
            a, b, c = rng.integers(0, 256, 3)
            img = np.stack([(xx * 4 + a) % 256, (yy * 4 + b) % 256, (xx + yy + c) % 256], -1).astype(np.uint8)
            img[rng.integers(0, 64), :, :] = rng.integers(0, 256, 3)  # a random line: every image differs
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, "JPEG", quality=90)
            meta = {"key": key, "status": "success", "url": f"https://example.com/{key}.jpg", "caption": f"image {key}",
                    "width": 64, "height": 64, "original_width": 64, "original_height": 64,
                    "punsafe": float(rng.random() * 0.1), "pwatermark": float(rng.random()), "similarity": 0.3}
            for ext, data in (("jpg", buf.getvalue()), ("txt", meta["caption"].encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            keys.append(key)
    status = pa.table({"key": keys, "status": ["success"] * count, "error_message": [None] * count,
                       "caption": [f"image {k}" for k in keys], "url": [f"https://example.com/{k}.jpg" for k in keys]})
    pq.write_table(status, path.with_suffix(".parquet"))
    tmp.rename(path)


def inputs_for(cache: Path, n: int, per_shard: int) -> Path:
    """A folder of links to the first n/per_shard cached shards (generated when missing)."""
    if n % per_shard:
        raise ValueError(f"--sizes: {n} is not a multiple of --per-shard {per_shard}")
    shards = cache / f"shards-{per_shard}"
    shards.mkdir(parents=True, exist_ok=True)
    folder = cache / f"inputs-{n}-{per_shard}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    for s in range(n // per_shard):
        tar = shards / f"{s:05d}.tar"
        if not tar.exists():
            t = time.time()
            write_shard(tar, s, per_shard)
            print(f"  generated {tar} ({time.time() - t:.0f} s)", flush=True)
        for p in (tar, tar.with_suffix(".parquet")):
            (folder / p.name).symlink_to(p)
    return folder


# ---------------------------------------------------------------- the runs

def run_cli(inputs: Path, out: Path, tokenizer: str, address: str | None, env: dict) -> dict:
    stats = out.with_suffix(".driver.json")
    cmd = [sys.executable, "-c", DRIVER, str(stats), "run", str(ROOT / "recipes/laion.yaml"),
           "--set", f"inputs={inputs}", "--set", f"tokenizer.config={tokenizer}", "--set", "tokenizer.device=cpu",
           "--set", "tokenizer.num_actors=2", "--set", "tokenizer.batch_size=64", "--out", str(out), "--quiet"]
    if address:
        cmd += ["--address", address]
    start = time.time()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if result.returncode != 0:
        raise RuntimeError(f"uvd run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    driver = json.loads(stats.read_text())
    return {"wall_s": wall, **driver}


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def loopback_cluster(env: dict, cpus_per_node: int) -> Iterator[str]:
    """Head on 127.0.0.2, one worker node on 127.0.0.3 (as tests/test_cli.py) -> the address."""
    ray = Path(sys.executable).parent / "ray"
    port = _free_port("127.0.0.2")
    common = [f"--num-cpus={cpus_per_node}", "--block", "--disable-usage-stats"]
    temp = tempfile.mkdtemp(prefix="uvd-scale-ray-")
    procs = [subprocess.Popen([ray, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.2",
                               "--include-dashboard=false", f"--temp-dir={temp}", *common],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.2", port)) == 0:
                    break
            time.sleep(0.5)
        procs.append(subprocess.Popen([ray, "start", f"--address=127.0.0.2:{port}", "--node-ip-address=127.0.0.3", *common],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        check = ("import ray,time; ray.init(address='127.0.0.2:%d', _node_ip_address='127.0.0.2', logging_level='ERROR')\n"
                 "t=time.time()\n"
                 "while len([n for n in ray.nodes() if n['Alive']])<2 and time.time()-t<60: time.sleep(1)\n"
                 "print(len([n for n in ray.nodes() if n['Alive']]))" % port)
        nodes = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120)
        if not nodes.stdout.strip().endswith("2"):
            raise RuntimeError(f"the loopback cluster did not come up:\n{nodes.stderr[-2000:]}")
        yield f"127.0.0.2:{port}"
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(temp, ignore_errors=True)


def row(setup: str, n: int, r: dict) -> dict:
    return {"setup": setup, "images": n, "wall_s": round(r["wall_s"], 1), "images_per_s": round(n / r["wall_s"], 1),
            "driver_peak_rss_mb": round(r["peak_rss_mb"], 1), "driver_cpu_s": round(r["cpu_s"], 1),
            "driver_cpu_s_per_1k": round(r["cpu_s"] / n * 1000, 3)}


def print_table(rows: list[dict]) -> None:
    print(f"{'setup':<22} {'images':>9} {'wall s':>8} {'images/s':>9} {'driver peak RSS MB':>19} "
          f"{'driver CPU s':>13} {'CPU s / 1k img':>15}")
    for r in rows:
        print(f"{r['setup']:<22} {r['images']:>9,} {r['wall_s']:>8.1f} {r['images_per_s']:>9.1f} "
              f"{r['driver_peak_rss_mb']:>19.1f} {r['driver_cpu_s']:>13.1f} {r['driver_cpu_s_per_1k']:>15.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="image counts (1000000 for 1M)")
    parser.add_argument("--per-shard", type=int, default=10_000, help="images per tar")
    parser.add_argument("--tokenizer", default="test", help="tokenizer preset (test is the cheapest)")
    parser.add_argument("--no-cluster", action="store_true", help="skip the 2-node loopback cluster runs")
    parser.add_argument("--no-embedded", action="store_true", help="skip the embedded Ray runs")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/uvd-bench/scale")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    cores = os.cpu_count() or 2
    rows = []
    print(f"{cores} cores, load average {os.getloadavg()[0]:.1f}; tokenizer {args.tokenizer!r} on CPU", flush=True)
    with tempfile.TemporaryDirectory(prefix="uvd-scale-") as tmp:
        setups = ([] if args.no_embedded else ["embedded"]) + ([] if args.no_cluster else ["2-node loopback"])
        for n in args.sizes:
            inputs = inputs_for(args.cache, n, args.per_shard)
            for setup in setups:
                out = Path(tmp) / f"{setup.split()[0]}-{n}"
                if setup == "embedded":
                    r = run_cli(inputs, out, args.tokenizer, None, env)
                else:
                    with loopback_cluster(env, max(1, cores // 2)) as address:
                        r = run_cli(inputs, out, args.tokenizer, address, env)
                rows.append(row(setup, n, r))
                print(f"  {setup}, {n:,} images: {json.dumps(rows[-1])}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f} on {cores} cores")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
