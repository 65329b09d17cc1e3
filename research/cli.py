"""``research`` command line (also ``python -m research``).

  research train    --config experiments/configs/NAME.py --workdir DIR [--config.x=y ...]
  research generate --workdir DIR --split test --out FILE.jsonl [--config.sampling.x=y ...]
  research generate --workdir DIR --text "conditioning text"   (or --user U --item I)
  research evaluate --workdir DIR --split test [--config.x=y ...]
  research export   --workdir DIR --out FOLDER [--checkpoint best|latest] [--force] [--adapters]
  research ablate   --config experiments/configs/ablation_NAME.py --workdir DIR
                    [--seeds 0,1,2] [--axis model.conditioning=none,prefix] [--dry-run]
  research samples  --workdir ABLATION_DIR [--n 10] [--seed 0] [--out FILE.md]
  research config   --config experiments/configs/NAME.py [--config.x=y ...]   (or --workdir DIR)
  research data stats --config experiments/configs/NAME.py
  research params   --config experiments/configs/NAME.py
  research bench    [--only NAME] [--weights-dtype DTYPE] [--json FILE [--append]] [--smoke]
  research demo     [--workdir DIR]

Each command's heavy imports happen inside it, so ``research --help`` answers at once.

Expected errors (a bad config, data file, pickle, model folder or checkpoint) print one line,
``error: ...`` naming the file, line or key, and exit 2; a diverged run exits 1. ``--debug``
anywhere on the command line (or ``RESEARCH_DEBUG=1``) shows their traceback instead;
unexpected errors always show theirs.
"""

from __future__ import annotations

import argparse
import os
import sys

OVERRIDES_HELP = (
    "Any config key can be overridden as --config.KEY=VALUE (e.g. --config.train.steps=50, "
    "--config.sampling.repetition_penalty=1.2); `research config` prints the result."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="research",
        description="Encoder-conditioned review generation (JAX/Flax).",
        epilog=OVERRIDES_HELP,
    )
    subparsers = parser.add_subparsers(dest="command", required=True)

    class _Sub:
        """``add_parser`` that puts the overrides note under every subcommand's --help."""

        def add_parser(self, name, **kwargs):
            kwargs.setdefault("description", kwargs.get("help"))
            return subparsers.add_parser(name, epilog=OVERRIDES_HELP, **kwargs)

    sub = _Sub()

    p = sub.add_parser("train", help="train (or resume) a run in a workdir")
    p.add_argument("--config", required=True, help="experiments/configs/NAME.py")
    p.add_argument("--workdir", required=True)

    p = sub.add_parser("generate", help="write generated reviews for a split, or for one text")
    p.add_argument("--workdir", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--out", help="JSON lines output file (one object per input)")
    p.add_argument(
        "--text",
        help="generate for this one encoder text instead of a split (its trained "
        "format is printed first)",
    )
    p.add_argument(
        "--user",
        default="",
        help="a user id: without --text, the input is built from the "
        "run's training histories of --user and --item; with it, the id for id methods",
    )
    p.add_argument("--item", default="", help="an item id (see --user)")

    p = sub.add_parser("evaluate", help="generate a split and compute the field's metrics")
    p.add_argument("--workdir", required=True)
    p.add_argument("--split", default="test")

    p = sub.add_parser("export", help="write a run as Hugging Face folders + conditioning file")
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True, help="export folder (research/export.py: its files)")
    p.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--adapters", action="store_true", help="LoRA adapters alone, in PEFT's layout")

    p = sub.add_parser("ablate", help="train and evaluate a grid of settings x seeds")
    p.add_argument("--config", required=True, help="experiments/configs/ablation_NAME.py")
    p.add_argument("--workdir", required=True, help="one folder per cell and seed goes here")
    p.add_argument("--seeds", help="comma-separated seeds, replacing the file's, e.g. 0,1,2")
    p.add_argument(
        "--axis",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a grid axis, replacing the file's axis of that key (repeatable), "
        "e.g. model.conditioning=none,prefix",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the runs and which are done; run nothing"
    )

    p = sub.add_parser("samples", help="an ablation's generated texts side by side (markdown)")
    p.add_argument("--workdir", required=True, help="the ablation folder (research ablate)")
    p.add_argument("--n", type=int, default=10, help="how many examples")
    p.add_argument("--split", default="test")
    p.add_argument("--seed", type=int, default=0, help="whose runs: DIR/<cell>/seed<SEED>")
    p.add_argument("--draw-seed", type=int, default=0, help="seed of the examples' draw")
    p.add_argument("--out", help="markdown file (default: WORKDIR/samples.md)")

    p = sub.add_parser("config", help="print the resolved config (file + overrides, or a run's)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--config", help="experiments/configs/NAME.py (default: the defaults)")
    source.add_argument("--workdir", help="a run's folder: print the config saved in run.json")

    p = sub.add_parser("data", help="data utilities")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    stats = data_sub.add_parser(
        "stats", help="users, items, split sizes, lengths, bad rows", epilog=OVERRIDES_HELP
    )
    stats.add_argument("--config", default=None)

    p = sub.add_parser("params", help="print the parameter summary of a config's model")
    p.add_argument("--config", default=None)

    p = sub.add_parser("bench", help="speed benchmarks side by side with PyTorch")
    p.add_argument("--only", action="append", help="run only this measurement (repeatable)")
    p.add_argument("--json", help="write JSON lines here (replacing the file's)")
    p.add_argument("--append", action="store_true", help="add to the --json file's lines")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: checks it runs, fast")
    p.add_argument(
        "--weights-dtype",
        action="append",
        help="generate rows only with these decoding weights (repeatable; default: all)",
    )

    p = sub.add_parser("demo", help="the README's main job on the synthetic corpus")
    p.add_argument("--workdir", default="runs/demo")
    return parser


