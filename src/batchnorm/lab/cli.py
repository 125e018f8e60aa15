"""``batchnorm lab``: list, run, show and report the experiments.

::

    batchnorm lab list                       the experiments and the claim each tests
    batchnorm lab show NAME                  the config fields of one, with defaults and help
    batchnorm lab run NAME [--quick] [--seeds K] [--set key=value ...] [--data-dir D] [--out D]
    batchnorm lab run NAME --resume RUN_DIR  continue an interrupted run
    batchnorm lab run NAME --resume RUN_DIR --restart-job JOB   ... training JOB again from scratch
    batchnorm lab run NAME --help            the options, and NAME's config fields
    batchnorm lab judge RUN_DIR [--dry-run]  decide a finished run's claims again from its saved
                                             numbers (no training); rewrite its verdicts
    batchnorm lab report [--out D]           index of all runs with their verdicts

Every user error is one line on stderr, with exit status 2 (3 when data is unavailable; 128 +
the signal number when a run is interrupted by Ctrl-C or SIGTERM); ``lab report`` exits 1 when it
skipped unreadable run directories or could not write ``INDEX.md``.

Runs go to ``--out``, else ``$BATCHNORM_RUNS_DIR``, else ``./runs``; data is looked for in
``--data-dir``, then ``$BATCHNORM_DATA_DIR``, the cache, then fetched (see
:mod:`batchnorm.lab.data`). ``BATCHNORM_PROGRESS=0`` turns the progress bars off.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["register", "main"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``lab`` command to the ``batchnorm`` parser."""
    lab = subparsers.add_parser(
        "lab",
        help="run the experiments",
        description="Experiments that reproduce published claims about batch normalization.",
    )
    lab.set_defaults(func=lambda args: (lab.print_help(), 0)[1])
    sub = lab.add_subparsers(dest="lab_command", metavar="SUBCOMMAND")

    listing = sub.add_parser("list", help="the experiments and the claim each tests")
    listing.add_argument("-v", "--verbose", action="store_true", help="also list config fields")
    listing.set_defaults(func=_cmd_list)

    show = sub.add_parser("show", help="an experiment's config fields, defaults and help")
    show.add_argument("name", metavar="NAME")
    show.add_argument("--quick", action="store_true", help="show the quick-mode defaults")
    show.set_defaults(func=_cmd_show)

    run = sub.add_parser(
        "run",
        help="run an experiment",
        add_help=False,
        description="Run an experiment in a new run directory and write its report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "name", metavar="NAME", nargs="?", help="experiment (see `batchnorm lab list`)"
    )
    run.add_argument("-h", "--help", action="store_true", help="show this help (and NAME's fields)")
    run.add_argument("--quick", action="store_true", help="a short smoke-test protocol")
    run.add_argument("--seeds", type=int, metavar="K", help="number of seeds (sets seeds=K)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable; see `batchnorm lab show NAME`)",
    )
    run.add_argument("--data-dir", metavar="D", help="look for the data files here first")
    run.add_argument(
        "--out", metavar="D", help="runs directory (default $BATCHNORM_RUNS_DIR or ./runs)"
    )
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    run.add_argument(
        "--restart-job",
        dest="restart_jobs",
        action="append",
        default=[],
        metavar="JOB",
        help="with --resume: train this job again from its start (e.g. when its checkpoint is "
        "damaged; repeatable)",
    )
    run.set_defaults(func=_cmd_run, run_parser=run)

    judge = sub.add_parser(
        "judge",
        help="decide a finished run's claims again from its saved numbers",
        description="Decide the claims of a finished run again from its numbers.json, without "
        "training, and rewrite the verdicts in its report.md, metrics.json and status.json.",
    )
    judge.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of `batchnorm lab run`")
    judge.add_argument(
        "--dry-run", action="store_true", help="print the verdicts, do not rewrite any file"
    )
    judge.set_defaults(func=_cmd_judge)

    report = sub.add_parser("report", help="index of all runs with their verdicts")
    report.add_argument(
        "--out", metavar="D", help="runs directory (default $BATCHNORM_RUNS_DIR or ./runs)"
    )
    report.add_argument("--json", action="store_true", help="print JSON instead of a table")
    report.set_defaults(func=_cmd_report)


def _experiment(name: str) -> Any:
    from batchnorm.lab import experiments

    return experiments.get(name)


