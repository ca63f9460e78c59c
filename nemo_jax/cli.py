"""The ``nemo-jax`` command line: every subcommand, each a thin call into the public API.

Every subcommand validates its input first. A user's mistake (a bad value, a file that
cannot be read or written, a directory another process is writing, contradictory flags)
is printed as one line (``error: ...``) naming the field, flag or file and what is
allowed, without a traceback, and the exit status is 2; anything else is a bug in
nemo_jax: the traceback, one line saying so, exit status 1. A stop signal (SIGINT /
SIGTERM) ends a long job at its next checkpoint with one line saying how to resume and
the exit status 128 + signal (130 / 143); a second signal ends it at once (the last
complete checkpoint is intact). Warnings and errors that libraries log (orbax, absl,
jax) go to the run directory's ``nemo_jax.log``, not the terminal. Commands that write a
file refuse to replace an existing one unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import traceback
import warnings


def _shape(text: str) -> tuple[int, int, int]:
  try:
    parts = tuple(int(p) for p in text.split(","))
  except ValueError:
    raise ValueError(f"--input-shape {text!r}: expected H,W,C integers, e.g. 28,28,1") from None
  if len(parts) != 3 or min(parts) < 1:
    raise ValueError(f"--input-shape {text!r}: expected three positive integers H,W,C")
  return parts


def _model_spec(args) -> tuple[tuple[int, int, int], int]:
  from nemo_jax import models
  if args.num_classes is not None and args.num_classes < 1:
    raise ValueError(f"--num-classes {args.num_classes}: allowed: a positive integer")
  shape, classes = models.default_spec(args.model)
  if args.input_shape:
    shape = _shape(args.input_shape)
  return shape, args.num_classes if args.num_classes is not None else classes


def cmd_train(args) -> int:
  import nemo_jax
  from nemo_jax import models
  from nemo_jax._src import faults
  from nemo_jax._src.checkpoint import sidecar_path
  d = dict(nemo_jax.load_config_file(args.config)) if args.config else {}
  d.update({k: v for k, v in (("epochs", args.epochs), ("seed", args.seed)) if v is not None})
  cfg = models.TrainConfig.from_dict(d)
  if args.out is not None:
    # Before minutes of training: the checkpoint and its sidecar can be written and
    # replace nothing unasked.
    faults.check_output_file(args.out, args.overwrite, "--out",
                             extra=(sidecar_path(args.out),))
  _, variables, metrics = models.train(cfg, progress=not args.quiet)
  if args.out:
    models.save_trained(args.out, cfg, variables, metrics)
  print(json.dumps({**metrics, "checkpoint": args.out}, indent=1))
  return 0


def cmd_convert(args) -> int:
  from nemo_jax import models
  shape = _shape(args.input_shape) if args.input_shape else (224, 224, 3)
  if args.num_classes is not None and args.num_classes < 1:
    raise ValueError(f"--num-classes {args.num_classes}: allowed: a positive integer "
                     "(or none: read from the checkpoint's classifier)")
  out = args.out if args.out is not None else os.path.splitext(args.checkpoint)[0] + ".msgpack"
  if os.path.abspath(out) == os.path.abspath(args.checkpoint):
    raise ValueError(f"--out {out!r} is the input checkpoint; allowed: another file")
  models.convert_checkpoint(args.checkpoint, args.model, out, input_shape=shape,
                            num_classes=args.num_classes, overwrite=args.overwrite)
  print(json.dumps({"model": args.model, "input_shape": list(shape), "out": out}))
  return 0


def _factory_workload(args):
  """The workload of a factory ``MODULE:ATTR`` / ``FILE.py:ATTR`` (your own linen or NNX
  model)."""
  from nemo_jax import costs
  from nemo_jax import models
  from nemo_jax._src.intercept import check_runs_on
  if not args.input_shape:
    raise ValueError(f"--input-shape: required for the factory model {args.model!r} "
                     "(expected H,W,C)")
  shape = _shape(args.input_shape)
  model, variables = models.quantizable(*models.load_model_factory(args.model))
  check_runs_on(model, variables, shape, f"model {args.model!r} with --input-shape")
  models.check_intercepted(model, variables, shape)
  return costs.extract_workload(model, shape, args.num_classes, args.placement)


def cmd_layers(args) -> int:
  from nemo_jax import costs
  if ":" in args.model:
    wl = _factory_workload(args)
  else:
    shape, classes = _model_spec(args)
    wl = costs.extract_workload(args.model, shape, classes, args.placement)
  print(json.dumps(costs.workload_to_json(wl), indent=1))
  return 0


def cmd_costs(args) -> int:
  import nemo_jax
  from nemo_jax import costs
  if (args.config is None) == (args.uniform is None):
    raise ValueError("costs: give exactly one of --config FILE or --uniform W,A")
  shape, classes = _model_spec(args)
  if args.config:
    d = dict(nemo_jax.load_config_file(args.config))
    if d.get("model", args.model) != args.model:
      raise ValueError(f"--config is for model {d['model']!r}, not {args.model!r}")
    d.setdefault("placement", args.placement)
    wl = costs.extract_workload(args.model, shape, classes, d["placement"])
  else:
    try:
      w, a = (int(v) for v in args.uniform.split(","))
    except ValueError:
      raise ValueError(f"--uniform {args.uniform!r}: expected W,A integers, e.g. 8,8") from None
    wl = costs.extract_workload(args.model, shape, classes, args.placement)
    d = {"w_bits": [w] * wl.num_layers, "a_bits": [a] * wl.num_act_quantizers}
  if args.keep is not None:
    d["keep"] = args.keep
  d.pop("model", None)
  d.pop("input_shape", None)
  d.pop("num_classes", None)
  _, cfg = nemo_jax.config_from_dict(d, wl)
  print(json.dumps(costs.cost_report(wl, cfg), indent=1))
  return 0


def cmd_search(args) -> int:
  import nemo_jax
  for flag, value in (("--out", args.out), ("--resume", args.resume)):
    if value is not None and not value.strip():
      raise ValueError(f"{flag} {value!r}: allowed: a directory path")
  if args.resume is not None:
    if args.overwrite:
      raise ValueError("--resume and --overwrite contradict each other (--resume continues "
                       "the run in DIR, --overwrite replaces a run); allowed: one of them")
    if args.out is not None and os.path.realpath(args.out) != os.path.realpath(args.resume):
      raise ValueError(f"--resume {args.resume!r} and --out {args.out!r} contradict each "
                       "other (a resumed run writes into its own directory); allowed: "
                       "--resume DIR alone, or --out DIR for a new run")
  out = args.resume or args.out or "runs/default"
  result = nemo_jax.search(args.config, out_dir=out, resume=args.resume is not None,
                           progress=not args.quiet, overwrite=args.overwrite,
                           generations=args.generations,
                           population=args.population, seed=args.seed)
  print(nemo_jax.front_table(result.front, result.config.objectives))
  print()
  for line in nemo_jax.quality_summary(result.quality):
    print(line)
  t = result.timing
  print(f"{len(result.front)} configurations on the front in {t.get('total_seconds', 0):.0f} s "
        f"(search {t.get('search_seconds', 0):.0f} s, final phase "
        f"{t.get('final_seconds', 0):.0f} s); results in {out}/: front.json, uniform.json, "
        "history.csv, config.json (timing, quality), front.png, species.png")
  return 0


def cmd_sensitivity(args) -> int:
  import nemo_jax
  from nemo_jax._src.run import sensitivity as sens_lib
  table = nemo_jax.sensitivity(args.config, out_dir=args.out, base_bits=args.base_bits,
                               progress=not args.quiet)
  print(sens_lib.format_table(table))
  if args.out:
    print(f"\nwrote {args.out}/{sens_lib.SENSITIVITY_FILE} and {sens_lib.SENSITIVITY_PLOT}")
  return 0


def cmd_report(args) -> int:
  from nemo_jax._src.run.report import redraw_files
  table, drawn = redraw_files(args.dir)
  print(table)
  print("\nredrew " + " and ".join(drawn) if drawn else
        f"\nnothing to draw (the front and the history of {args.dir} are empty)")
  return 0


def cmd_prune_library(args) -> int:
  import nemo_jax
  from nemo_jax import emomc
  d = dict(nemo_jax.load_config_file(args.config, function="get_library_config")
           ) if args.config else {}
  cfg = emomc.library_config(
      d, model=args.model, keep_range=args.keep_range, out_dir=args.out,
      checkpoint=args.checkpoint, dataset=args.dataset, data_dir=args.data_dir,
      input_shape=_shape(args.input_shape) if args.input_shape else None,
      num_classes=args.num_classes, steps=args.steps, epochs_per_step=args.epochs_per_step,
      steps_per_stage=args.steps_per_stage, schedule=args.schedule,
      batch_size=args.batch_size, learning_rate=args.learning_rate,
      eval_max_images=args.eval_max_images, train_max_images=args.train_max_images,
      seed=args.seed)
  meta = emomc.build_library(cfg, progress=not args.quiet)
  print(emomc.library_table(meta))
  print(f"\nbuilt {len(meta['built'])} ratio(s), skipped {len(meta['skipped'])} finished; "
        f"library in {cfg.out_dir}/ ({emomc.LIBRARY_FILE})")
  return 0


def cmd_emomc_report(args) -> int:
  from nemo_jax import emomc
  table = emomc.emomc_report(args.run_dir, quant_run=args.quant_run, max_loss=args.max_loss,
                             criterion=args.criterion, out_dir=args.out,
                             progress=not args.quiet, overwrite=args.overwrite)
  print(emomc.format_table(table))
  print(f"\nwrote {args.out or args.run_dir}/{emomc.TABLE_JSON} and {emomc.TABLE_CSV}")
  return 0


def cmd_export(args) -> int:
  from nemo_jax import export
  info = export.export_member(args.run_dir, args.member, format=args.format, out=args.out,
                              overwrite=args.overwrite)
  sizes = info["sizes"]
  print(json.dumps({"out": info["out"], "precision": info["out"] + ".json",
                    "format": args.format, "member": args.member,
                    "model_bits": sizes["model_bits"], "model_bytes": sizes["model_bytes"],
                    "packed_weight_bytes": sizes["packed_weight_bytes"],
                    "file_bytes": os.path.getsize(info["out"])}, indent=1))
  return 0


def cmd_finetune(args) -> int:
  import nemo_jax
  from nemo_jax._src.finetune import parse_members
  members = parse_members(args.members)
  settings = {"learning_rate": args.learning_rate, "batch_size": args.batch_size,
              "optimizer": args.optimizer, "max_images": args.max_images}
  entries = nemo_jax.finetune_members(args.run_dir, members, epochs=args.epochs,
                                      config=settings, progress=not args.quiet)
  print(json.dumps([{"member": e["member"], "epochs": e["epochs"],
                     **{f"{split}_top1": [e[split]["before"]["top1"], e[split]["after"]["top1"]]
                        for split in ("train", "fitness", "final") if split in e},
                     "variables": e["variables"]} for e in entries], indent=1))
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="nemo-jax", description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="command", required=True)

  t = sub.add_parser("train", help="train a zoo model in float (default: the shipped default model)")
  t.add_argument("--config", help="experiments/configs/train_*.py (get_config()) or .json")
  t.add_argument("--out", help="checkpoint path (.msgpack); a .json sidecar is written next to it")
  t.add_argument("--epochs", type=int)
  t.add_argument("--seed", type=int)
  t.add_argument("--overwrite", action="store_true",
                 help="replace an existing --out file and its .json (default: refuse)")
  t.add_argument("--quiet", action="store_true")
  t.set_defaults(func=cmd_train)

  c = sub.add_parser("convert", help="convert a torchvision .pth state_dict to flax variables")
  c.add_argument("checkpoint")
  c.add_argument("--model", required=True)
  c.add_argument("--out", help="variables file (default: CHECKPOINT with .msgpack); a .json "
                 "with its metadata is written next to it")
  c.add_argument("--input-shape")
  c.add_argument("--num-classes", type=int)
  c.add_argument("--overwrite", action="store_true",
                 help="replace an existing --out file and its .json (default: refuse)")
  c.set_defaults(func=cmd_convert)

  for name, fn, text in (("layers", cmd_layers, "print a model's quantizer workload as JSON"),
                         ("costs", cmd_costs, "print the costs of a configuration as JSON")):
    s = sub.add_parser(name, help=text)
    s.add_argument("model", help="zoo name" + (", or your own model's factory MODULE:ATTR / "
                                              "FILE.py:ATTR (with --input-shape)"
                                              if name == "layers" else ""))
    s.add_argument("--input-shape", help="H,W,C")
    s.add_argument("--num-classes", type=int)
    s.add_argument("--placement", default="conv_inputs", choices=("conv_inputs", "nncf"),
                   help="where activation quantizers sit (default conv_inputs)")
    if name == "costs":
      s.add_argument("--config", help="precision config JSON")
      s.add_argument("--uniform", help="W,A: the same bits everywhere")
      s.add_argument("--keep", type=float)
    s.set_defaults(func=fn)

  s = sub.add_parser("search", help="run a NEMO search (no --config: the embedded default)")
  s.add_argument("--config", help="experiments/configs/*.py[:VARIANT] or .json")
  s.add_argument("--out", help="output directory (default runs/default)")
  s.add_argument("--generations", type=int)
  s.add_argument("--population", type=int)
  s.add_argument("--seed", type=int)
  s.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
  s.add_argument("--overwrite", action="store_true",
                 help="replace a previous run in --out (default: refuse)")
  s.add_argument("--quiet", action="store_true")
  s.set_defaults(func=cmd_search)

  x = sub.add_parser("export", help="write one front member as packed integers (.npz) or "
                     "an ONNX QDQ model, with its precision JSON")
  x.add_argument("run_dir", help="a finished `nemo-jax search` directory")
  x.add_argument("--member", type=int, required=True, help="index into RUN_DIR/front.json")
  x.add_argument("--format", default="npz", help="npz (default) or onnx")
  x.add_argument("--out", help="output file (default RUN_DIR/member_K.FORMAT); FILE.json "
                 "gets the precision JSON")
  x.add_argument("--overwrite", action="store_true",
                 help="replace an existing output file and its .json (default: refuse)")
  x.set_defaults(func=cmd_export)

  ft = sub.add_parser("finetune", help="quantization-aware fine-tuning of front members "
                      "(writes RUN_DIR/finetuned.json, RUN_DIR/finetune/K/)")
  ft.add_argument("run_dir", help="a finished `nemo-jax search` directory")
  ft.add_argument("--members", required=True, help="indices into RUN_DIR/front.json, e.g. 0,3")
  ft.add_argument("--epochs", type=int, help="epochs per member (default 1; a re-run "
                  "continues a member's checkpoint with its saved settings)")
  ft.add_argument("--learning-rate", type=float, help="default 1e-4")
  ft.add_argument("--batch-size", type=int, help="default 64")
  ft.add_argument("--optimizer", help="adam (default) or sgd (momentum 0.9)")
  ft.add_argument("--max-images", type=int, help="a stratified subset of the training split")
  ft.add_argument("--quiet", action="store_true")
  ft.set_defaults(func=cmd_finetune)

  sv = sub.add_parser("sensitivity", help="top-1 drop of every quantizer alone at every "
                      "bit-width (the rest at --base-bits); JSON + heat map with --out")
  sv.add_argument("--config", help="experiments/configs/*.py[:VARIANT] or .json (default: "
                  "the embedded default)")
  sv.add_argument("--out", help="directory for sensitivity.json and sensitivity.png")
  sv.add_argument("--base-bits", type=int, default=8, help="the other quantizers' bits "
                  "(default 8; 32 = float)")
  sv.add_argument("--quiet", action="store_true")
  sv.set_defaults(func=cmd_sensitivity)

  r = sub.add_parser("report", help="redraw the plots of a search directory and print its front")
  r.add_argument("dir")
  r.set_defaults(func=cmd_report)

  pl = sub.add_parser("prune-library",
                      help="EMOMC stage I: build a library of pruned + retrained models")
  pl.add_argument("model", nargs="?", help="zoo model name (e.g. resnet20)")
  pl.add_argument("--keep-range", help="START:STOP:STEP keep ratios (STOP included), e.g. "
                  "0.2:0.8:0.01, or a list 0.3,0.5")
  pl.add_argument("--out", help="library directory (an existing one is resumed)")
  pl.add_argument("--config", help="a .py file with get_library_config() (or .json)")
  pl.add_argument("--checkpoint", help="'default' or a variables file (.msgpack)")
  pl.add_argument("--dataset")
  pl.add_argument("--data-dir")
  pl.add_argument("--input-shape", help="H,W,C")
  pl.add_argument("--num-classes", type=int)
  pl.add_argument("--steps", type=int, help="pruning steps per ratio (EMOMC: 32)")
  pl.add_argument("--epochs-per-step", type=float, help="retraining epochs per step (EMOMC: 1)")
  pl.add_argument("--steps-per-stage", type=int,
                  help="optimizer steps per pruning step (overrides --epochs-per-step)")
  pl.add_argument("--schedule", help="independent (EMOMC) or chain")
  pl.add_argument("--batch-size", type=int)
  pl.add_argument("--learning-rate", type=float)
  pl.add_argument("--eval-max-images", type=int)
  pl.add_argument("--train-max-images", type=int)
  pl.add_argument("--seed", type=int)
  pl.add_argument("--quiet", action="store_true")
  pl.set_defaults(func=cmd_prune_library)

  er = sub.add_parser("emomc-report",
                      help="EMOMC table (energy / size improvement at <= 0.5%% loss)")
  er.add_argument("run_dir", help="a finished `nemo-jax search` directory of a library search")
  er.add_argument("--quant-run", help="a quantization-only run (keep_choices=[1.0])")
  er.add_argument("--max-loss", type=float, default=0.005, help="fraction (default 0.005)")
  er.add_argument("--criterion", help="cost to minimise among admissible members")
  er.add_argument("--out", help="output directory (default: RUN_DIR)")
  er.add_argument("--overwrite", action="store_true",
                  help="replace an existing table in the output directory (default: refuse)")
  er.add_argument("--quiet", action="store_true")
  er.set_defaults(func=cmd_emomc_report)
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


LOG_FILE = "nemo_jax.log"


class _ThreadStderr:
  """``sys.stderr`` while a command runs: the main thread's writes (the command's own
  lines, progress bars) pass through; other threads' (library threads printing a
  traceback when they fail, e.g. orbax's event loop after a full disk) go to the log."""

  def __init__(self, stream, lines: list[str]):
    self._stream, self._lines = stream, lines

  def write(self, text):
    if threading.current_thread() is threading.main_thread():
      return self._stream.write(text)
    self._lines.append(text.rstrip("\n"))
    return len(text)

  def __getattr__(self, name):
    return getattr(self._stream, name)


