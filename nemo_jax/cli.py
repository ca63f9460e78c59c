"""The ``nemo-jax`` command line.

Every subcommand validates its input first; a ValueError is printed as one line
(``error: ...``) without a traceback and the exit status is 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _shape(text: str) -> tuple[int, int, int]:
  try:
    parts = tuple(int(p) for p in text.split(","))
  except ValueError:
    raise ValueError(f"--input-shape {text!r}: expected H,W,C integers, e.g. 28,28,1") from None
  if len(parts) != 3 or min(parts) < 1:
    raise ValueError(f"--input-shape {text!r}: expected three positive integers H,W,C")
  return parts


def _model_spec(args):
  from nemo_jax._src import models
  if args.model not in models.list_models():
    raise ValueError(f"model {args.model!r} is unknown; allowed: {models.list_models()}")
  default_shape = (models.DEFAULT_INPUT_SHAPE if args.model == models.DEFAULT_MODEL
                   else (224, 224, 3) if args.model in ("mobilenet_v2", "resnet18", "resnet50",
                                                        "resnext101_32x8d") else (32, 32, 3))
  shape = _shape(args.input_shape) if args.input_shape else default_shape
  classes = args.num_classes if args.num_classes is not None else (
      10 if shape[0] <= 64 else 1000)
  return shape, classes


def cmd_train(args) -> int:
  from nemo_jax._src import train
  from nemo_jax._src.search.config import load_config_file
  d = dict(load_config_file(args.config)) if args.config else {}
  if args.epochs is not None:
    d["epochs"] = args.epochs
  if args.seed is not None:
    d["seed"] = args.seed
  cfg = train.TrainConfig.from_dict(d)
  _, variables, metrics = train.train(cfg, progress=not args.quiet)
  if args.out:
    train.save_trained(args.out, cfg, variables, metrics)
  print(json.dumps({**metrics, "checkpoint": args.out}, indent=1))
  return 0


def cmd_convert(args) -> int:
  from nemo_jax._src import convert
  shape = _shape(args.input_shape) if args.input_shape else (224, 224, 3)
  out = args.out or os.path.splitext(args.checkpoint)[0] + ".msgpack"
  convert.convert_checkpoint(args.checkpoint, args.model, out, input_shape=shape,
                             num_classes=args.num_classes or 1000)
  print(json.dumps({"model": args.model, "input_shape": list(shape), "out": out}))
  return 0


def cmd_layers(args) -> int:
  from nemo_jax._src import workload
  shape, classes = _model_spec(args)
  wl = workload.extract_workload(args.model, shape, classes)
  print(json.dumps(workload.workload_to_json(wl), indent=1))
  return 0


def cmd_costs(args) -> int:
  from nemo_jax._src import config as config_lib
  from nemo_jax._src import costs, workload
  shape, classes = _model_spec(args)
  wl = workload.extract_workload(args.model, shape, classes)
  if (args.config is None) == (args.uniform is None):
    raise ValueError("costs: give exactly one of --config FILE or --uniform W,A")
  if args.config:
    spec, cfg = config_lib.load_config(args.config, wl.num_layers)
    if spec.get("model", args.model) != args.model:
      raise ValueError(f"--config is for model {spec['model']!r}, not {args.model!r}")
    if args.keep is not None:
      cfg = cfg.replace(keep=config_lib.check_keep(args.keep))
  else:
    try:
      w, a = (int(v) for v in args.uniform.split(","))
    except ValueError:
      raise ValueError(f"--uniform {args.uniform!r}: expected W,A integers, e.g. 8,8") from None
    d = {"w_bits": [w] * wl.num_layers, "a_bits": [a] * wl.num_layers,
         "keep": 1.0 if args.keep is None else args.keep}
    _, cfg = config_lib.config_from_dict(d, wl.num_layers, wl.layer_names)
  print(json.dumps(costs.cost_report(wl, cfg), indent=1))
  return 0


def cmd_search(args) -> int:
  from nemo_jax._src.search import report, run
  out = args.resume or args.out or "runs/default"
  result = run.search(args.config, out_dir=out, resume=args.resume is not None,
                      progress=not args.quiet, generations=args.generations,
                      population=args.population, seed=args.seed)
  print(report.front_table(result.front, result.config.objectives))
  print(f"\n{len(result.front)} configurations on the front; results in {out}/ "
        f"(front.json, history.csv, front.png, species.png)")
  return 0


def cmd_report(args) -> int:
  from nemo_jax._src.search import report
  print(report.redraw(args.dir))
  print(f"\nredrew {args.dir}/front.png and {args.dir}/species.png")
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="nemo-jax", description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="command", required=True)

  t = sub.add_parser("train", help="train a zoo model in float (default: the shipped default model)")
  t.add_argument("--config", help="experiments/configs/train_*.py (get_config()) or .json")
  t.add_argument("--out", help="checkpoint path (.msgpack); a .json sidecar is written next to it")
  t.add_argument("--epochs", type=int)
  t.add_argument("--seed", type=int)
  t.add_argument("--quiet", action="store_true")
  t.set_defaults(func=cmd_train)

  c = sub.add_parser("convert", help="convert a torchvision .pth state_dict to flax variables")
  c.add_argument("checkpoint")
  c.add_argument("--model", required=True)
  c.add_argument("--out")
  c.add_argument("--input-shape")
  c.add_argument("--num-classes", type=int)
  c.set_defaults(func=cmd_convert)

  for name, fn, text in (("layers", cmd_layers, "print a model's quantizer workload as JSON"),
                         ("costs", cmd_costs, "print the costs of a configuration as JSON")):
    s = sub.add_parser(name, help=text)
    s.add_argument("model")
    s.add_argument("--input-shape", help="H,W,C")
    s.add_argument("--num-classes", type=int)
    if name == "costs":
      s.add_argument("--config", help="precision config JSON")
      s.add_argument("--uniform", help="W,A: the same bits everywhere")
      s.add_argument("--keep", type=float)
    s.set_defaults(func=fn)

  s = sub.add_parser("search", help="run a NEMO search (no --config: the embedded default)")
  s.add_argument("--config", help="experiments/configs/*.py or .json")
  s.add_argument("--out", help="output directory (default runs/default)")
  s.add_argument("--generations", type=int)
  s.add_argument("--population", type=int)
  s.add_argument("--seed", type=int)
  s.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
  s.add_argument("--quiet", action="store_true")
  s.set_defaults(func=cmd_search)

  r = sub.add_parser("report", help="redraw the plots of a search directory and print its front")
  r.add_argument("dir")
  r.set_defaults(func=cmd_report)

  from nemo_jax._src.emomc import add_cli_commands  # prune-library, emomc-report
  add_cli_commands(sub)
  return p


def enable_compilation_cache() -> str:
  """Persistent XLA cache (a second run skips most compilation); results are identical."""
  import jax
  path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "nemo_jax", "xla")
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return path


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  enable_compilation_cache()
  try:
    return args.func(args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
