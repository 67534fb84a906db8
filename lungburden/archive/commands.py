"""Subcommands of archive mode: ``batch`` and ``worker`` (added to ``lungburden``).

Exit statuses (:mod:`lungburden.exit_codes`): ``batch`` exits 0 when every series considered is
done or skipped, 1 when some failed (the table says why), 2 for bad options, 78 for an invalid
configuration file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

from lungburden.exit_codes import EXIT_BAD_INPUT, EXIT_CONFIG, EXIT_FAILED, EXIT_OK

_DATE = re.compile(r"^\d{8}$")


def _outputs(text: str) -> tuple[str, ...]:
    from lungburden.pipeline import check_outputs

    try:
        return check_outputs([v.strip() for v in text.split(",") if v.strip()])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _date(text: str) -> str:
    value = text.replace("-", "")
    if not _DATE.match(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYYMMDD or YYYY-MM-DD)")
    return value


def cmd_batch(args: argparse.Namespace) -> int:
    """Quantify the chest CT series of a DICOMweb archive and write the results table."""
    from lungburden.archive.batch import BatchOptions, run_batch
    from lungburden.archive.search import ArchiveQuery, read_study_list
    from lungburden.archive.tasks import PASSWORD_ENV, USERNAME_ENV
    from lungburden.config import ConfigError, load_config
    from lungburden.jobs.logs import configure_logging

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(config, verbose=getattr(args, "verbose", False), replace_handlers=True,
                      quiet=("pynetdicom", "dicomweb_client", "celery", "kombu"))
    try:
        study_uids = read_study_list(Path(args.study_list)) if args.study_list else ()
        for regex in (args.study_description, args.series_description):
            if regex:
                re.compile(regex)
    except (OSError, ValueError, re.error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    query = ArchiveQuery(study_date_from=args.date_from, study_date_to=args.date_to, modality=args.modality,
                         study_description_regex=args.study_description,
                         series_description_regex=args.series_description, study_uids=study_uids)
    rules = config.selection.to_rules()
    followup = config.followup
    priors_url = args.priors_from or (args.url if args.priors else None) or (followup.url if followup.enabled else None)
    followup = replace(followup, enabled=bool(priors_url), url=priors_url,
                       lookback_days=followup.lookback_days if args.lookback_days is None else args.lookback_days,
                       max_priors=followup.max_priors if args.max_priors is None else args.max_priors)
    for key, value, message in followup.check():
        flag = {"followup.url": "--priors-from", "followup.lookback_days": "--lookback-days",
                "followup.max_priors": "--max-priors"}.get(key, key)
        print(f"error: {flag} {message} (got {value!r})", file=sys.stderr)
        return EXIT_BAD_INPUT
    username = args.username or os.environ.get(USERNAME_ENV)
    password = os.environ.get(PASSWORD_ENV)
    options = BatchOptions(
        url=args.url, table=Path(args.table), query=query, rules=rules,
        prefer_one_reconstruction=config.selection.prefer_one_reconstruction,
        model=args.model or config.processing.model, weights=args.weights, outputs=args.outputs,
        store=not args.no_store, engine=args.engine, workers=args.workers, broker=args.broker,
        backend=args.result_backend, queue=args.queue, max_in_flight=args.max_in_flight,
        timeout_s=args.timeout, username=username, password=password,
        retry_failed=args.retry_failed, progress_bar=False if args.no_progress else None,
        priors_url=followup.url, lookback_days=followup.lookback_days, max_priors=followup.max_priors,
        store_priors=followup.store_results,
    )
    try:
        summary = run_batch(options)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps({**summary.to_json(), "table": str(options.table)}, indent=2))
    return EXIT_FAILED if summary.failed else EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a Celery worker of archive mode (WADO-RS in, STOW-RS out; any number of machines)."""
    from lungburden.archive.worker import make_app
    from lungburden.segmentation.base import requested_precision

    try:
        requested_precision()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    app = make_app(args.broker, args.result_backend, visibility_timeout_s=args.visibility_timeout,
                   restore_interval_s=min(10.0, max(1.0, args.visibility_timeout / 4)), rate_limit=args.rate_limit)
    argv = ["worker", "--queues", args.queue, "--concurrency", str(args.concurrency), "--pool", "prefork",
            "--loglevel", "DEBUG" if getattr(args, "verbose", False) else "INFO", "--without-gossip",
            "--without-mingle"]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    if args.max_tasks_per_child:
        argv += ["--max-tasks-per-child", str(args.max_tasks_per_child)]
    app.worker_main(argv)
    return EXIT_OK


