"""The `jaxprune` command.

    jaxprune demo                       # the quick start's main job (see `jaxprune.demo`)
    jaxprune train --config experiments/base_vgg_small.py --workdir workdirs/vgg_small
    jaxprune data prepare               # prepare Fashion-MNIST from the Debian package, once
    jaxprune prune --method iterative --model vgg_small --workdir w --iterative.target-flops 0.5
    jaxprune prune --method oneshot --model my_models.py:make_cnn --workdir w --oneshot.ratio 0.5
    jaxprune graph --model my_models.py:make_cnn   # the prunable channel groups of a model
    jaxprune score                      # criterion quality vs the oracle (Molchanov's Table 1)

Every long job writes to a workdir and resumes from it when run again with the same command;
run with other settings, it is refused with the changed settings named. Errors are one line
(``--debug`` shows the traceback); Ctrl-C stops a job with its workdir ready to resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxprune.commands.config import DefaultsHelpFormatter, apply_overrides, load_config
from jaxprune.runtime import enable_compilation_cache, initialize_distributed

# Re-exported: configs and overrides as the command line reads them.
__all__ = ["apply_overrides", "build_parser", "load_config", "main"]


def cmd_train(args: argparse.Namespace) -> int:
    from jaxprune import train_job

    config = load_config(args.config) if args.config else train_job.TrainConfig()
    config = apply_overrides(config, args.set or [])
    if args.no_progress:
        config = dataclasses.replace(config, progress=False)
    config.check()
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
    from jaxprune.commands.model_spec import load_model
    from jaxprune.commands.shapes import data_shape
    from jaxprune.graph import channel_graph

    input_shape, num_classes = data_shape(args.dataset, args.input_shape, args.num_classes)
    loaded = load_model(
        args.model,
        input_shape=input_shape,
        num_classes=num_classes,
        dataset=args.dataset,
        variables_path=args.variables,
        need_trained=False,
    )
    model = loaded.model
    graph = channel_graph(
        model.apply_fn,
        loaded.variables,
        model.example_input,
        strict=not args.loose,
        **model.eval_kwargs,
    )
    print(graph.summary())
    return 0


def cmd_import_weights(args: argparse.Namespace) -> int:
    """Converts a pretrained VGG-16 weights file into a zoo model file (no download)."""
    from jaxprune import checkpoint
    from jaxprune.models import widths_from_params
    from jaxprune.models.imported import vgg16_from_keras, vgg16_from_safetensors

    source = Path(args.file)
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist; give the weights file you have.")
    suffix = source.suffix.lower()
    if suffix == ".safetensors":
        module, variables = vgg16_from_safetensors(source)
        kind = "PyTorch layout (torchvision or timm vgg16), safetensors"
    elif suffix in (".h5", ".hdf5"):
        module, variables = vgg16_from_keras(source)
        kind = "Keras VGG16 weights, HDF5"
    else:
        raise ValueError(
            f"{source.name}: give a .safetensors file (torchvision/timm vgg16) or a Keras .h5 "
            "weights file; other formats are not read."
        )
    input_shape = tuple(int(d) for d in args.input_shape.split(","))
    path = checkpoint.save_model_file(
        args.out,
        model_name="vgg16",
        num_classes=module.num_classes,
        widths=widths_from_params(variables["params"]),
        variables=variables,
        meta={"imported_from": str(source), "format": kind, "input_shape": list(input_shape)},
        input_shape=input_shape,
    )
    print(f"wrote {path}: vgg16, {module.num_classes} classes, from {source.name} ({kind})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from jaxprune import demo

    config = demo.DemoConfig(**{k: v for k, v in vars(args).items() if k in demo.FIELDS})
    demo.run(config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxprune",
        description="Structured kernel pruning of CNNs in JAX/Flax.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "--no-compilation-cache",
        action="store_true",
        help="do not use JAX's persistent compilation cache (~/.cache/jaxprune/xla)",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="join a run of several processes (hosts): run the same command in every process "
        "(jax.distributed; see the README's Devices section)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="prepare data, get the base model, prune it, report",
        formatter_class=DefaultsHelpFormatter,
    )
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
    train.add_argument(
        "--no-progress", action="store_true", help="no progress bar (e.g. in log files)"
    )
    train.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prepare = data_sub.add_parser("prepare", help="prepare a dataset for offline use")
    prepare.add_argument("name", nargs="?", default="fashion_mnist")
    prepare.add_argument("--data-dir", help="prepared TFDS data (default ~/.cache/jaxprune)")
    prepare.add_argument("--source-dir", help="Fashion-MNIST idx files (default: Debian's)")
    prepare.set_defaults(func=cmd_data_prepare)

    from jaxprune.commands import prune as prune_command
    from jaxprune.commands.model_spec import add_model_arguments
    from jaxprune.commands.score import add_score_command

    prune_command.add_command(sub)
    add_score_command(sub)
    weights = sub.add_parser(
        "import-weights",
        help="a pretrained VGG-16 (torchvision/timm .safetensors or Keras .h5) as a model file",
        formatter_class=DefaultsHelpFormatter,
    )
    weights.add_argument("file", help="the weights file you have (nothing is downloaded)")
    weights.add_argument("--out", required=True, help="the model file to write (.msgpack)")
    weights.add_argument("--input-shape", default="224,224,3", help="H,W,C of one image")
    weights.set_defaults(func=cmd_import_weights)
    importlib.import_module("jaxprune.commands.inspect").add_command(sub)

    graph = sub.add_parser(
        "graph",
        help="print the prunable channel groups of a model (zoo name or FILE.py:NAME)",
        formatter_class=DefaultsHelpFormatter,
    )
    add_model_arguments(graph)
    graph.add_argument("--input-shape", help="H,W,C of one image (default: the dataset's)")
    graph.add_argument("--num-classes", type=int, help="classes (default: the dataset's)")
    graph.add_argument(
        "--loose", action="store_true", help="leave unsupported channels unpruned (strict=False)"
    )
    graph.set_defaults(func=cmd_graph)
    return parser


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    import dataclasses

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
    """Runs the command; errors are one ``error:`` line on stderr (exit 1) unless ``--debug``."""
    args = build_parser().parse_args(argv)
    if args.distributed:
        initialize_distributed()
    if not args.no_compilation_cache:
        enable_compilation_cache()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        workdir = getattr(args, "workdir", None)
        kept = f"; {workdir} is kept: run the same command to resume" if workdir else ""
        print(f"interrupted{kept}.", file=sys.stderr)
        return 130
    except Exception as error:  # one line with the fix; the traceback only when asked
        if args.debug:
            raise
        message = str(error).strip() or type(error).__name__
        if not _is_ours(error):
            message = f"{type(error).__name__}: {message} (run with --debug for the traceback)"
        print(f"error: {message}", file=sys.stderr)
        return 1


def _is_ours(error: Exception) -> bool:
    """Errors whose message already names the problem and the fix."""
    from jaxprune.checkpoint import CheckpointError
    from jaxprune.commands.config import UsageError
    from jaxprune.fit import DivergenceError
    from jaxprune.graph import GraphError
    from jaxprune.surgery import PruneError

    return isinstance(
        error,
        UsageError
        | CheckpointError
        | DivergenceError
        | GraphError
        | PruneError
        | ValueError
        | FileNotFoundError,
    )


if __name__ == "__main__":
    sys.exit(main())
