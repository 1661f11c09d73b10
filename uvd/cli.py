"""The `uvd` command line: the application layer over the core (uvd/) and its plug-ins.

    uvd run RECIPE [--set key=value ...] [--out DIR] [--address RAY_ADDRESS] [--limit N] [--overwrite]
    uvd stats DIR [--json]
    uvd validate [CONFIG ...]
    uvd demo [--out DIR] [--small] [--no-train]
    uvd audit DIR [--target MIX.yaml] [--out report.html] [--json]
    uvd push RUN REPO_ID [--private] [--message TEXT]
    uvd train CONFIG [--set key=value ...]
    uvd ablate CONFIG --leave-out SOURCE [...] [--set ...] [--eval-data RUN ...]
    uvd eval MODEL --data RUN [...] [--json]
    uvd prompt MODEL --data RUN [...] [--mode analogy|sequential] [--out sheet.png]
    uvd tokenizer convert|train ...;  uvd view SHARD|IMAGE --out PNG

Plug-ins (`pipelines/`, `tokenizer/`, `model/`, `demo/`) are found through `uvd.registry.plugin`
and imported only by the commands that use them: `--help`, `stats`, `audit --json` and
`validate` of dataset recipes, mixes and tokenizer recipes never import torch.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from uvd.config import recipes_dir
from uvd.registry import plugin


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uvd", description="Unified Vision Dataset: visual sentences -> token shards")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe on Ray and write token shards")
    run.add_argument("recipe", help="YAML recipe (see recipes/)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe field, e.g. --set inputs=/data/x --set tokenizer.dtype=bfloat16")
    run.add_argument("--out", help="output folder (default: out/<source>)")
    run.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    run.add_argument("--limit", type=int, help="read at most N input items (same as --set limits.max_items=N)")
    run.add_argument("--overwrite", action="store_true",
                     help="start over: delete what UVD wrote in --out (never other files), after every check passed")
    run.add_argument("--verify", action="store_true",
                     help="on a finished run, re-read every shard's checksum (default: sizes) and redo damaged parts")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--dashboard", action="store_true",
                     help="start the Ray dashboard with the embedded Ray (its address is logged; needs ray[default]); "
                          "on a cluster, the dashboard is the one `ray start` runs")

    stats = sub.add_parser("stats", help="statistics of one run folder or a folder of runs")
    stats.add_argument("dir")
    stats.add_argument("--json", action="store_true", help="print JSON (layout in README)")
    stats.add_argument("--verify", action="store_true",
                       help="check every listed shard's size and checksum against the run's record (reads every byte)")
    stats.add_argument("--codebook", action="store_true",
                       help="also code usage per source: histogram, perplexity, dead-code share (reads the tokens)")

    validate = sub.add_parser("validate", help="check recipes and configs without running them")
    validate.add_argument("recipes", nargs="*", metavar="CONFIG",
                          help="YAML files: dataset recipes, training configs (train/), tokenizer training "
                               "recipes (tokenizer/), target mixes (mixes/); default: every YAML file under recipes/")

    audit = sub.add_parser("audit", help="data-mix audit of one run or a folder of runs: HTML report, JSON, drift check")
    audit.add_argument("dir")
    audit.add_argument("--target", help="target mix YAML (e.g. recipes/mixes/uvdv1.yaml); exit 3 when a share drifts past its tolerance")
    audit.add_argument("--out", help="HTML report path (default: audit.html; with --json only when given)")
    audit.add_argument("--json", action="store_true", help="print the numbers as JSON (layout in README)")
    audit.add_argument("--samples", type=int, default=2, help="decoded sample sentences per source (0: none)")
    audit.add_argument("--ray", action="store_true", help="count shards in Ray tasks (default: when more than 64 shards)")
    audit.add_argument("--address", help="Ray cluster address for --ray (default: an embedded local Ray)")
    audit.add_argument("--include-incomplete", action="store_true",
                       help="also count the finished parts of runs that are still running or failed")

    demo = sub.add_parser("demo", help="build a small sample world and run the recipes on it")
    demo.add_argument("--out", default="demo_out", help="folder for the sample world and the runs")
    demo.add_argument("--small", action="store_true", help="a smaller world (faster)")
    demo.add_argument("--no-train", action="store_true", help="skip the last step (training a tiny LVM)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")

    push = sub.add_parser("push", help="upload a finished run folder to the Hugging Face Hub as a dataset repo")
    push.add_argument("run", help="a run folder whose status is complete")
    push.add_argument("repo_id", help="dataset repo, e.g. me/uvd-laion (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--message", help="commit message")

    train = sub.add_parser("train", help="train the LVM on token shards (model/; torchrun for DDP/FSDP)")
    train.add_argument("config", help="training config (see recipes/train/)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set train.max_steps=100 --set data.runs=[out/laion]")

    ablate = sub.add_parser("ablate", help="train one run per left-out data component and compare evaluations")
    ablate.add_argument("config", help="training config (see recipes/train/)")
    ablate.add_argument("--leave-out", action="append", default=[], metavar="SOURCE[/TASK]",
                        help="a component to leave out (repeat for more variants)")
    ablate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ablate.add_argument("--eval-data", nargs="+", help="held-out run folders (default: eval.runs, else data.runs)")
    ablate.add_argument("--json", action="store_true", help="print the results as JSON")

    evaluate = sub.add_parser("eval", help="LVM evaluation: per-task prompt perplexity and held-out perplexity")
    evaluate.add_argument("model", help="training output folder or checkpoint folder")
    evaluate.add_argument("--data", nargs="+", required=True, help="held-out run folders")
    evaluate.add_argument("--max-prompts", type=int, default=20, help="prompts per task")
    evaluate.add_argument("--windows", type=int, default=8, help="packed windows for the held-out perplexity")
    evaluate.add_argument("--batch-size", type=int, default=4)
    evaluate.add_argument("--seq-len", type=int,
                          help="window length for the held-out perplexity (default: the data.seq_len the model was trained at)")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--json", action="store_true")

    prompt = sub.add_parser("prompt", help="sample images from the LVM and write a contact sheet")
    prompt.add_argument("model", help="training output folder or checkpoint folder")
    prompt.add_argument("--data", nargs="+", required=True, help="run folders to take the prompt sentence from")
    prompt.add_argument("--mode", choices=("analogy", "sequential"), default="analogy")
    prompt.add_argument("--task", help="task of the prompt sentence (default: the first long enough)")
    prompt.add_argument("--index", type=int, default=0, help="which matching sentence")
    prompt.add_argument("--context", type=int, help="pairs (analogy, default 5) or frames (sequential, default 15)")
    prompt.add_argument("--generate", type=int, default=1, help="images to generate (sequential)")
    prompt.add_argument("--temperature", type=float, default=1.0)
    prompt.add_argument("--top-k", type=int, default=100)
    prompt.add_argument("--top-p", type=float)
    prompt.add_argument("--seed", type=int, default=0)
    prompt.add_argument("--tokenizer-config", help="tokenizer preset or folder (default: the one in the run's _recipe.yaml)")
    prompt.add_argument("--tokenizer-weights", help="tokenizer folder with weights")
    prompt.add_argument("--device", default="auto")
    prompt.add_argument("--out", default="prompt.png", help="contact sheet PNG")

    tok = sub.add_parser("tokenizer", help="VQGAN tokenizer: convert checkpoints, train one")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    convert = tok_sub.add_parser("convert", help="open-muse / diffusers / uvd checkpoint folder -> uvd folder")
    convert.add_argument("src", help="checkpoint folder (config.json + weights; aMUSEd's repo root or its vqvae/)")
    convert.add_argument("dst", help="output folder: config.json + model.safetensors")
    tok_train = tok_sub.add_parser("train", help="train a VQGAN on images of UVD sources (torchrun for DDP)")
    tok_train.add_argument("recipe", help="tokenizer training recipe (see recipes/tokenizer/)")
    tok_train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override a field, e.g. --set train.steps=100 --set out=runs/tok")

    view = sub.add_parser("view", help="decode a sentence's tokens to a contact sheet, or reconstruct an image")
    view.add_argument("target", help="a shard (.parquet) or an image file")
    view.add_argument("--row", type=int, help="row of the shard (default 0)")
    view.add_argument("--id", dest="sentence_id", help="sentence id in the shard")
    view.add_argument("--out", required=True, help="PNG to write")
    view.add_argument("--weights", help="tokenizer folder (default for a shard: the run's tokenizer)")
    view.add_argument("--config", help="tokenizer preset for untrained weights (default: small)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from uvd.layout import DiskFullError
    from uvd.runner import JobFailed

    try:
        return COMMANDS[args.command](args)
    except ValueError as err:
        print(f"uvd {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        if args.verbose:
            raise
        what = f"{err.strerror}: {err.filename}" if err.strerror and err.filename else f"{type(err).__name__}: {err}"
        print(f"uvd {args.command}: error: {what} (-v shows where)", file=sys.stderr)
        return 2
    except (JobFailed, DiskFullError) as err:
        print(f"uvd {args.command}: job failed: {err}", file=sys.stderr)
        return 1


def cmd_run(args: argparse.Namespace) -> int:
    from uvd.recipe import load_recipe
    from uvd.runner import run_recipe
    from uvd.stats import compute_stats, format_stats
    from uvd.storage import as_path, is_remote

    overrides = list(args.overrides)
    if args.limit is not None:
        overrides.append(f"limits.max_items={args.limit}")
    recipe = load_recipe(args.recipe, overrides)
    if args.dashboard and not (args.address or os.environ.get("RAY_ADDRESS")):
        from uvd.runtime import check_dashboard

        check_dashboard()  # before --out is made
    out = as_path(args.out or f"out/{recipe.source}")  # a local folder or an object-store URI (s3://, gs://, hf://)
    # what this run will create, deepest first (an object store has no empty folders to leave behind)
    new_folders = [] if is_remote(out) else [p for p in (out, *out.parents) if not p.exists()]
    try:
        summary = run_recipe(recipe, out, address=args.address, overwrite=args.overwrite, progress=not args.quiet,
                             verify=args.verify, dashboard=args.dashboard)
    except BaseException:
        for folder in new_folders:  # a run that failed before writing anything leaves no empty --out behind
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    if summary.already_complete:
        print(f"{out}: already complete ({summary.sentences:,} sentences); --overwrite to redo it")
    else:
        print(
            f"{out}: {summary.sentences:,} sentences, {summary.images:,} images, {summary.tokens:,} tokens in "
            f"{summary.shards} shard(s); {summary.rejected:,} rejected; {summary.seconds:.1f} s"
        )
    print(format_stats(compute_stats(out)))
    _warn_untrained(summary.tokenizer)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from uvd.stats import compute_stats, format_stats

    stats = compute_stats(args.dir, codebook=args.codebook, verify=args.verify)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 3 if stats.get("damaged") else 0  # --verify found damaged shards


CONFIG_KINDS = {"train": "training config", "tokenizer": "tokenizer training recipe", "mixes": "target mix"}


def config_kind(path: Path, data: object) -> str:
    """Which schema a YAML file follows: its folder under a recipes/ folder (train/, tokenizer/, mixes/)
    says so; elsewhere its keys do. -> recipe | training config | tokenizer training recipe | target mix."""
    folder = path.resolve().parent
    under_recipes = folder.parent.name == "recipes" or folder.parent == recipes_dir().resolve()
    if under_recipes and folder.name in CONFIG_KINDS:
        return CONFIG_KINDS[folder.name]
    keys = set(data) if isinstance(data, dict) else set()
    if "source" in keys:
        return "recipe"
    if keys & {"categories", "sources", "tasks"}:
        return "target mix"
    if {"data", "out"} <= keys:
        return "tokenizer training recipe"
    if keys & {"model", "optim", "train", "eval"}:
        return "training config"
    return "recipe"


def validate_config(path: Path) -> str:
    """Load `path` with its own schema (ValueError naming the file and field) -> a one-line summary."""
    from uvd.config import read_yaml

    kind = config_kind(path, read_yaml(path, "config"))
    if kind == "recipe":
        from uvd.recipe import load_recipe

        recipe = load_recipe(path)
        return f"recipe: source {recipe.source}, hash {recipe.hash()}"
    if kind == "target mix":
        from uvd.audit import load_target

        target = load_target(path)
        return f"target mix {target['name']}: {', '.join(f'{len(v)} {k}' for k, v in target['sections'].items())}"
    if kind == "training config":
        config = plugin("train_config")(path)
        return f"training config: model {getattr(config, 'size', '?')}, {config.train.max_steps} steps"
    config = plugin("tokenizer_train_config")(path)
    return f"tokenizer training recipe: {len(config.data)} source(s), {config.train.steps} steps"


def cmd_validate(args: argparse.Namespace) -> int:
    root = recipes_dir()
    paths = [Path(p) for p in args.recipes] or sorted(root.rglob("*.yaml"))
    if not paths:
        raise ValueError(f"no YAML files under {root}")
    failed = 0
    for path in paths:
        try:
            print(f"ok    {path}  ({validate_config(path)})", flush=True)
        except ValueError as err:
            failed += 1
            print(f"FAIL  {err}")
    return 1 if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    plugin("demo")(Path(args.out), small=args.small, progress=not args.quiet, train_lvm=not args.no_train)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from uvd.push import push_run

    url = push_run(args.run, args.repo_id, private=args.private, message=args.message)
    print(f"{args.run} -> {url}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from uvd.audit import run_audit
    from uvd.report import decode_samples, write_report

    if args.samples < 0:
        raise ValueError("--samples must be 0 or more")
    data, total, runs = run_audit(args.dir, args.target, num_samples=args.samples, use_ray=True if args.ray else None,
                                  address=args.address, include_incomplete=args.include_incomplete)
    if args.out or not args.json:
        strips = decode_samples(total, runs) if args.samples else None
        path = write_report(args.out or "audit.html", data, strips)
        print(f"audit report written to {path}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(data, indent=2))
    target = data["target"]
    if target:
        for kind, rows in target["sections"].items():
            for row in rows:
                if row["flagged"]:
                    print(f"DRIFT {kind} {row['name']}: {row['actual_share']:.2%} of tokens, target {row['target_share']:.2%} "
                          f"(tolerance {row['tolerance']:.2%})", file=sys.stderr)
    return 3 if data["drift_exceeded"] else 0


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _end_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # Every rank must be done with its collectives first: tearing down gloo while a peer
        # still talks to it aborted a rank at exit ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


def cmd_train(args: argparse.Namespace) -> int:
    evaluate, format_results, load_model = plugin("evaluate"), plugin("format_eval"), plugin("load_model")
    config = plugin("train_config")(args.config, args.overrides)
    summary = plugin("train")(config)
    _end_distributed()
    shares = ", ".join(f"{k} {summary['token_shares'][k]:.1%} (weight {w:.1%})" for k, w in summary["weights"].items())
    print(f"{summary['out']}: {summary['step']} steps, {summary['tokens']:,} tokens; token shares: {shares}")
    if config.eval.runs and int(os.environ.get("RANK", 0)) == 0:
        model = load_model(config.train.out, _device(config.train.device))
        results = evaluate(model, config.eval.runs, config.eval.max_prompts_per_task, config.eval.num_windows,
                           config.eval.batch_size, config.data.seq_len)
        (Path(config.train.out) / "eval.json").write_text(json.dumps(results, indent=1))
        print(format_results({Path(config.train.out).name: results}))
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    format_results = plugin("format_eval")
    config = plugin("train_config")(args.config, args.overrides)
    results = plugin("ablate")(config, args.leave_out, args.eval_data)
    _end_distributed()
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(results, indent=2) if args.json else format_results(results))
    return 0


def trained_seq_len(model_path: str | Path) -> int | None:
    """data.seq_len of the run that trained `model_path` (a training folder, or one of its checkpoints),
    from the training folder's config.yaml; None when there is none."""
    from uvd.config import read_yaml

    path = Path(model_path)
    for folder in (path, path.parent.parent):
        if (folder / "config.yaml").is_file():
            data = read_yaml(folder / "config.yaml", "training config") or {}
            seq_len = (data.get("data") or {}).get("seq_len") if isinstance(data, dict) else None
            return int(seq_len) if isinstance(seq_len, int) else None
    return None


