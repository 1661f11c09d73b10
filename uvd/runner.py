"""Run a recipe end to end on Ray: the cluster makes the dataset, the driver only coordinates.

    uvd run recipes/laion.yaml --out out/laion [--address HEAD:6379]

The source's units are cut into parts of consecutive units. Phase 1: one Ray task per part
reads, decodes and resizes its items and tokenizes them on the encoder actors (one per GPU, or
fractional-CPU actors), writing the part's work file and record under `_uvd/` (uvd/work.py);
with `labelers`, each labeler is one more actor pool the part tasks feed their input images to
(loaded once on the driver first, so a bad weights folder fails before any work).
Dedup: digests partitioned by bucket, one task per bucket range (uvd/dedup.py). Planning, for
sources whose sentences span units: one task, from counts only. Phase 2: one task per part
assembles its sentences and writes its shards, rejects and record (uvd/assemble.py). The driver
holds O(parts) small counters, never an image; at the end it compacts the records into the
manifest. Every file is placed by rename and each part's record is written last, so a killed
task or driver leaves nothing partial visible and a rerun redoes only the missing parts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from uvd import layout as L
from uvd import manifest as M
from uvd import storage as S
from uvd.assemble import write_part, write_valid
from uvd.recipe import Recipe
from uvd.registry import get_source, get_tokenizer_stage, plugin
from uvd.runtime import cluster_resources, ray_session
from uvd.shards import SCHEMA_VERSION
from uvd.source import Source
from uvd.work import EncoderActor, Part, Progress, tokenize_part, work_valid

log = logging.getLogger(__name__)

MIN_ITEMS_FOR_EARLY_FAIL = 1000  # the reject rate is judged early once this many inputs were read


class JobFailed(RuntimeError):
    """The job ran but its output must not be used (e.g. too many inputs were rejected)."""


@dataclass
class RunSummary:
    out_dir: str
    sentences: int = 0
    images: int = 0
    tokens: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    units_total: int = 0
    parts_total: int = 0
    parts_tokenized: int = 0  # parts tokenized by this invocation (the rest were done before)
    parts_written: int = 0
    already_complete: bool = False
    seconds: float = 0.0
    tokenizer: dict[str, Any] = field(default_factory=dict)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tokenizer_kwargs(recipe: Recipe) -> dict[str, Any]:
    t = recipe.tokenizer
    # With weights, their folder's config.json is the config (never assumed from the recipe).
    return {"config": None if t.weights else t.config, "weights": t.weights, "seed": t.seed, "dtype": t.dtype}


def make_parts(units: list[str], units_per_part: int) -> list[Part]:
    return [Part(i, units[s: s + units_per_part], s) for i, s in enumerate(range(0, len(units), units_per_part))]


def run_recipe(recipe: Recipe, out_dir: str | Path, address: str | None = None, overwrite: bool = False,
               progress: bool = True, verify: bool = False, dashboard: bool = False) -> RunSummary:
    """Run `recipe` into `out_dir`, resuming whatever an earlier run of it finished. `dashboard`
    starts the Ray dashboard with an embedded Ray."""
    start = time.time()
    out = S.as_path(out_dir)  # a local folder or an object-store URI
    # Validate everything first; delete (for --overwrite) last.
    L.check_out_dir(out)
    if not overwrite:
        manifest = M.read_manifest(out)
        if manifest and manifest["recipe_hash"] != recipe.hash():
            raise ValueError(f"--out {out}: holds a run of another recipe (hash {manifest['recipe_hash']}, this one "
                             f"{recipe.hash()}); use --overwrite to start over, or another --out")
    source: Source = get_source(recipe.source)(recipe)
    units = source.list_units()
    if not units:
        raise ValueError(f"inputs: {recipe.inputs} holds no input for source {recipe.source!r} "
                         f"(looked for {source.looks_for()})")
    tokenizer = get_tokenizer_stage().describe(**_tokenizer_kwargs(recipe))
    labelers = describe_labelers(recipe, source)
    if not S.is_remote(out):
        out.mkdir(parents=True, exist_ok=True)
    with L.RunLock(out):
        if overwrite:
            removed = L.clear_run(out)
            log.info("--overwrite: removed %d files of the previous run in %s", removed, out)
        return _run_locked(recipe, source, units, tokenizer, out, address, progress, verify, start, labelers, dashboard)


def describe_labelers(recipe: Recipe, source: Source) -> dict[str, dict]:
    """The recipe's labelers, each loaded once on the driver (CPU) before any work: a missing or
    mismatched weights file is a ValueError naming it. -> {name: identity (kind, weights sha256, ...)}."""
    if not recipe.labelers.models:
        return {}
    taken = {"input", *(getattr(recipe.sentence, "tasks", None) or []), *getattr(source, "fixed_tasks", ())}
    if isinstance(getattr(recipe.sentence, "task", None), str):
        taken.add(recipe.sentence.task)
    for i, model in enumerate(recipe.labelers.models):
        if model.name in taken:
            raise ValueError(f"labelers.models[{i}].name: {model.name!r} is already an annotation of source "
                             f"{recipe.source!r} (or the input role); give the labeler another name")
    return plugin("labelers").describe([dataclasses.asdict(m) for m in recipe.labelers.models])


def _run_locked(recipe: Recipe, source: Source, units: list[str], tokenizer: dict, out: Path, address: str | None,
                progress: bool, verify: bool, start: float, labelers: dict[str, dict] | None = None,
                dashboard: bool = False) -> RunSummary:
    recipe_hash = recipe.hash()
    labelers = labelers or {}
    # What determines the tokens of a part, and what determines the shards (labelers: by their
    # weights' content, kind, dtype and options, so a changed labeler redoes the work).
    work_hash = _digest("work", recipe.work_identity(), tokenizer["weights_sha256"], tokenizer["config"],
                        *([labelers] if labelers else []))
    output_hash = _digest("output", recipe_hash, tokenizer["weights_sha256"], tokenizer["config"],
                          *([labelers] if labelers else []))
    parts = make_parts(units, recipe.output.units_per_part or source.units_per_part)
    manifest = M.read_manifest(out) or {
        "schema_version": SCHEMA_VERSION, "source": recipe.source, "recipe_hash": recipe_hash,
        "tokenizer": tokenizer, "status": "running", "shards": {},
    }
    summary = RunSummary(out_dir=str(out), units_total=len(units), parts_total=len(parts), tokenizer=tokenizer)
    if manifest["status"] == "complete":
        used = parts[: manifest.get("parts", len(parts))]  # with limits.max_items, the parts the limit reached
        bad = [p.index for p, ok in zip(used, _written(out, used, output_hash, "sha256" if verify else "size")) if not ok]
        if not bad:
            log.info("%s: already complete, nothing to do", out)
            return _finish_summary(summary, manifest, start, already_complete=True)
        log.warning("%s: %d part(s) have missing or damaged shards; redoing only those", out, len(bad))
    if not tokenizer["trained"]:
        log.warning("tokenizer %s has UNTRAINED weights (no tokenizer.weights given): its tokens carry no meaning",
                    tokenizer["id"])
    manifest.update(status="running", units=len(units), parts=len(parts), shards={}, tokenizer=tokenizer)
    if labelers:
        manifest["labelers"] = labelers
    manifest.pop("failure", None)
    M.write_manifest(out, manifest)
    L.atomic_write_bytes(out / L.RECIPE_FILE, recipe.to_yaml().encode())

    with ray_session(address, dashboard=dashboard):
        import ray

        source_ref = ray.put(source)
        if recipe.limits.max_items is not None:
            parts = _tokenize_limited(parts, source_ref, recipe, out, work_hash, tokenizer, summary, progress, output_hash)
            manifest["parts"] = len(parts)
        written = dict(zip((p.index for p in parts), _written(out, parts, output_hash)))
        global_assembly = source.assembly == "global"
        dedup_ready = not recipe.filters.dedup or _dedup_valid(out, output_hash, len(parts))
        inputs_of = _window_parts(parts, written, source.assembly_window if not global_assembly else 1,
                                  recipe.output.units_per_part or source.units_per_part)
        need_work = [p for p in parts if p.index in inputs_of or not dedup_ready or
                     (global_assembly and not all(written.values()))]
        work_files = S.listing(out / L.WORK_DIR)
        valid = S.io_map(lambda p: work_valid(out, p.index, _part_hash(work_hash, p), work_files), need_work)
        todo = [p for p, ok in zip(need_work, valid) if not ok]
        if todo:
            _tokenize(todo, source_ref, recipe, out, work_hash, tokenizer, summary, progress)
        if not dedup_ready:
            _dedup(out, parts, output_hash)
        if global_assembly and (not all(written.values()) or not _plan_valid(out, output_hash)):
            _run_tasks("plan", [None], lambda _: _plan_remote().remote(source_ref, str(out), parts_summary(out, parts)),
                       lambda _, __: None, progress=False)
            L.write_json(out / L.PLAN_DIR / "plan.json", {"output_hash": output_hash, "parts": len(parts)})
            written = {i: False for i in written}
        to_write = [p for p in parts if not written[p.index]]
        remote_write = ray.remote(num_cpus=1, max_retries=3)(write_part)

        num_units = parts[-1].first_unit + len(parts[-1].units)

        def submit_write(p: Part):
            return remote_write.remote(p, source_ref, recipe, str(out), output_hash, tokenizer["id"], num_units)

        summary.parts_written = len(to_write)
        _run_tasks(f"{recipe.source}: write", to_write, submit_write, lambda p, rec: None, progress)
    return _compact(recipe, out, parts, manifest, output_hash, summary, start)


def _written(out: Path, parts: list[Part], output_hash: str, check: str = "size") -> list[bool]:
    """Per part: is its write valid? Two listings for the files, the records read on a thread pool."""
    from uvd.assemble import run_sizes

    sizes = run_sizes(out)
    return S.io_map(lambda p: write_valid(out, p.index, output_hash, check, sizes)[0], parts)


def _window_parts(parts: list[Part], written: dict[int, bool], window: int, units_per_part: int) -> set[int]:
    """Parts whose work files the unwritten parts need: themselves and, when the source assembles
    windows of several units, every part holding a unit of a window they own (one starting in them)."""
    needed = {p.index for p in parts if not written[p.index]}
    if window <= 1:
        return needed
    num_units = parts[-1].first_unit + len(parts[-1].units)
    for p in parts:
        if not written[p.index]:
            end = p.first_unit + len(p.units)
            for w_start in range(-(-p.first_unit // window) * window, end, window):
                needed.update(u // units_per_part for u in range(w_start, min(w_start + window, num_units)))
    return needed


def _part_hash(work_hash: str, part: Part) -> str:
    return _digest(work_hash, part.units, part.budget)


_POOL_GROUPS: list = []  # placement groups of this run's encoder pools, removed when the run ends


def _release_pools(actors: list) -> None:
    """Kill the encoder actors and free their placement groups (a long-lived Ray, e.g. tests or a
    cluster session running several recipes, must not keep the reservations)."""
    import ray
    from ray.util.placement_group import remove_placement_group

    for actor in actors:
        ray.kill(actor)
    while _POOL_GROUPS:
        remove_placement_group(_POOL_GROUPS.pop())


@dataclass
class _Pool:
    """Where one actor pool goes: the encoder's, or a labeler's."""

    where: str  # the recipe path its settings come from (for messages)
    use_gpu: bool
    num_actors: int
    cpus_per_actor: float


def _pool_plans(recipe: Recipe) -> list[_Pool]:
    """The encoder pool, then one pool per labeler, checked against the cluster: GPU pools share
    each GPU (one actor of every pool per GPU), CPU pools must leave one CPU for the readers."""
    resources = cluster_resources()
    num_gpus = int(resources.get("GPU", 0))
    num_cpus = resources.get("CPU", 1)
    settings = [("tokenizer", recipe.tokenizer)] + [(f"labelers.models[{i}]", m) for i, m in enumerate(recipe.labelers.models)]
    pools = []
    for path, opts in settings:
        use_gpu = opts.device == "cuda" or (opts.device == "auto" and num_gpus > 0)
        if use_gpu and num_gpus == 0:
            raise ValueError(f"{path}.device: cuda asked for, but the Ray cluster has no GPU")
        num_actors = opts.num_actors or (num_gpus if use_gpu else 1)
        if use_gpu and num_actors > num_gpus:
            raise ValueError(f"{path}.num_actors: {num_actors} GPU actors, but the cluster has {num_gpus} GPU(s)")
        pools.append(_Pool(path, use_gpu, num_actors, opts.cpus_per_actor))
    cpu_pools = [p for p in pools if not p.use_gpu]
    if sum(p.num_actors * p.cpus_per_actor for p in cpu_pools) > num_cpus - 1:
        p = cpu_pools[-1]
        others = sum(q.num_actors * q.cpus_per_actor for q in cpu_pools if q is not p)
        fit = int(max(num_cpus - 1 - others, 0) // p.cpus_per_actor)
        raise ValueError(f"{p.where}.num_actors: {p.num_actors} actors x {p.cpus_per_actor} CPU do not fit the cluster's "
                         f"{num_cpus:g} CPUs with one kept for reading" + (f" beside the other pools' {others:g}" if others else "")
                         + f"; use at most {max(fit, 0)} (or lower {p.where}.cpus_per_actor)")
    return pools


def _place(pool: _Pool, cls: type, args: tuple, gpu_share: float) -> list:
    """Start a pool's actors: GPU actors take `gpu_share` of a GPU; fractional CPU actors are
    packed onto as few nodes as possible (spread over nodes, their fractions would leave no node a
    whole CPU for a reader task), in a placement group released with the pool."""
    import ray

    options: dict[str, Any] = {}
    if not pool.use_gpu:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = placement_group([{"CPU": pool.cpus_per_actor}] * pool.num_actors, strategy="PACK")
        _POOL_GROUPS.append(group)
        options = {"scheduling_strategy": PlacementGroupSchedulingStrategy(group)}
    actor = ray.remote(num_gpus=gpu_share if pool.use_gpu else 0, num_cpus=0 if pool.use_gpu else pool.cpus_per_actor,
                       max_restarts=-1, max_task_retries=3)(cls)
    return [actor.options(**options).remote(*args) for _ in range(pool.num_actors)]


def _wait_placed(pool: _Pool, refs: list, what: str) -> None:
    import ray

    # Place the pool before any reader: readers that took every CPU first would wait forever for it.
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=600)
    if pending:
        raise ValueError(f"{pool.where}.num_actors: only {len(ready)} of {len(refs)} {what} actors could be placed "
                         f"on the cluster in 10 minutes; lower {pool.where}.num_actors or {pool.where}.cpus_per_actor")
    ray.get(ready)  # a labeler that fails to load on its device raises here, before any part starts


def _gpu_share(pools: list[_Pool]) -> float:
    return 1.0 / max(1, sum(p.use_gpu for p in pools))


def _encoders(recipe: Recipe, tokenizer: dict) -> list:
    """The encoder actor pool: one actor per GPU, or fractional-CPU actors that fit beside a reader."""
    pools = _pool_plans(recipe)
    pool = pools[0]
    num_cpus = cluster_resources().get("CPU", 1)
    cpu_actors = sum(p.num_actors for p in pools if not p.use_gpu)
    kwargs = dict(_tokenizer_kwargs(recipe), device="cuda" if pool.use_gpu else "cpu",
                  num_threads=None if pool.use_gpu else max(1, int(num_cpus // (2 * cpu_actors))))
    log.info("%d %s encoder actor(s)", pool.num_actors, "GPU" if pool.use_gpu else "CPU")
    actors = _place(pool, EncoderActor, (get_tokenizer_stage(), kwargs), _gpu_share(pools))
    _wait_placed(pool, [a.info.remote() for a in actors], "encoder")
    return actors


def _labeler_pools(recipe: Recipe) -> dict[str, list]:
    """One actor pool per labeler (LabelerWorker): name -> its actors, in the recipe's order."""
    if not recipe.labelers.models:
        return {}
    pools = _pool_plans(recipe)
    num_cpus = cluster_resources().get("CPU", 1)
    cpu_actors = sum(p.num_actors for p in pools if not p.use_gpu)
    worker = plugin("labelers").LabelerWorker
    out: dict[str, list] = {}
    for model, pool in zip(recipe.labelers.models, pools[1:]):
        spec = dataclasses.asdict(model)
        args = (spec, "cuda" if pool.use_gpu else "cpu", recipe.labelers.save,
                None if pool.use_gpu else max(1, int(num_cpus // (2 * cpu_actors))))
        log.info("labeler %s: %d %s actor(s)", model.name, pool.num_actors, "GPU" if pool.use_gpu else "CPU")
        out[model.name] = _place(pool, worker, args, _gpu_share(pools))
        _wait_placed(pool, [a.identity.remote() for a in out[model.name]], f"labeler {model.name!r}")
    return out


def _all_actors(encoders: list, labelers: dict[str, list]) -> list:
    return list(encoders) + [a for pool in labelers.values() for a in pool]


def _tokenize(parts: list[Part], source_ref: Any, recipe: Recipe, out: Path, work_hash: str, tokenizer: dict,
              summary: RunSummary, progress: bool, encoders: list | None = None, progress_actor: Any = None,
              labelers: dict[str, list] | None = None) -> None:
    import ray

    own_pool = encoders is None
    if own_pool:
        encoders, labelers = [], {}
        try:
            encoders = _encoders(recipe, tokenizer)
            labelers = _labeler_pools(recipe)
        except BaseException:
            _release_pools(encoders)
            raise
    labelers = labelers or {}
    progress_actor = progress_actor or ray.remote(num_cpus=0)(Progress).remote()
    task = ray.remote(num_cpus=1, max_retries=3)(tokenize_part)
    seen = {"items": 0, "rejected": 0}

    def done(part: Part, record: Any) -> None:
        seen["items"] += record.items
        seen["rejected"] += record.rejected
        summary.parts_tokenized += 1
        _check_early(recipe, out, seen["rejected"], seen["items"], final=False)

    def submit(part: Part):
        return task.remote(part, source_ref, recipe, str(out), _part_hash(work_hash, part), encoders, progress_actor,
                           labelers)

    try:
        _run_tasks(f"{recipe.source}: tokenize", parts, submit, done, progress, progress_actor=progress_actor)
    finally:
        if own_pool:
            _release_pools(_all_actors(encoders, labelers))


def _tokenize_limited(parts: list[Part], source_ref: Any, recipe: Recipe, out: Path, work_hash: str, tokenizer: dict,
                      summary: RunSummary, progress: bool, output_hash: str = "") -> list[Part]:
    """With limits.max_items: parts in input order, each reading what the limit leaves, until it is
    reached. -> the parts that take part in the run."""
    try:
        return _limited_parts(parts, source_ref, recipe, out, work_hash, tokenizer, summary, progress, output_hash)
    finally:
        _release_pools([])


def _limited_parts(parts: list[Part], source_ref: Any, recipe: Recipe, out: Path, work_hash: str, tokenizer: dict,
                   summary: RunSummary, progress: bool, output_hash: str = "") -> list[Part]:
    import ray

    remaining = recipe.limits.max_items
    encoders, labelers, progress_actor, used = None, {}, None, []
    try:
        for part in parts:
            if remaining <= 0:
                break
            part.budget = remaining
            written, record = write_valid(out, part.index, output_hash)
            if written and not work_valid(out, part.index, _part_hash(work_hash, part)):
                remaining -= record["inputs"]  # written before, its work files removed: not tokenized again
                used.append(part)
                continue
            if not work_valid(out, part.index, _part_hash(work_hash, part)):
                if encoders is None:
                    encoders = _encoders(recipe, tokenizer)
                    labelers = _labeler_pools(recipe)
                progress_actor = progress_actor or ray.remote(num_cpus=0)(Progress).remote()
                _tokenize([part], source_ref, recipe, out, work_hash, tokenizer, summary, progress, encoders, progress_actor,
                          labelers)
            record = L.read_json(out / L.PARTS_DIR / f"{part.name}.json", "a part record")
            remaining -= record["items"]
            used.append(part)
    finally:
        if encoders:
            _release_pools(_all_actors(encoders, labelers))
    return used


def _run_tasks(desc: str, items: list, submit: Callable[[Any], Any], done: Callable[[Any, Any], None],
               progress: bool, progress_actor: Any = None) -> None:
    """Submit one task per item with a bounded number in flight; call `done` as each finishes."""
    import ray
    from tqdm import tqdm

    if not items:
        return
    limit = max(4, int(cluster_resources().get("CPU", 1)) * 2)
    pending = list(reversed(items))
    in_flight: dict[Any, Any] = {}
    unit = "item" if progress_actor is not None else "part"
    bar = tqdm(desc=desc, unit=unit, total=None if progress_actor is not None else len(items), disable=not progress,
               dynamic_ncols=True)
    finished = 0
    try:
        while pending or in_flight:
            while pending and len(in_flight) < limit:
                item = pending.pop()
                in_flight[submit(item)] = item
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
            for ref in ready:
                item = in_flight.pop(ref)
                done(item, ray.get(ref))
                finished += 1
                if progress_actor is None:
                    bar.update(1)
            if progress_actor is not None:
                count = ray.get(progress_actor.get.remote())
                if finished:
                    bar.total = max(count, int(count / finished * len(items)) if len(items) > finished else count)
                bar.update(count - bar.n)
    finally:
        for ref in in_flight:
            ray.cancel(ref, force=True)
        bar.close()


def _dedup_valid(out: Path, output_hash: str, num_parts: int) -> bool:
    try:
        record = L.read_json(out / L.PLAN_DIR / "dedup.json", "the dedup record")
    except L.CorruptRunError:
        return False
    return bool(record) and record.get("output_hash") == output_hash and record.get("parts") == num_parts


def _plan_valid(out: Path, output_hash: str) -> bool:
    try:
        record = L.read_json(out / L.PLAN_DIR / "plan.json", "the plan record")
    except L.CorruptRunError:
        return False
    return bool(record) and record.get("output_hash") == output_hash


def _dedup(out: Path, parts: list[Part], output_hash: str) -> None:
    import ray

    from uvd.dedup import bucket_ranges, dedup_task, gather_task, part_groups

    for pattern in ("gather-*.parquet", "dups-*.parquet"):
        for old in (out / L.PLAN_DIR).glob(pattern):
            old.unlink()
    kept_per_part = [sum(u[2] for u in rec["per_unit"]) for rec in _part_records(out, parts)]
    kept = sum(kept_per_part)
    ranges = bucket_ranges(kept)
    groups = part_groups(kept_per_part)
    gather = ray.remote(num_cpus=1, max_retries=3)(gather_task)
    _run_tasks("dedup: gather", list(enumerate(groups)), lambda t: gather.remote(str(out), t[0], *t[1], ranges),
               lambda _, __: None, progress=False)
    task = ray.remote(num_cpus=1, max_retries=3)(dedup_task)
    found = {"dups": 0}
    _run_tasks("dedup", list(enumerate(ranges)), lambda t: task.remote(str(out), len(groups), t[0], *t[1]),
               lambda _, n: found.__setitem__("dups", found["dups"] + n), progress=False)
    L.write_json(out / L.PLAN_DIR / "dedup.json", {"output_hash": output_hash, "parts": len(parts), "groups": len(groups),
                                                   "tasks": len(ranges), "duplicates": found["dups"]})
    for path in (out / L.PLAN_DIR).glob("gather-*.parquet"):  # as large as the digests; the decisions are written
        path.unlink()
    log.info("dedup: %d exact duplicates among %d images (%d gather + %d bucket task(s))", found["dups"], kept,
             len(groups), len(ranges))


def _part_records(out: Path, parts: list[Part]) -> list[dict]:
    def read(p: Part) -> dict:
        record = L.read_json(out / L.PARTS_DIR / f"{p.name}.json", "a part record")
        if record is None:
            raise L.CorruptRunError(out / L.PARTS_DIR / f"{p.name}.json", "a part record is missing")
        return record

    return S.io_map(read, parts)


def parts_summary(out: Path, parts: list[Part]) -> list[dict]:
    """Per part: its units and their kept counts (what planners work from; no keys, no tokens)."""
    return [{"index": p.index, "units": p.units, "first_unit": p.first_unit,
             "per_unit": rec["per_unit"]} for p, rec in zip(parts, _part_records(out, parts))]


def _plan_remote():
    import ray

    def plan(source: Source, run_dir: str, parts: list[dict]) -> None:
        source.plan(S.as_path(run_dir), parts)

    return ray.remote(num_cpus=1, max_retries=3)(plan)


def _check_early(recipe: Recipe, out: Path, rejected: int, items: int, final: bool) -> None:
    """Fail as soon as the reject rate is clearly over the limit (so no GPU time is wasted)."""
    if not items or (not final and items < MIN_ITEMS_FOR_EARLY_FAIL):
        return
    rate = rejected / items
    if rate <= recipe.limits.max_reject_rate:
        return
    manifest = M.read_manifest(out) or {}
    when = "" if final else f" after the first {items:,} inputs"
    manifest.update(status="failed", failure=f"{rejected} of {items} inputs rejected ({rate:.1%}){when}")
    M.write_manifest(out, manifest)
    raise JobFailed(
        f"{rejected:,} of {items:,} inputs rejected ({rate:.1%}){when}, over limits.max_reject_rate="
        f"{recipe.limits.max_reject_rate}; see the rejects under {out}. The tokenized parts are kept: raising the "
        "limit (or fixing the inputs' problem) and rerunning resumes without re-tokenizing."
    )


def _compact(recipe: Recipe, out: Path, parts: list[Part], manifest: dict, output_hash: str, summary: RunSummary,
             start: float) -> RunSummary:
    """Fold the write records into the manifest (one rewrite), judge the reject rate, finish."""
    shards: dict[str, dict] = {}
    rejects = {"files": [], "count": 0, "by_reason": {}}
    totals = {"sentences": 0, "images": 0, "tokens": 0, "rejected": 0, "inputs": 0}
    label_rejects = 0  # labeler renderings no sentence used: listed as rejects, not judged as bad inputs
    from uvd.assemble import run_sizes

    sizes = run_sizes(out)
    def checked():  # read on a thread pool, folded a chunk at a time (never every record at once)
        for i in range(0, len(parts), 4096):
            chunk = parts[i: i + 4096]
            yield from zip(chunk, S.io_map(lambda p: write_valid(out, p.index, output_hash, "exists", sizes), chunk))

    for p, (ok, record) in checked():
        if not ok:
            raise L.CorruptRunError(out / L.WRITES_DIR / f"{p.name}.json", "a part's write record is missing after writing")
        shards.update(record["shards"])
        rejects["files"].append(record["rejects"]["file"])
        rejects["count"] += record["rejects"]["count"]
        for reason, n in record["rejects"]["by_reason"].items():
            rejects["by_reason"][reason] = rejects["by_reason"].get(reason, 0) + n
        for k in ("sentences", "images", "tokens"):
            totals[k] += record[k]
        totals["inputs"] += record["inputs"]
        label_rejects += record.get("label_rejects", 0)
    totals["rejected"] = rejects["count"]
    rejects["by_reason"] = dict(sorted(rejects["by_reason"].items()))
    manifest.update(shards=shards, rejects=rejects, totals=totals)
    M.write_manifest(out, manifest)
    _check_early(recipe, out, totals["rejected"] - label_rejects, totals["inputs"], final=True)
    manifest["status"] = "complete"
    M.write_manifest(out, manifest)
    write_card(out, recipe, manifest)
    if not recipe.output.keep_work:
        S.remove_tree(out / L.WORK_DIR)
    return _finish_summary(summary, manifest, start)


def _finish_summary(summary: RunSummary, manifest: dict, start: float, already_complete: bool = False) -> RunSummary:
    totals = manifest.get("totals", {})
    summary.sentences, summary.images = totals.get("sentences", 0), totals.get("images", 0)
    summary.tokens, summary.rejected = totals.get("tokens", 0), totals.get("rejected", 0)
    summary.rejected_by_reason = manifest.get("rejects", {}).get("by_reason", {})
    summary.shards = len(manifest["shards"])
    summary.already_complete = already_complete
    summary.tokenizer = manifest.get("tokenizer", summary.tokenizer)
    summary.seconds = time.time() - start
    return summary


def write_card(out: Path, recipe: Recipe, manifest: dict) -> None:
    """README.md: a Hugging Face dataset card, so `load_dataset(RUN)` reads the shards as-is."""
    t = manifest["totals"]
    tasks = sorted({task for c in manifest["shards"].values() for task in c.get("by_task", {})})
    saved = recipe.labelers.save and recipe.labelers.models
    labels_config = f'- config_name: labels\n  data_files: "{L.LABELS_DIR}/*.parquet"\n' if saved else ""
    labelers = ", ".join(f"`{name}` ({info['kind']})" for name, info in manifest.get("labelers", {}).items())
    card = f"""---
configs:
- config_name: default
  data_files: "{L.DATA_DIR}/*.parquet"
- config_name: rejects
  data_files: "{L.REJECTS_DIR}/*.parquet"
{labels_config}tags:
- uvd
- visual-sentences
- vqgan-tokens
---
{L.CARD_MARKER}
# UVD run: `{recipe.source}`

Visual sentences tokenized by UVD (the Unified Vision Dataset pipeline of the Large Vision Model).
One row per sentence: `id`, `source`, `task`, `num_images`, `tokens` (list<uint16>: `num_images` x 256
visual ids in [0, 8192), image after image, no special ids), `images` (provenance of each image), `meta`
(JSON). The `rejects` config lists every input that is in no sentence, with its reason.

| | |
|---|---|
| source | `{recipe.source}` |
| tasks | {", ".join(f"`{x}`" for x in tasks) or "-"} |
| sentences | {t["sentences"]:,} |
| images | {t["images"]:,} |
| tokens | {t["tokens"]:,} |
| rejected inputs | {t["rejected"]:,} |
| labelers | {labelers or "-"}{" (raw labels: the `labels` config)" if saved else ""} |
| tokenizer | `{manifest["tokenizer"]["id"]}` ({"trained" if manifest["tokenizer"]["trained"] else "UNTRAINED: tokens carry no meaning"}) |
| recipe hash | `{manifest["recipe_hash"]}` |

```python
from datasets import load_dataset
sentences = load_dataset("parquet", data_dir="{L.DATA_DIR}")  # or load_dataset(RUN_DIR)
rejects = load_dataset(RUN_DIR, "rejects")
```

## Recipe

```yaml
{recipe.to_yaml().strip()}
```
"""
    L.atomic_write_bytes(out / L.CARD_FILE, card.encode())
