"""EMOMC: two-stage pruning + quantization co-optimisation on the NEMO search engine.

* Stage I (``library.py``, ``nemo-jax prune-library``): a library of pruned and
  retrained models, one orbax checkpoint per keep ratio p.
* Stage II (``problem.py``): a search config with ``library=DIR`` searches
  ``[p, q_1..q_L]`` (p from the library, per-layer weight bits, FP16 activations) with
  the engine's NSGA-II or NEMO's species; ``nemo-jax search --config
  experiments/configs/emomc_default.py``.
* Report (``report.py``, ``nemo-jax emomc-report RUN_DIR``): EMOMC's table of energy
  improvement per dataflow and size compression per coding at <= 0.5% accuracy loss,
  next to pruning-only and quantization-only baselines.

This module stays import-light (the CLI imports it to register its commands); the
submodules import JAX.
"""

from __future__ import annotations


def load_library_config(path: str) -> dict:
  """Stage-I settings from a ``.py`` file's ``get_library_config()`` or a ``.json`` file."""
  from nemo_jax._src.search.config import load_config_file
  return dict(load_config_file(path, function="get_library_config"))


def _prune_library(args) -> int:
  from nemo_jax._src.emomc import library
  kwargs = {}
  if args.config:
    kwargs = load_library_config(args.config)
  cli = {"model_name": args.model, "checkpoint": args.checkpoint, "dataset": args.dataset,
         "data_dir": args.data_dir, "out_dir": args.out, "steps": args.steps,
         "epochs_per_step": args.epochs_per_step, "steps_per_stage": args.steps_per_stage,
         "schedule": args.schedule, "batch_size": args.batch_size,
         "learning_rate": args.learning_rate, "eval_max_images": args.eval_max_images,
         "train_max_images": args.train_max_images, "seed": args.seed}
  kwargs.update({k: v for k, v in cli.items() if v is not None})
  import inspect
  allowed = (set(inspect.signature(library.build_library_for).parameters)
             | set(inspect.signature(library.build_library).parameters) | {"keep_range"})
  allowed -= {"kwargs", "model", "variables", "progress"}
  unknown = sorted(set(kwargs) - allowed)
  if unknown:
    raise ValueError(f"library config: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
  if args.keep_range is not None:
    kwargs["keep_ratios"] = library.parse_keep_range(args.keep_range)
  elif "keep_range" in kwargs:
    kwargs["keep_ratios"] = library.parse_keep_range(kwargs.pop("keep_range"))
  kwargs.pop("keep_range", None)
  if "keep_ratios" not in kwargs:
    raise ValueError("--keep-range is required (e.g. 0.2:0.8:0.01), or keep_ratios / "
                     "keep_range in --config")
  if "out_dir" not in kwargs:
    raise ValueError("--out DIR is required (the library directory)")
  if "model_name" not in kwargs:
    raise ValueError("MODEL is required (e.g. resnet20), or model_name in --config")
  if args.input_shape:
    from nemo_jax.cli import _shape
    kwargs["input_shape"] = _shape(args.input_shape)
  if args.num_classes is not None:
    kwargs["num_classes"] = args.num_classes
  meta = library.build_library_for(progress=not args.quiet, **kwargs)
  print(library.library_table(meta))
  print(f"\nbuilt {len(meta['built'])} ratio(s), skipped {len(meta['skipped'])} finished; "
        f"library in {kwargs['out_dir']}/ ({library.LIBRARY_FILE})")
  return 0


def _emomc_report(args) -> int:
  from nemo_jax._src.emomc import report
  table = report.emomc_report(args.run_dir, quant_run=args.quant_run, max_loss=args.max_loss,
                              criterion=args.criterion, out_dir=args.out,
                              progress=not args.quiet)
  print(report.format_table(table))
  print(f"\nwrote {args.out or args.run_dir}/{report.TABLE_JSON} and {report.TABLE_CSV}")
  return 0


def add_cli_commands(subparsers) -> None:
  """Registers ``prune-library`` and ``emomc-report`` on the ``nemo-jax`` parser."""
  p = subparsers.add_parser(
      "prune-library", help="EMOMC stage I: build a library of pruned + retrained models")
  p.add_argument("model", nargs="?", help="zoo model name (e.g. resnet20)")
  p.add_argument("--keep-range", help="START:STOP:STEP keep ratios (STOP included), e.g. "
                 "0.2:0.8:0.01, or a list 0.3,0.5")
  p.add_argument("--out", help="library directory (an existing one is resumed)")
  p.add_argument("--config", help="a .py file with get_library_config() (or .json)")
  p.add_argument("--checkpoint", help="'default' or a variables file (.msgpack)")
  p.add_argument("--dataset")
  p.add_argument("--data-dir")
  p.add_argument("--input-shape", help="H,W,C")
  p.add_argument("--num-classes", type=int)
  p.add_argument("--steps", type=int, help="pruning steps per ratio (EMOMC: 32)")
  p.add_argument("--epochs-per-step", type=float, help="retraining epochs per step (EMOMC: 1)")
  p.add_argument("--steps-per-stage", type=int,
                 help="optimizer steps per pruning step (overrides --epochs-per-step)")
  p.add_argument("--schedule", help="independent (EMOMC) or chain")
  p.add_argument("--batch-size", type=int)
  p.add_argument("--learning-rate", type=float)
  p.add_argument("--eval-max-images", type=int)
  p.add_argument("--train-max-images", type=int)
  p.add_argument("--seed", type=int)
  p.add_argument("--quiet", action="store_true")
  p.set_defaults(func=_prune_library)

  r = subparsers.add_parser("emomc-report",
                            help="EMOMC table (energy / size improvement at <= 0.5%% loss)")
  r.add_argument("run_dir", help="a finished `nemo-jax search` directory of a library search")
  r.add_argument("--quant-run", help="a quantization-only run (keep_choices=[1.0])")
  r.add_argument("--max-loss", type=float, default=0.005, help="fraction (default 0.005)")
  r.add_argument("--criterion", help="cost to minimise among admissible members")
  r.add_argument("--out", help="output directory (default: RUN_DIR)")
  r.add_argument("--quiet", action="store_true")
  r.set_defaults(func=_emomc_report)


__all__ = ["add_cli_commands"]