class _LogCollector(logging.Handler):
  """Collects what libraries log (orbax, absl, jax: warnings and errors with their
  tracebacks) and what background threads raise, instead of printing it; saved to the
  run directory's ``nemo_jax.log`` at the end (:func:`main`)."""

  def __init__(self):
    super().__init__(logging.WARNING)
    self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    self.lines: list[str] = []
    self._hook = None

  def emit(self, record):
    try:
      self.lines.append(self.format(record))
    except Exception:  # noqa: BLE001 - logging must never fail the command
      pass

  def _thread_exception(self, a):
    self.lines.append(f"exception in thread {getattr(a.thread, 'name', '?')}:\n" + "".join(
        traceback.format_exception(a.exc_type, a.exc_value, a.exc_traceback)))

  def install(self) -> "_LogCollector":
    """Takes the place of the handlers printing on the terminal (absl adds one to the
    root logger on its first message: ``logging.basicConfig``)."""
    root = logging.getLogger()
    self._removed = [h for h in root.handlers if type(h) is logging.StreamHandler
                     and getattr(h, "stream", None) in (sys.stderr, sys.stdout)]
    for h in self._removed:
      root.removeHandler(h)
    root.addHandler(self)
    self._hook, threading.excepthook = threading.excepthook, self._thread_exception
    self._showwarning, warnings.showwarning = warnings.showwarning, self._warning
    self._stderr, sys.stderr = sys.stderr, _ThreadStderr(sys.stderr, self.lines)
    self._unraisable, sys.unraisablehook = sys.unraisablehook, self._unraisable_exception
    return self

  def _unraisable_exception(self, u):
    """What a library's callback raises where nobody can catch it (asyncio's "Event loop
    is closed" in orbax's writers after a full disk): to the log."""
    self.lines.append(f"exception ignored in {u.object!r}:\n" + "".join(
        traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))

  def _warning(self, message, category, filename, lineno, file=None, line=None):
    """nemo_jax's own warnings are for the user: one ``warning: ...`` line on stderr
    (never stdout, which holds the command's JSON / table); other libraries' go to the
    log."""
    if os.sep + "nemo_jax" + os.sep in filename:
      print(f"warning: {message}", file=sys.stderr)
    else:
      self.lines.append(warnings.formatwarning(message, category, filename, lineno).rstrip())

  def uninstall(self) -> None:
    root = logging.getLogger()
    root.removeHandler(self)
    for h in self._removed:
      root.addHandler(h)
    threading.excepthook = self._hook
    warnings.showwarning = self._showwarning
    sys.stderr = self._stderr
    sys.unraisablehook = self._unraisable

  def save(self, directory: str | None, argv) -> str | None:
    """Appends the collected lines to ``directory/nemo_jax.log``; returns its path."""
    if not self.lines or not directory or not os.path.isdir(directory):
      return None
    path = os.path.join(directory, LOG_FILE)
    try:
      with open(path, "a") as f:
        f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} nemo-jax "
                f"{' '.join(argv)}\n" + "\n".join(self.lines) + "\n")
    except OSError:
      return None
    return path


