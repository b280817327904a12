"""The `jaxprune` command.

    jaxprune demo                       # the quick start's main job (see `jaxprune.demo`)
    jaxprune train --config experiments/base_vgg_small.py --workdir workdirs/vgg_small
    jaxprune data prepare               # prepare Fashion-MNIST from the Debian package, once
    jaxprune prune --method iterative --criterion taylor --target-flops 0.5 --workdir w
    jaxprune graph --model resnet20     # the prunable channel groups of a zoo model
    jaxprune score                      # criterion quality vs the oracle (Molchanov's Table 1)

Every long job writes to a workdir and resumes from it when run again with the same command.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxprune.runtime import enable_compilation_cache


def load_config(path: str | Path) -> Any:
    """Loads `get_config()` from a config file (one per experiment, as in experiments/)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: config file {path} does not exist.")
    spec = importlib.util.spec_from_file_location(f"jaxprune_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise SystemExit(f"error: {path} has no get_config() function.")
    return module.get_config()


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """Applies ``a.b=value`` overrides to a (nested, frozen) dataclass config.

    Values are Python literals (``0.1``, ``(1, 2)``, ``None``, ``True``) or plain strings.
    """
    for item in overrides:
        if "=" not in item:
            raise SystemExit(f"error: override {item!r} must look like key=value (e.g. epochs=3).")
        key, raw = item.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        config = _replace_path(config, key.split("."), value, key)
    return config


def _replace_path(obj: Any, keys: list[str], value: Any, full: str) -> Any:
    names = [f.name for f in dataclasses.fields(obj)]
    if keys[0] not in names:
        raise SystemExit(
            f"error: {full!r}: {type(obj).__name__} has no field {keys[0]!r}; fields are {names}."
        )
    if len(keys) > 1:
        value = _replace_path(getattr(obj, keys[0]), keys[1:], value, full)
    return dataclasses.replace(obj, **{keys[0]: value})


def cmd_train(args: argparse.Namespace) -> int:
    from jaxprune import train_job

    config = load_config(args.config) if args.config else train_job.TrainConfig()
    config = apply_overrides(config, args.set or [])
    workdir = Path(args.workdir)
    result = train_job.train_and_evaluate(config, workdir)
    print(json.dumps(result, indent=2, default=float))
    if args.export:
        path = train_job.export_latest(workdir, args.export, meta={"result": result})
        print(f"exported the trained model to {path}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from jaxprune import data

    path = data.prepare(args.name, data_dir=args.data_dir, source_dir=args.source_dir)
    print(f"{args.name} is prepared in {path}")
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from jaxprune.graph import channel_graph
    from jaxprune.models import build_model

    model = build_model(args.model, args.num_classes)
    shape = tuple(int(s) for s in args.input_shape.split(","))
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    graph = channel_graph(model.apply, variables, x)
    print(graph.summary())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from jaxprune import demo

    config = demo.DemoConfig(**{k: v for k, v in vars(args).items() if k in demo.FIELDS})
    demo.run(config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxprune", description="Structured kernel pruning of CNNs in JAX/Flax."
    )
    parser.add_argument(
        "--no-compilation-cache",
        action="store_true",
        help="do not use JAX's persistent compilation cache (~/.cache/jaxprune/xla)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="prepare data, get the base model, prune it, report")
    _add_demo_arguments(demo)
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="train a zoo model (resumes from its workdir)")
    train.add_argument("--config", help="a config file with get_config() (see experiments/)")
    train.add_argument("--workdir", required=True, help="checkpoints and metrics.jsonl go here")
    train.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set epochs=3 --set optimizer.learning_rate=0.05",
    )
    train.add_argument("--export", metavar="FILE", help="also write the final model to FILE")
    train.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prepare = data_sub.add_parser("prepare", help="prepare a dataset for offline use")
    prepare.add_argument("name", nargs="?", default="fashion_mnist")
    prepare.add_argument("--data-dir", help="prepared TFDS data (default ~/.cache/jaxprune)")
    prepare.add_argument("--source-dir", help="Fashion-MNIST idx files (default: Debian's)")
    prepare.set_defaults(func=cmd_data_prepare)

    from jaxprune.commands import prune as prune_command
    from jaxprune.criteria.report import add_score_command

    prune_command.add_command(sub)
    add_score_command(sub)
    importlib.import_module("jaxprune.commands.inspect").add_command(sub)

    graph = sub.add_parser("graph", help="print the prunable channel groups of a zoo model")
    graph.add_argument("--model", default="vgg_small")
    graph.add_argument("--num-classes", type=int, default=10)
    graph.add_argument("--input-shape", default="28,28,1", help="H,W,C of one image")
    graph.set_defaults(func=cmd_graph)
    return parser


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxprune import demo

    for field in dataclasses.fields(demo.DemoConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        kind = type(default) if default is not None else str
        if kind is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=demo.HELP.get(field.name),
            )
        else:
            parser.add_argument(flag, type=kind, default=default, help=demo.HELP.get(field.name))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.no_compilation_cache:
        enable_compilation_cache()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
