"""Subcommands of the DICOM node: ``serve``, ``jobs``, ``retry``, ``pull`` (added to ``lungburden``).

Exit statuses: :mod:`lungburden.exit_codes` (an invalid configuration exits with 78, as the
Orthanc plugin's worker does)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from lungburden.config import ConfigError, load_config
from lungburden.config.loader import dump_config
from lungburden.exit_codes import EXIT_BAD_INPUT, EXIT_CONFIG, EXIT_FAILED, EXIT_OK


def _load(args: argparse.Namespace):
    try:
        return load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _store(config):
    from lungburden.jobs.queue import JobStore

    return JobStore.for_storage(config.storage_dir, config.node.db_journal_mode)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the node: C-STORE SCP, STOW-RS and health endpoint, series completion, workers, export."""
    config = _load(args)
    if config is None:
        return EXIT_CONFIG
    from lungburden.segmentation.base import requested_precision

    try:
        requested_precision()  # $LUNGBURDEN_PRECISION: fail at start-up, not in every job
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print(json.dumps(dump_config(config), indent=2))
        return EXIT_OK
    from lungburden.dicom_node.service import serve
    from lungburden.jobs.logs import configure_logging

    configure_logging(config, verbose=getattr(args, "verbose", False))
    return serve(config)


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def cmd_jobs(args: argparse.Namespace) -> int:
    """List the node's jobs with their state, deliveries and reason."""
    config = _load(args)
    if config is None:
        return EXIT_CONFIG
    store = _store(config)
    states = [s for v in (args.state or []) for s in v.split(",") if s]
    jobs = store.jobs(states or None, limit=args.limit)
    if args.json:
        print(json.dumps({"counts": store.counts(), "jobs": [j.to_json() for j in jobs]}, indent=2))
        return EXIT_OK
    counts = store.counts()
    print("jobs: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v) if any(counts.values()) else "no jobs")
    if jobs:
        print(f"{'ID':>5}  {'STATE':<10} {'VER':>3} {'N':>4}  {'UPDATED':<19}  {'SERIES':<64}  DELIVERIES / REASON")
    for j in jobs:
        deliveries = " ".join(
            f"{d.destination}:{d.state}" + (f"({d.attempts})" if d.attempts and d.state != "done" else "")
            for d in j.deliveries
        )
        extra = " | ".join(x for x in (deliveries, j.reason or "") if x)
        burden = j.result.get("burden_percent") if j.result else None
        if burden is not None:
            extra = f"burden {burden:.2f} % " + (f"| {extra}" if extra else "")
        print(f"{j.id:>5}  {j.state:<10} {j.version:>3} {j.instance_count:>4}  {_when(j.updated_at):<19}  "
              f"{j.series_instance_uid:<64}  {extra}")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    """Re-try dead-lettered deliveries and failed jobs (a running node picks them up)."""
    config = _load(args)
    if config is None:
        return EXIT_CONFIG
    if not args.job_ids and not args.all:
        print("error: name job ids or use --all", file=sys.stderr)
        return EXIT_BAD_INPUT
    states = ["dead", "failed"] + (["skipped"] if args.include_skipped else [])
    store = _store(config)
    done = store.retry(None if args.all else args.job_ids, states)
    if not done:
        print("nothing to retry (only jobs in state " + ", ".join(states) + " can be retried)")
        return EXIT_FAILED if args.job_ids else EXIT_OK
    for job_id in done:
        job = store.job(job_id)
        print(f"job {job_id}: {job.state if job else '?'}")
    return EXIT_OK


def cmd_pull(args: argparse.Namespace) -> int:
    """Retrieve a study/series by WADO-RS, analyse it and deliver the results (same pipeline, same export)."""
    config = _load(args)
    if config is None:
        return EXIT_CONFIG
    from lungburden.dicom_node.pull import process_jobs, retrieve
    from lungburden.jobs.engine import JobEngine
    from lungburden.jobs.logs import configure_logging

    configure_logging(config, verbose=getattr(args, "verbose", False))
    engine = JobEngine(config, analysis="none")  # not started: this process runs the jobs itself
    try:
        report = retrieve(engine, args.url, args.study, args.series, args.username, args.password)
    except Exception as exc:  # noqa: BLE001 - network/HTTP errors end the command with a message
        print(f"error: retrieval from {args.url} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for line in report.refused:
        print(f"refused: {line}", file=sys.stderr)
    if not report.jobs:
        print(f"retrieved {report.retrieved} instances; no CT series to analyse", file=sys.stderr)
        return EXIT_FAILED
    jobs = report.jobs
    if not args.no_wait:
        jobs = process_jobs(engine, [j.id for j in jobs], timeout=args.timeout)
    rc = EXIT_OK
    for j in jobs:
        summary = f"job {j.id}: series {j.series_instance_uid} {j.state}"
        if j.result and "burden_percent" in j.result:
            summary += f", burden {j.result['burden_percent']:.2f} %"
        if j.reason:
            summary += f" ({j.reason})"
        if j.result_dir and j.state in ("done", "exporting", "dead"):
            summary += f", results in {j.result_dir}"
        print(summary)
        if j.state in ("failed", "dead"):
            rc = EXIT_FAILED
    return rc


def cmd_node_demo(args: argparse.Namespace) -> int:
    """Start a node on loopback, send a folder's DICOM files to it, list the delivered results."""
    import logging

    from lungburden.dicom_node.demo import run_demo

    if not getattr(args, "verbose", False):
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    return run_demo(args.input_dir, args.out, model=args.model)


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve``, ``jobs``, ``retry``, ``pull`` and ``node-demo`` to the ``lungburden`` command line."""

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", default=None,
                       help="YAML configuration (default: embedded defaults; LUNGBURDEN_<SECTION>__<KEY> overrides)")

    p = subparsers.add_parser("serve", help="run the DICOM node (C-STORE SCP, STOW-RS, queue, workers, export)")
    config_arg(p)
    p.add_argument("--check-config", action="store_true", help="validate and print the effective configuration")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("jobs", help="list the node's jobs with state and reason")
    config_arg(p)
    p.add_argument("--state", action="append", help="only these states (comma-separated, repeatable)")
    p.add_argument("--limit", type=int, default=50, help="at most this many, newest first (default 50)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_jobs)

    p = subparsers.add_parser("retry", help="re-try dead-lettered deliveries and failed jobs")
    config_arg(p)
    p.add_argument("job_ids", nargs="*", type=int, help="job ids (see `lungburden jobs`)")
    p.add_argument("--all", action="store_true", help="every dead and failed job")
    p.add_argument("--include-skipped", action="store_true", help="also force skipped jobs (selection overridden)")
    p.set_defaults(func=cmd_retry)

    p = subparsers.add_parser("pull", help="retrieve a study/series by WADO-RS and process it")
    config_arg(p)
    p.add_argument("--url", required=True, help="DICOMweb base URL, e.g. http://pacs:8042/dicom-web")
    p.add_argument("--study", required=True, help="StudyInstanceUID")
    p.add_argument("--series", default=None, help="only this SeriesInstanceUID")
    p.add_argument("--username", default=None)
    p.add_argument("--password", default=None)
    p.add_argument("--no-wait", action="store_true", help="only enqueue (a running `serve` processes it)")
    p.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    p.set_defaults(func=cmd_pull)

    p = subparsers.add_parser("node-demo", help="loopback demo: a node, a storescu of INPUT_DIR, results in a folder")
    p.add_argument("input_dir", type=Path, help="folder with the DICOM files to send (e.g. a phantom)")
    p.add_argument("--out", type=Path, required=True, help="folder for the node's storage and the results")
    p.add_argument("--model", default=None, help="segmenter (default: the shipped default)")
    p.set_defaults(func=cmd_node_demo)


def main(argv: list[str] | None = None) -> int:
    """``python -m lungburden.dicom_node``: the node's commands without the rest of the CLI."""
    import logging

    parser = argparse.ArgumentParser(prog="lungburden-node", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)