BAD_INPUT, DIVERGED = 2, 1  # exit codes of expected errors


def main(argv: list[str] | None = None) -> int:
    """The command ``argv`` (default: this process's own command line, which may start the
    process again with malloc's huge pages on: research/allocator.py)."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("RESEARCH_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        # Not for `bench`: it times us and PyTorch in one process, where huge pages slowed our
        # step and sped PyTorch's up (experiments/bench/README.md); it measures glibc's default.
        if from_command_line and argv[:1] != ["bench"]:
            from research.allocator import restart_with_hugepages

            restart_with_hugepages()  # glibc reads it at start-up only
        from research.config import split_overrides

        rest, overrides = split_overrides(argv)
        args = _parser().parse_args(rest)
        _check_text(vars(args), overrides)
        return _dispatch(args, overrides, argv) or 0
    except Exception as err:
        code = _exit_code(err)
        if code is None or debug:
            raise
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return code


def _exit_code(err: Exception) -> int | None:
    """The exit code of an expected error (bad input: 2, a diverged run: 1), else None."""
    import gzip
    import pickle

    from research.config import ConfigError
    from research.data.loaders import BadRowError
    from research.errors import ExpectedError
    from research.models.hf import CheckpointError
    from research.train.step_metrics import TrainingDiverged

    if isinstance(err, ExpectedError):  # a busy workdir, a damaged checkpoint, ...
        return err.exit_code
    if isinstance(err, TrainingDiverged):
        return DIVERGED
    bad_input = (ConfigError, FileNotFoundError, FileExistsError, BadRowError, CheckpointError)
    broken_file = (pickle.UnpicklingError, EOFError, gzip.BadGzipFile, UnicodeDecodeError)
    return BAD_INPUT if isinstance(err, bad_input + broken_file) else None


def _check_text(options: dict, overrides: list[tuple[str, str]]) -> None:
    """Text that is not valid Unicode (argv holds undecodable bytes as lone surrogates) is
    refused here, naming the option, instead of failing deep inside a tokenizer."""
    from research.config import ConfigError

    named = [(f"--{k}", v) for k, v in options.items()] + [
        (f"--config.{k}", v) for k, v in overrides
    ]
    for name, value in named:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ConfigError(
                    f"{name} is not valid UTF-8 text (undecodable byte at character "
                    f"{err.start}); pass the text UTF-8 encoded"
                ) from None


def _dispatch(args, overrides, argv) -> int | None:
    from research.config import load_config

    if args.command == "train":
        from research.train.loop import train

        cfg = load_config(args.config, overrides)
        train(cfg, args.workdir, ["research", *argv])
    elif args.command == "generate":
        from research.eval.evaluate import generate_command

        return generate_command(args, overrides)
    elif args.command == "evaluate":
        from research.eval.evaluate import evaluate_run

        evaluate_run(args.workdir, args.split, overrides)
    elif args.command == "export":
        from research.export import export_run

        export_run(args.workdir, args.out, args.force, args.checkpoint, overrides, args.adapters)
    elif args.command == "ablate":
        from research.eval.ablate import run_ablation

        run_ablation(
            args.config,
            args.workdir,
            overrides,
            seeds=args.seeds,
            axes=args.axis,
            dry_run=args.dry_run,
            command=["research", *argv],
        )
    elif args.command == "samples":
        from research.eval.samples import write_samples

        options = {"n": args.n, "split": args.split, "seed": args.seed}
        out = write_samples(args.workdir, args.out, **options, draw_seed=args.draw_seed)
        print(f"Samples: {out}")
    elif args.command == "config":
        from research.config import flat_items

        if args.workdir:
            from research.eval.evaluate import run_config

            cfg = run_config(args.workdir, overrides)
        else:
            cfg = load_config(args.config, overrides)
        print("\n".join(f"{key}={value!r}" for key, value in flat_items(cfg)))
    elif args.command == "data":
        from research.data.stats import data_stats

        print(data_stats(load_config(args.config, overrides).data))
    elif args.command == "params":
        import jax

        from research.data.pipeline import load_dataset
        from research.models.build import build_generator
        from research.models.generator import parameter_summary

        cfg = load_config(args.config, overrides)
        dataset = load_dataset(cfg.data)
        _, params = build_generator(
            cfg, dataset.num_users, dataset.num_items, jax.random.key(0), dataset.rating_mean
        )
        print(parameter_summary(params, tuple(cfg.train.trainable)))
    elif args.command == "bench":
        from research.bench.run import run_bench

        run_bench(
            only=args.only,
            json_path=args.json,
            smoke=args.smoke,
            append=args.append,
            weights_dtypes=args.weights_dtype,
        )
    elif args.command == "demo":
        from research.demo import run_demo

        run_demo(args.workdir, overrides)
    return None


if __name__ == "__main__":
    sys.exit(main())