def _fields_text(experiment: Any, quick: bool = False) -> str:
    config = experiment.default_config(quick)
    rows = [(n, t, json.dumps(_plain(getattr(config, n))), h) for n, t, _, h in experiment.fields()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [
        f"config fields of {experiment.name} ({'quick' if quick else 'full'} defaults); "
        "set with --set KEY=VALUE:"
    ]
    for name, type_name, default, help_text in rows:
        lines.append(
            f"  {name:<{widths[0]}}  {type_name:<{widths[1]}}  {default:<{widths[2]}}  {help_text}"
        )
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _cmd_list(args: argparse.Namespace) -> int:
    from batchnorm.lab import experiments

    for experiment in experiments.all_experiments():
        aliases = f" (also: {', '.join(experiment.aliases)})" if experiment.aliases else ""
        print(f"{experiment.name}{aliases}: {experiment.title}")
        print(f"    claim: {experiment.claim}")
        if args.verbose:
            print("    " + _fields_text(experiment).replace("\n", "\n    "))
    print("\nrun one with `batchnorm lab run NAME [--quick]`; fields: `batchnorm lab show NAME`")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    try:
        experiment = _experiment(args.name)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    print(f"{experiment.name}: {experiment.title}")
    print(f"claim: {experiment.claim}")
    print(f"paper: {experiment.paper}\n")
    print(_fields_text(experiment, args.quick))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from batchnorm.lab.config import ConfigError
    from batchnorm.lab.data import DataUnavailableError
    from batchnorm.lab.experiment import RunInterrupted, make_config, run_experiment

    if args.help or not args.name:
        args.run_parser.print_help()
        if args.name:
            try:
                print("\n" + _fields_text(_experiment(args.name)))
            except KeyError as exc:
                print(f"\nerror: {exc.args[0]}", file=sys.stderr)
                return 2
        elif not args.help:
            print("\nerror: name an experiment (see `batchnorm lab list`)", file=sys.stderr)
            return 2
        return 0
    try:
        experiment = _experiment(args.name)
        config = None
        if args.resume is None:
            config = make_config(
                experiment, quick=args.quick, seeds=args.seeds, overrides=args.overrides
            )
        elif args.quick or args.seeds is not None or args.overrides:
            raise ConfigError(
                "--resume continues a run with its saved config; drop --quick, --seeds and --set"
            )
        result = run_experiment(
            experiment,
            config,
            quick=args.quick,
            out=args.out,
            data_dir=args.data_dir,
            resume=args.resume,
            overrides=args.overrides,
            restart_jobs=args.restart_jobs,
        )
    except RunInterrupted as exc:
        print(
            f"interrupted ({exc.signal_name}); continue with "
            f"`batchnorm lab run {args.name} --resume {exc.run_dir}`",
            file=sys.stderr,
        )
        return exc.exit_code
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DataUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(f"{experiment.name}: {result.verdict} ({result.wall_seconds:.1f} s)")
    _print_claims(result.outcome.claims)
    print(f"report: {result.run_dir / 'report.md'}")
    return 0


def _print_claims(claims: Any) -> None:
    for claim in claims:
        print(f"  {claim.verdict:>12}: {claim.statement}  [{claim.evidence}]")


def _cmd_judge(args: argparse.Namespace) -> int:
    from batchnorm.lab.config import ConfigError
    from batchnorm.lab.experiment import judge_run

    try:
        judged = judge_run(args.run_dir, write=not args.dry_run)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{judged.experiment.name}: {judged.verdict} (judged again from its saved numbers)")
    _print_claims(judged.claims)
    if judged.changed:
        print("changed since the run: " + "; ".join(judged.changed))
    else:
        print("every verdict is the one the run gave")
    if args.dry_run:
        print("(dry run: no file rewritten)")
    else:
        print(f"report: {judged.run_dir / 'report.md'}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from batchnorm.lab.config import ConfigError
    from batchnorm.lab.experiment import render_index, runs_root, scan_runs
    from batchnorm.lab.io import atomic_write_text

    try:
        root = runs_root(args.out)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runs, skipped = scan_runs(root)
    status = 0
    if skipped:
        print(
            f"note: skipped {len(skipped)} run director{'y' if len(skipped) == 1 else 'ies'} "
            "that could not be read: "
            + "; ".join(f"{path} ({reason})" for path, reason in skipped),
            file=sys.stderr,
        )
        status = 1
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "run": str(r.path),
                        "experiment": r.experiment,
                        "status": r.status,
                        "quick": r.quick,
                        "verdict": r.verdict,
                        "wall_seconds": r.wall_seconds,
                    }
                    for r in runs
                ],
                indent=2,
            )
        )
        return status
    text = render_index(runs)
    print(text)
    if not runs:
        print(f"no runs under {root}; start one with `batchnorm lab run fig1`")
        return status
    try:
        atomic_write_text(root / "INDEX.md", text)
    except OSError as exc:
        print(
            f"error: cannot write {root / 'INDEX.md'}: {exc.strerror or exc}; the index is "
            "printed above (make the folder writable to keep it)",
            file=sys.stderr,
        )
        return 1
    print(f"(written to {root / 'INDEX.md'})")
    return status


def main(argv: list[str] | None = None) -> int:
    """``python -m batchnorm.lab.cli``: the same as ``batchnorm lab``."""
    parser = argparse.ArgumentParser(prog="batchnorm")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["lab", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
