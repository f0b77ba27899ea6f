"""``fastattn bench``: the benchmark report (speed, memory, error, task accuracy, peers)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import preset, resolve_device, select_methods, task_methods_covering_families

__all__ = ["add_parser", "main"]

EPILOG = """\
presets: --quick (< 2 min on 2 CPU cores), the default (< 15 min), --full (hours; the published tables).
Examples:
  fastattn bench --quick
  fastattn bench --methods family:kernel,softmax --lengths 1024,4096 --no-tasks
  fastattn bench --out docs/bench --readme README.md     # the README's benchmark section
  fastattn bench --from docs/bench --readme README.md    # rewrite report, plots, README from results.json
"""


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 2:
        raise argparse.ArgumentTypeError(f"lengths must be integers >= 2, got {text!r}")
    return vals


def _modes(text: str) -> list[str]:
    modes = [x.strip() for x in text.split(",") if x.strip()]
    bad = [m for m in modes if m not in ("fwd", "fwdbwd", "decode")]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"modes are fwd, fwdbwd, decode; got {text!r}")
    return modes


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="run the benchmark report (speed, memory, error, accuracy, peers)",
        description="Benchmark every registered sequence mechanism (or a selection) against exact attention "
                    "and SDPA: speed and peak memory over a ladder of lengths, approximation error, accuracy "
                    "on synthetic tasks, and installed peer packages. Writes results.json, report.md and PNG "
                    "plots to --out.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small preset: under 2 minutes on 2 CPU cores")
    g.add_argument("--full", action="store_true", help="large preset: long ladders, more repeats (hours)")
    p.add_argument("--methods", default="all",
                   help="comma list of ids, family:<name>, or all (default); unknown ids are noted and left out")
    p.add_argument("--lengths", type=_ints, default=None, help="sequence lengths, e.g. 1024,4096")
    p.add_argument("--error-lengths", type=_ints, default=None, help="lengths of the approximation-error section")
    p.add_argument("--features", type=_ints, default=None,
                   help="feature counts (rank, landmarks) of the error sweep, e.g. 16,64,256")
    p.add_argument("--error-inputs", default=None,
                   help="inputs of the error section, any of trained,structured,gaussian (default: all three)")
    p.add_argument("--decode-steps", type=int, default=None,
                   help="decode cases time a loop of this many steps through the decoding state (per step)")
    p.add_argument("--modes", type=_modes, default=None, help="any of fwd,fwdbwd,decode (default: all three)")
    p.add_argument("--tasks", action=argparse.BooleanOptionalAction, default=None,
                   help="train the small task models (default: on, off with --quick)")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None,
                   help="compare with installed peer packages (default: on)")
    p.add_argument("--error", action=argparse.BooleanOptionalAction, default=None,
                   help="measure approximation error (default: on)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="measure isolated peak memory (default: on)")
    p.add_argument("--causal", action="store_true", help="time the causal forms (mechanisms without one are skipped)")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: every core this process may use)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case (median reported)")
    p.add_argument("--task-methods", default=None,
                   help="mechanisms trained on the tasks (same syntax as --methods; default: all selected, "
                        "or a spread over the families when --methods is not given with the default preset)")
    p.add_argument("--task-steps", type=int, default=None, help="training steps of each task model")
    p.add_argument("--case-budget", type=float, default=None, help="skip cases predicted slower than this (s)")
    p.add_argument("--memory-budget", type=float, default=None, help="skip cases predicted above this (MiB)")
    p.add_argument("--time-scale", type=float, default=None,
                   help="multiply every section's wall-clock budget (e.g. 0.5 for a faster run)")
    p.add_argument("--out", default="bench-out", help="output folder (default bench-out/)")
    p.add_argument("--from", dest="from_dir", default=None, metavar="DIR",
                   help="run nothing: rewrite report.md and plots from DIR/results.json")
    p.add_argument("--readme", default=None, metavar="PATH",
                   help="also write the headline plot and table into PATH between the bench markers")
    p.add_argument("--note", action="append", default=[], metavar="TEXT",
                   help="a remark stored with the results and shown in the report and README (e.g. the "
                        "machine's load); with --from it is added to the stored run")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from .report import load, update_readme, write_plots, write_report

    if args.from_dir:
        out = Path(args.from_dir)
        res = load(out)
        if args.note:
            import json

            res["meta"].setdefault("notes", []).extend(args.note)
            (out / "results.json").write_text(json.dumps(res, indent=1), encoding="utf-8")
        write_report(res, out)
        write_plots(res, out)
        if args.readme:
            update_readme(res, out, Path(args.readme))
            print(f"updated the benchmark section of {args.readme}")
        print(f"rewrote {out / 'report.md'} and the plots from {out / 'results.json'}")
        return 0
    from .runner import command_line, run_bench

    device = resolve_device(args.device)
    cfg = preset("quick" if args.quick else "full" if args.full else "default", device)
    if args.lengths:
        cfg.lengths = args.lengths
    if args.modes:
        cfg.modes = args.modes
    if args.error_lengths:
        cfg.error_lengths = args.error_lengths
        cfg.error_feature_length = max(args.error_lengths)
    if args.features:
        cfg.error_features = args.features
    if args.error_inputs:
        kinds = [x.strip() for x in args.error_inputs.split(",") if x.strip()]
        bad = [x for x in kinds if x not in ("trained", "structured", "gaussian")]
        if bad or not kinds:
            print(f"--error-inputs: use trained, structured, gaussian; got {args.error_inputs!r}", file=sys.stderr)
            return 2
        cfg.error_inputs = kinds
    if args.decode_steps:
        cfg.decode_steps = max(1, args.decode_steps)
    for flag, attr in (("tasks", "tasks"), ("peers", "peers"), ("error", "error"), ("memory", "memory")):
        if getattr(args, flag) is not None:
            setattr(cfg, attr, getattr(args, flag))
    cfg.causal = args.causal
    if args.dtype:
        cfg.dtype = args.dtype
    if args.threads:
        cfg.threads = args.threads
    if args.repeats:
        cfg.repeats = args.repeats
    if args.task_steps:
        cfg.mqar.steps = cfg.listops.steps = args.task_steps
    if args.case_budget:
        cfg.case_budget_s = args.case_budget
    if args.memory_budget:
        cfg.memory_budget_mb = args.memory_budget
    if args.time_scale:
        cfg.section_budget_s = {k: v * args.time_scale for k, v in cfg.section_budget_s.items()}
    specs, notes = select_methods(args.methods)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    cfg.methods = [s.name for s in specs]
    names = [s.name for s in specs]
    if args.task_methods:
        cfg.task_methods = [s.name for s in select_methods(args.task_methods)[0] if s.name in names]
    elif args.methods != "all" or cfg.task_methods is None:
        cfg.task_methods = names
    else:
        cfg.task_methods = task_methods_covering_families(specs, cfg.task_methods)
        notes.append(f"tasks trained for {', '.join(cfg.task_methods)} (at least one per family; "
                     f"--task-methods all trains every one)")
    if not specs:
        print("no mechanism selected; see `fastattn list`", file=sys.stderr)
        return 2
    out = Path(args.out)
    res = run_bench(cfg, specs, out, command=command_line(), notes=notes + args.note, quiet=args.quiet)
    if args.readme:
        update_readme(res, out, Path(args.readme))
        print(f"updated the benchmark section of {args.readme}")
    if not args.quiet:
        from .report import headline_table

        print(headline_table(res))
    return 0