def cmd_eval(args: argparse.Namespace) -> int:
    if args.seq_len is not None and args.seq_len <= 0:
        raise ValueError("--seq-len must be > 0")
    model = plugin("load_model")(args.model, _device(args.device))
    seq_len = args.seq_len or trained_seq_len(args.model)  # not 4096 for a model trained on 1024-token windows
    results = plugin("evaluate")(model, args.data, args.max_prompts, args.windows, args.batch_size, seq_len)
    print(json.dumps(results, indent=2) if args.json else plugin("format_eval")({Path(args.model).name: results}))
    return 0


def cmd_prompt(args: argparse.Namespace) -> int:
    model = plugin("load_model")(args.model, _device(args.device))
    result = plugin("prompt")(model, args.data, args.out, args.mode, args.task, args.index, args.context, args.generate,
                    args.temperature, args.top_k, args.top_p, args.seed, args.tokenizer_config, args.tokenizer_weights,
                    model_path=args.model)
    print(f"{result['title']}\n{result['mode']} prompt ({result['task']}, {result['context_images']} context images) "
          f"-> {result['path']}")
    return 0


def _warn_untrained(tokenizer_info: dict) -> None:
    if tokenizer_info and not tokenizer_info.get("trained", True):
        print(
            f"\nNOTE: tokens come from an UNTRAINED tokenizer ({tokenizer_info['id']}, random weights): the pipeline "
            "is real, the token ids are not meaningful. Give tokenizer.weights to use real VQGAN weights."
        )


def cmd_tokenizer(args: argparse.Namespace) -> int:
    if args.tokenizer_command == "convert":
        layout, cfg = plugin("tokenizer_convert")(args.src, args.dst)
        print(f"{args.src} ({layout} layout) -> {args.dst}: {cfg.to_dict()}")
        return 0
    summary = plugin("tokenizer_train")(plugin("tokenizer_train_config")(args.recipe, args.overrides))
    _end_distributed()
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary, indent=2))
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    print(plugin("view")(args.target, args.out, row=args.row, sentence_id=args.sentence_id, weights=args.weights,
               config=args.config))
    return 0


COMMANDS = {"run": cmd_run, "stats": cmd_stats, "validate": cmd_validate, "demo": cmd_demo, "audit": cmd_audit,
            "train": cmd_train, "ablate": cmd_ablate, "eval": cmd_eval, "prompt": cmd_prompt}
COMMANDS.update(tokenizer=cmd_tokenizer, view=cmd_view, push=cmd_push)

if __name__ == "__main__":
    sys.exit(main())
