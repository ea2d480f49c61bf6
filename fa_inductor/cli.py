"""``fa-inductor`` command line.

  fa-inductor demo   compile a small decoder-only transformer (attention spelled three ways) with default
                     Inductor and with the fa_inductor backend; print the attention sites replaced, the error
                     against eager, time per training step and peak memory (CUDA when present, else CPU)
  fa-inductor tune   tune kernel configs for shapes given here or found in a model (``fa_inductor.tune``),
                     writing the persistent cache, a shippable table (--table) or a full report (--report)
"""

from __future__ import annotations

import argparse


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(device=args.device, seq_len=args.seq_len, repeat=args.repeat)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="fa-inductor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="default Inductor vs fa_inductor on a small transformer")
    demo.add_argument("--device", choices=["cpu", "cuda"], default=None)
    demo.add_argument("--seq-len", type=int, default=None, help="default: 4096 on CUDA, 128 on CPU")
    demo.add_argument("--repeat", type=int, default=5, help="timed training steps per run")
    demo.set_defaults(func=_demo)
    from . import tune as tune_command  # stdlib imports only: torch loads when the command runs

    tune = sub.add_parser("tune", help="tune kernel configs into the cache or a table file",
                          description=tune_command.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tune_command.add_arguments(tune)
    tune.set_defaults(func=tune_command.run_tune)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
