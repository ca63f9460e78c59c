"""The EMOMC table of a finished EMOMC search (same as `nemo-jax emomc-report`).

  python experiments/emomc_report.py runs/emomc_default [--quant-run runs/emomc_quant] \
      [--max-loss 0.005] [--criterion energy:X|Y] [--out DIR]

Prints the table (energy improvement per dataflow, size compression per coding, against
the uncompressed FP32 model, for the chosen member at <= max-loss accuracy loss and the
pruning-only / quantization-only baselines) and writes emomc_table.json / .csv.
The searched quantization-only baseline is a second run of the same config with
`keep_choices=[1.0]` (e.g. `nemo-jax search --config ... ` after editing keep_choices).
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run_dir")
  parser.add_argument("--quant-run")
  parser.add_argument("--max-loss", type=float, default=0.005)
  parser.add_argument("--criterion")
  parser.add_argument("--out")
  args = parser.parse_args(argv)
  from nemo_jax._src.emomc import report
  try:
    table = report.emomc_report(args.run_dir, quant_run=args.quant_run,
                                max_loss=args.max_loss, criterion=args.criterion,
                                out_dir=args.out, progress=True)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(report.format_table(table))
  return 0


if __name__ == "__main__":
  sys.exit(main())
