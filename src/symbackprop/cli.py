"""The command line: parse flags, call the library, map errors to exit codes.

Exit codes: 0 fine, 1 a check failed (or generated files drifted), 2 a usage or spec
error. A user's mistake prints one line and no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .budget import memory_cap
from .errors import SymbackpropError, UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="symbackprop",
                     description="Derive backpropagation symbolically from a YAML network "
                                 "and emit standalone numpy and torch modules.")
    parser.add_argument("--version", action="version", version=f"symbackprop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    gen = sub.add_parser("generate", help="write generated/<name>_numpy.py and _torch.py")
    gen.add_argument("spec", help="the model spec (YAML)")
    gen.add_argument("--out", default="generated", help="output folder (default: generated)")
    gen.add_argument("--backend", default="numpy,torch",
                     help="comma-separated backends: numpy,torch (default: both)")
    gen.add_argument("--force", action="store_true",
                     help="overwrite files that are not symbackprop modules")
    gen.add_argument("--check", action="store_true",
                     help="write nothing; exit 1 if the files on disk differ from the spec")
    gen.add_argument("--no-derivations", action="store_true",
                     help="leave DERIVATIONS empty (faster for deep networks; "
                          "`symbackprop latex` still prints them)")
    gen.add_argument("--explain", action="store_true",
                     help="list the numerically stable rewrites applied, and where")
    chk = sub.add_parser("check", help="finite-difference and torch autograd cross-check")
    chk.add_argument("spec", help="the model spec (YAML)")
    chk.add_argument("--params", default=None, metavar="FILE",
                     help="check at these parameters (.npz, or a .pt state dict with "
                          "torch) instead of each layer's declared initialisation")
    chk.add_argument("--batch", default=None, metavar="FILE",
                     help="check on this batch (.npz or .pt: an array per input and "
                          "target) instead of a random one")
    lat = sub.add_parser("latex", help="print the chain-rule derivation of every gradient "
                                       "(Markdown, LaTeX or HTML)")
    lat.add_argument("spec", help="the model spec (YAML)")
    lat.add_argument("--format", choices=("md", "tex", "html"), default=None,
                     help="md: Markdown with $$ blocks; tex: a standalone LaTeX document; "
                          "html: a page with MathML that needs no network (default: from "
                          "the -o suffix, else md)")
    lat.add_argument("-o", "--out", default=None, help="write to this file (default: stdout)")
    lat.add_argument("--param", action="append", default=None, metavar="NAME",
                     help="only this parameter, e.g. fc1.weight (repeatable)")
    lat.add_argument("--expand", action="store_true",
                     help="also write every scalar weight's partial derivative (small nets)")
    lat.add_argument("--program", action="store_true",
                     help="also write the generated loss_and_grad statement by statement, "
                          "as equations with the code's names")
    return parser


def run(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    if args.command == "generate":
        from .api import generate

        with memory_cap(f"generating {args.spec}"):
            paths = generate(args.spec, args.out, args.backend, force=args.force,
                             check=args.check, derivations=not args.no_derivations)
        verb = "up to date" if args.check else "wrote"
        for path in paths:
            print(f"{verb} {path}")
        if args.explain:
            from .api import compile_spec, explain

            print(explain(compile_spec(args.spec)))
        return 0
    if args.command == "latex":
        from .api import write_derivation

        with memory_cap(f"deriving {args.spec}"):
            text, written = write_derivation(args.spec, args.out, args.format,
                                             params=args.param, expand=args.expand,
                                             program=args.program)
        if written is None:
            sys.stdout.write(text)
        else:
            print(f"wrote {written}")
        return 0
    if args.command == "check":
        from .check import check_path

        _, text = check_path(args.spec, params=args.params, batch=args.batch,
                             memory_cap=memory_cap)
        print(text)
        print("\nall checks passed")
        return 0
    raise UsageError(f"unknown command {args.command!r}")  # pragma: no cover


def main(argv: Sequence[str] | None = None) -> int:
    from . import budget

    try:
        return run(sys.argv[1:] if argv is None else argv)
    except SymbackpropError as exc:
        print(f"symbackprop: {exc}" if isinstance(exc, UsageError) else str(exc),
              file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        note = budget.note()
        if note:
            print(f"symbackprop: {note}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
