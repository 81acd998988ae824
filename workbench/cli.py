"""The `workbench` command line: run recipes, resume runs, list and show runs, evaluate, export, demo,
app."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from . import resolver
from .recipes import EvalRecipe, EvalSpec, ModelSpec, RecipeError, load_recipe, recipe_to_yaml
from .workspace import Workspace, headline


def _workspace(args) -> Workspace:
    return Workspace(args.workspace)


def cmd_run(args) -> int:
    from .stages import run_recipe

    recipe = load_recipe(args.recipe, args.set)
    run = run_recipe(recipe, _workspace(args))
    print(f"run {run.id}: {run.status} ({run.folder})")
    return 0


def cmd_resume(args) -> int:
    from .stages import resume_run

    run = resume_run(args.run, _workspace(args))
    print(f"run {run.id}: {run.status} ({run.folder})")
    return 0


def cmd_runs(args) -> int:
    runs = _workspace(args).runs()
    if not runs:
        print(f"no runs in {_workspace(args).root}")
        return 0
    rows = [("id", "kind", "status", "parents", "result")]
    for run in runs:
        info = run.info
        rows.append((run.id, info.get("kind", "?"), run.status,
                     ",".join(p[:15] for p in info.get("parents", [])) or "-", headline(info)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(widths[i]) for i, c in enumerate(row[:4])) + "  " + row[4])
    return 0


def cmd_show(args) -> int:
    run = _workspace(args).get(args.run)
    info = run.info
    info["status"] = run.status
    print(json.dumps(info, indent=2))
    print(f"\n# recipe ({run.path('recipe.yaml')})")
    print(run.path("recipe.yaml").read_text(encoding="utf-8"))
    metrics = [m for m in run.metrics() if "loss" in m]
    if metrics:
        last = metrics[-1]
        print(f"# last step {last['step']}: loss {last['loss']:.4f}, lr {last['lr']:.2e}, "
              f"{last['tokens_per_s']:.0f} tokens/s")
    files = sorted(p.name for p in run.folder.iterdir() if not p.name.startswith("."))
    print(f"# files: {', '.join(files)}")
    return 0


def cmd_eval(args) -> int:
    from .stages import run_eval

    recipe = EvalRecipe(
        name="eval", model=ModelSpec(path=args.model),
        base=ModelSpec(path=args.base) if args.base else None, seq_len=args.seq_len,
        eval=EvalSpec(max_questions=args.max_questions, max_tokens=args.max_tokens),
    )
    run = run_eval(recipe, _workspace(args))
    print(f"run {run.id}: {run.status} ({run.folder})")
    return 0


def cmd_export(args) -> int:
    from .exporting import run_export

    try:
        run = run_export(_workspace(args), args.source, args.format, args.name, args.max_shard_mb,
                         say=lambda message: print(message, flush=True))
    except KeyboardInterrupt:
        print("error: export stopped; nothing was written", file=sys.stderr, flush=True)
        return 130
    print(f"run {run.id}: {run.status} ({run.folder})")
    return 0


def cmd_demo(args) -> int:
    from .demo import demo_recipe
    from .stages import run_train

    recipe = demo_recipe(quick=args.quick)
    ws = _workspace(args)
    print(f"Workspace: {ws.root}\nRecipe:\n{recipe_to_yaml(recipe)}")
    run = run_train(recipe, ws)
    print(f"\nrun {run.id}: {run.status}; summary in {run.path('summary.json')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workspace", "-w", default=None,
                        help="workspace folder (default: $WORKBENCH_HOME or ./workspace)")
    parser = argparse.ArgumentParser(prog="workbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", parents=[common], help="run a YAML recipe")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.max_steps=50")
    resolver.add_policy_arguments(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("resume", parents=[common], help="continue an interrupted run")
    p.add_argument("run")
    resolver.add_policy_arguments(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("runs", parents=[common], help="list runs")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("show", parents=[common], help="show one run")
    p.add_argument("run")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("eval", parents=[common],
                       help="evaluate a model or adapter (gain and forgetting against its base)")
    p.add_argument("model", help="default | model folder | adapter folder | run:<id> | hub id")
    p.add_argument("--base", default=None, help="compare against this model (default: the adapter's base)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-questions", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.set_defaults(func=cmd_eval)

    from .exporting import DEFAULT_MAX_SHARD_MB, FORMATS

    p = sub.add_parser("export", parents=[common],
                       help="export a finished run into <workspace>/exports/NAME (model, adapter, "
                            "compressed-tensors or dequantized folder)")
    p.add_argument("source", metavar="SOURCE", help="the run to export: run id, unique prefix or run:<id>")
    p.add_argument("--format", required=True, choices=list(FORMATS),
                   help="model: sharded safetensors (an adapter merged into its base); adapter: the "
                        "adapter folder; compressed-tensors / dequantized: a quantize run's folders")
    p.add_argument("--name", required=True, help="the folder under exports/ (never overwritten)")
    p.add_argument("--max-shard-mb", type=int, default=DEFAULT_MAX_SHARD_MB,
                   help=f"largest shard in MB (default {DEFAULT_MAX_SHARD_MB})")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # the job queue's worker marker
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", parents=[common],
                       help="build the embedded base if needed, train a LoRA domain adapter, report")
    p.add_argument("--quick", action="store_true", help="a shorter run (about a minute on 2 cores)")
    p.set_defaults(func=cmd_demo)

    # `workbench app ...` is handed to the app's own parser in main(); listed here for --help
    sub.add_parser("app", add_help=False,
                   help="the browser UI (options as for app.py: see `workbench app --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["app"]:
        from .ui.launch import main as app_main

        return app_main(argv[1:], prog="workbench app")
    args = build_parser().parse_args(argv)
    try:
        with resolver.installed(resolver.policy_from_arguments(args, _workspace(args).root)):
            return args.func(args)
    except KeyboardInterrupt:
        print("\nstopped. Resume with: workbench resume <run-id> (see `workbench runs`)", file=sys.stderr)
        return 130
    except (RecipeError, ValueError, LookupError, OSError, RuntimeError) as err:
        if os.environ.get("WORKBENCH_DEBUG"):
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, (RecipeError, LookupError)) else 1


if __name__ == "__main__":
    sys.exit(main())