def add_subcommands(sub) -> None:
    from lungburden.archive.batch import ENGINES
    from lungburden.archive.tasks import DEFAULT_QUEUE

    p = sub.add_parser("batch", help="quantify the chest CT series of a DICOMweb archive (QIDO/WADO/STOW-RS)")
    p.add_argument("--url", required=True, help="DICOMweb base URL of the archive, e.g. http://pacs:8042/dicom-web")
    p.add_argument("--username", default=None,
                   help="basic-auth user (password from $LUNGBURDEN_DICOMWEB_PASSWORD; workers read both from "
                        "their environment)")
    p.add_argument("--from", dest="date_from", type=_date, default=None, help="first StudyDate (YYYYMMDD)")
    p.add_argument("--to", dest="date_to", type=_date, default=None, help="last StudyDate (YYYYMMDD)")
    p.add_argument("--modality", default="CT", help="modality of the studies and series considered (default CT)")
    p.add_argument("--study-description", default=None, metavar="REGEX", help="StudyDescription must match")
    p.add_argument("--series-description", default=None, metavar="REGEX", help="SeriesDescription must match")
    p.add_argument("--study-list", default=None, metavar="FILE",
                   help="only these Study Instance UIDs (one a line, or the first column of a CSV)")
    p.add_argument("--table", required=True, metavar="FILE",
                   help="results table, .csv or .parquet; an existing one is resumed")
    p.add_argument("--config", default=None, help="YAML of the node: its selection and processing sections apply")
    p.add_argument("--model", default=None, help="segmenter name (see `lungburden models`)")
    p.add_argument("--weights", default=None, metavar="FILE", help="network weights file (default: shipped)")
    p.add_argument("--outputs", type=_outputs, default=("seg", "sr"),
                   help="results written and stored, of seg,sr,sc,pdf (default seg,sr)")
    p.add_argument("--no-store", action="store_true", help="only the table: do not store results by STOW-RS")
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: a process pool here (default); celery: tasks for `lungburden worker`")
    p.add_argument("--workers", type=int, default=2, help="processes of the local engine (default 2)")
    p.add_argument("--broker", default=os.environ.get("LUNGBURDEN_BROKER"),
                   help="Celery broker URL, e.g. redis://host:6379/0 (default $LUNGBURDEN_BROKER)")
    p.add_argument("--result-backend", default=None, help="Celery result backend URL (default: the broker)")
    p.add_argument("--queue", default=DEFAULT_QUEUE, help=f"Celery queue (default {DEFAULT_QUEUE})")
    p.add_argument("--max-in-flight", type=int, default=None, metavar="N",
                   help="series handed out at once: the concurrency limit on the archive (default: the local "
                        "workers; 8 with Celery)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per DICOMweb request (default 120)")
    p.add_argument("--retry-failed", action="store_true",
                   help="analyse again the series whose input was refused in an earlier run")
    p.add_argument("--no-progress", action="store_true", help="plain log lines even on a terminal")
    g = p.add_argument_group("follow-up", "compare each series with the patient's prior chest CTs (docs/followup.md); "
                                          "also on with the configuration's followup section")
    g.add_argument("--priors", action="store_true", help="search the priors in the archive (--url)")
    g.add_argument("--priors-from", default=None, metavar="URL",
                   help="search the priors in this DICOMweb archive instead (implies --priors)")
    g.add_argument("--lookback-days", type=int, default=None, metavar="DAYS",
                   help="priors dated at most this many days earlier (default: followup.lookback_days, 365)")
    g.add_argument("--max-priors", type=int, default=None, metavar="N",
                   help="at most N priors, the most recent first (default: followup.max_priors, 3)")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("worker", help="run a Celery worker for `lungburden batch --engine celery`")
    p.add_argument("--broker", default=os.environ.get("LUNGBURDEN_BROKER"), required="LUNGBURDEN_BROKER" not in
                   os.environ, help="Celery broker URL, e.g. redis://host:6379/0 (default $LUNGBURDEN_BROKER)")
    p.add_argument("--result-backend", default=None, help="Celery result backend URL (default: the broker)")
    p.add_argument("--queue", default=DEFAULT_QUEUE, help=f"Celery queue (default {DEFAULT_QUEUE})")
    p.add_argument("--concurrency", type=int, default=1, help="series analysed at once on this machine (default 1)")
    p.add_argument("--visibility-timeout", type=float, default=3600.0, metavar="S",
                   help="seconds after which the task of a lost worker is delivered again; longer than the "
                        "slowest series (default 3600)")
    p.add_argument("--rate-limit", default=None, metavar="RATE",
                   help="tasks this worker starts at most, e.g. 60/m (default: no limit)")
    p.add_argument("--hostname", default=None, help="Celery node name (default celery@host)")
    p.add_argument("--max-tasks-per-child", type=int, default=None, help="recycle a worker process after N series")
    p.set_defaults(func=cmd_worker)
