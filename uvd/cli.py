"""The `uvd` command line.

    uvd run RECIPE [--set key=value ...] [--out DIR] [--address RAY_ADDRESS] [--limit N] [--overwrite]
    uvd stats DIR [--json]
    uvd validate RECIPE ...
    uvd demo [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def _load_plugins() -> None:
    # The registry is filled here: uvd never imports these packages itself.
    import pipelines  # noqa: F401
    import tokenizer  # noqa: F401


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
    run.add_argument("--overwrite", action="store_true", help="delete this folder's previous run and start over")
    run.add_argument("--quiet", action="store_true", help="no progress bars")

    stats = sub.add_parser("stats", help="statistics of one run folder or a folder of runs")
    stats.add_argument("dir")
    stats.add_argument("--json", action="store_true", help="print JSON (layout in README)")

    validate = sub.add_parser("validate", help="check recipes without running them")
    validate.add_argument("recipes", nargs="*", help=f"recipe files (default: every file in {RECIPES_DIR})")

    demo = sub.add_parser("demo", help="build a small sample world and run the recipes on it")
    demo.add_argument("--out", default="demo_out", help="folder for the sample world and the runs")
    demo.add_argument("--small", action="store_true", help="a smaller world (faster)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    _load_plugins()
    from uvd.runner import JobFailed

    try:
        return COMMANDS[args.command](args)
    except ValueError as err:
        print(f"uvd {args.command}: error: {err}", file=sys.stderr)
        return 2
    except JobFailed as err:
        print(f"uvd {args.command}: job failed: {err}", file=sys.stderr)
        return 1


def cmd_run(args: argparse.Namespace) -> int:
    from uvd.recipe import load_recipe
    from uvd.runner import run_recipe
    from uvd.stats import compute_stats, format_stats

    overrides = list(args.overrides)
    if args.limit is not None:
        overrides.append(f"limits.max_items={args.limit}")
    recipe = load_recipe(args.recipe, overrides)
    out = Path(args.out or f"out/{recipe.source}")
    summary = run_recipe(recipe, out, address=args.address, overwrite=args.overwrite, progress=not args.quiet)
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

    stats = compute_stats(args.dir)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from uvd.recipe import load_recipe

    paths = [Path(p) for p in args.recipes] or sorted(RECIPES_DIR.glob("*.yaml"))
    failed = 0
    for path in paths:
        try:
            recipe = load_recipe(path)
            print(f"ok    {path}  (source {recipe.source}, hash {recipe.hash()})")
        except ValueError as err:
            failed += 1
            print(f"FAIL  {err}")
    return 1 if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from uvd.demo import run_demo

    run_demo(Path(args.out), small=args.small, progress=not args.quiet)
    return 0


def _warn_untrained(tokenizer_info: dict) -> None:
    if tokenizer_info and not tokenizer_info.get("trained", True):
        print(
            f"\nNOTE: tokens come from an UNTRAINED tokenizer ({tokenizer_info['id']}, random weights): the pipeline "
            "is real, the token ids are not meaningful. Give tokenizer.weights to use real VQGAN weights."
        )


COMMANDS = {"run": cmd_run, "stats": cmd_stats, "validate": cmd_validate, "demo": cmd_demo}

if __name__ == "__main__":
    sys.exit(main())