def _log_dir(args) -> str | None:
  """The directory a command works in (where library logs are kept)."""
  if args.command == "search":
    return args.resume or args.out or "runs/default"
  if args.command == "prune-library":
    return args.out
  if args.command == "report":
    return args.dir
  return getattr(args, "run_dir", None)


INTERNAL_ERROR = ("internal error: {kind}: {text}; this is a bug in nemo_jax, please report "
                  "it with the command line and the traceback above")


def _run(args) -> tuple[int, str | None]:
  """Runs a parsed command: ``(exit status, the line to print on stderr or None)``."""
  try:
    enable_compilation_cache()
    return args.func(args), None
  except KeyboardInterrupt as e:
    return (getattr(e, "exit_status", 130),
            "interrupted (the last complete checkpoint is intact; resume with --resume)")
  except Exception as e:  # noqa: BLE001 - the CLI's boundary: every failure gets its line
    from nemo_jax._src.faults import StopRequested, user_error_message
    if isinstance(e, StopRequested):
      # The step's checkpoint is complete: say how to go on, exit 128 + signal.
      return e.exit_status, f"stopped: {e}"
    message = user_error_message(e)
    if message is not None:
      return 2, f"error: {message}"
    traceback.print_exc()
    text = " ".join(str(e).split())[:300]
    return 1, INTERNAL_ERROR.format(kind=type(e).__name__, text=text)


def main(argv=None) -> int:
  """The ``nemo-jax`` entry point; returns the exit status (module docstring).

  Called without ``argv`` (the console script, ``python -m nemo_jax.cli``) it owns the
  process: a second stop signal ends it at once, also while it shuts down.
  """
  process = argv is None
  argv = sys.argv[1:] if argv is None else list(argv)
  args = build_parser().parse_args(argv)
  from nemo_jax._src import faults
  if process:
    faults.install_process_signals()
  log = _LogCollector().install()
  try:
    status, line = _run(args)
  finally:
    if not process:  # the process keeps collecting until it ends (threads still log)
      log.uninstall()
  saved = log.save(_log_dir(args), argv)
  if line is not None:
    print(line + (f" (library messages: {saved})" if saved and status == 2 else ""),
          file=sys.stderr)
  if process:
    for stream in (sys.stdout, sys.stderr):
      stream.flush()
    if status != 0:
      # A failed command has said everything: end now, not after the interpreter's
      # shutdown, where the threads of a failed library call (orbax's writers after a
      # full disk) print their tracebacks. Every checkpoint was waited for.
      faults.release_all_locks()
      os._exit(status)
    faults.exit_at_once_on_signals(status)
  return status


if __name__ == "__main__":
  sys.exit(main())
