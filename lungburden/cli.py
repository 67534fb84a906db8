"""The ``lungburden`` command line: ``analyze``, ``phantom``, ``models`` and the subsystems' commands.

Subsystems (node, training, Orthanc plugin) add their own subcommands through an
``add_subcommands(subparsers)`` function; each command calls the shared pipeline.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
import time
from pathlib import Path

from lungburden import __version__
from lungburden.exit_codes import EXIT_BAD_INPUT

log = logging.getLogger("lungburden")

#: Modules that contribute subcommands when present.
COMMAND_MODULES = (
    "lungburden.training.commands",
    "lungburden.dicom_node.commands",
    "lungburden.orthanc_plugin.commands",
    "lungburden.archive.commands",
)



def _priors_line(document: dict) -> str:
    """The summary line of the priors (empty when they were not searched)."""
    if "priors" not in document:
        return ""
    change = document.get("change_since_prior")
    if change is None:
        return f"  Priors            none ({document.get('priors_note') or 'none found'})\n"
    latest = document["priors"][0]
    return (f"  Priors            {len(document['priors'])}, the most recent of {latest['study_date']} "
            f"({change['days']} days before, from {latest['source']}): burden {change['burden_points']:+.2f} points "
            f"({change['direction']})\n")


def _print_summary(document: dict, out_dir: Path) -> None:
    def ml(key: str) -> str:
        return f"{document[key]:9.1f} mL"

    print(
        f"Series {document['series_instance_uid']}\n"
        f"  {document['slices']} slices, voxel {' x '.join(f'{s:g}' for s in document['voxel_spacing_mm'])} mm, "
        f"model {document['model']}\n"
        f"  Lung volume       {ml('lung_volume_ml')}  (right {document['right_lung_volume_ml']:.1f}, "
        f"left {document['left_lung_volume_ml']:.1f})\n"
        f"  GGO               {ml('ggo_volume_ml')}  {document['ggo_percent']:6.2f} % of lung\n"
        f"  High opacity      {ml('high_opacity_volume_ml')}  {document['high_opacity_percent']:6.2f} % of lung\n"
        f"  Pneumonia burden  {document['burden_percent']:9.2f} %\n"
        f"{_priors_line(document)}"
        f"  SEG     {out_dir / 'seg.dcm'}\n"
        f"  SR      {out_dir / 'sr.dcm'}\n"
        f"  result  {out_dir / 'result.json'}"
    )


#: The ``analyze`` option of each configuration key its priors options set.
_PRIOR_OPTIONS = {"followup.url": "--priors-from", "followup.dimse.host": "--priors-from",
                  "followup.dimse.port": "--priors-from", "followup.dimse.ae_title": "--priors-from",
                  "followup.move_to": "--priors-move-to", "followup.move_to.ae_title": "--priors-move-to",
                  "followup.move_to.port": "--priors-move-to",
                  "followup.lookback_days": "--lookback-days",
                  "followup.max_priors": "--max-priors", "processing.weights": "--weights",
                  "selection.min_slices": "--min-slices"}


def _dicom_peer(address: str) -> dict:
    """``dicom://AE_TITLE@host:port`` as a ``followup.dimse`` mapping (checked by the configuration)."""
    from urllib.parse import urlsplit

    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError:
        port = None
    return {"name": "priors", "host": parts.hostname or "", "port": port if port is not None else -1,
            "ae_title": parts.username or ""}


def _prior_finder(args: argparse.Namespace):
    """The node's prior finder (:func:`lungburden.followup.priors.node_priors`) of the options'
    ``followup`` settings; credentials from the DICOMweb environment variables of archive mode.
    Raises :class:`~lungburden.config.ConfigError` for invalid values."""
    from lungburden.archive.tasks import credentials
    from lungburden.config import config_from_mapping
    from lungburden.followup.priors import node_priors

    username, password = credentials()
    processing = {key: value for key, value in (("model", args.model), ("weights", args.weights)) if value}
    source: dict = {"url": args.priors_from, "username": username, "password": password}
    if args.priors_from.startswith("dicom://"):
        source = {"dimse": _dicom_peer(args.priors_from)}
    if args.priors_move_to:
        title, _, port = args.priors_move_to.rpartition(":")
        source["move_to"] = {"ae_title": title, "port": int(port) if port.isdigit() else -1}
    config = config_from_mapping({
        "selection": {"min_slices": args.min_slices},
        "processing": processing,
        "followup": {"enabled": True, **source, "lookback_days": args.lookback_days, "max_priors": args.max_priors,
                     "store_results": not args.no_store_priors},
    }, source="analyze options")
    return node_priors(config, args.model)


def cmd_analyze(args: argparse.Namespace) -> int:
    """Find the series under INPUT_DIR, select one, analyse it and write SEG, SR and result.json;
    with ``--priors-from``, compare it with the patient's prior studies in that PACS."""
    from lungburden.dicom_io.selection import SelectionRules, select_series
    from lungburden.dicom_io.series import discover_series
    from lungburden.dicom_io.volume import LoadLimits, SeriesRejected
    from lungburden.pipeline import process_series

    input_dir = Path(args.input_dir)
    if not input_dir.exists():
        print(f"error: {input_dir} does not exist", file=sys.stderr)
        return EXIT_BAD_INPUT
    rules = SelectionRules(min_slices=args.min_slices)
    limits = LoadLimits(min_slices=args.min_slices)
    candidates = discover_series(input_dir)
    if args.series:
        candidates = [c for c in candidates if c.series_instance_uid == args.series]
    outcome = select_series(candidates, rules)
    for candidate, reason in outcome.rejected:
        print(f"not analysed: {candidate.describe()}: {reason}", file=sys.stderr)
    if not outcome.accepted:
        which = f"series {args.series}" if args.series else "analysable CT series"
        print(f"error: found no {which} under {input_dir}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from lungburden.config import ConfigError
    from lungburden.segmentation.registry import get_segmenter

    priors = None
    if args.priors_from:
        try:
            priors = _prior_finder(args)
        except ConfigError as exc:
            for key, value, message in exc.problems:
                print(f"error: {_PRIOR_OPTIONS.get(key, key)} {message} (got {value!r})", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        if priors is not None:  # the segmenter an analysed prior uses too (loaded once)
            from lungburden.archive.tasks import segmenter_for

            segmenter = segmenter_for(priors.model, priors.weights)
        else:
            segmenter = get_segmenter(args.model, weights=args.weights)
    except (KeyError, ValueError, OSError) as exc:  # unknown model, unreadable or foreign weights
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    started = time.perf_counter()

    def progress(step: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {step} ...", file=sys.stderr, flush=True)

    for candidate in outcome.accepted:
        print(f"analysing {candidate.describe()}", file=sys.stderr)
        try:
            outputs = process_series(candidate.files, Path(args.out), model=args.model, limits=limits,
                                     progress=progress, segmenter=segmenter, priors=priors)
        except SeriesRejected as exc:
            print(f"not analysed: {exc}", file=sys.stderr)
            continue
        progress("done")
        _print_summary(outputs.result, Path(args.out))
        return 0
    print(f"error: no series under {input_dir} could be analysed (reasons above)", file=sys.stderr)
    return EXIT_BAD_INPUT


def cmd_phantom(args: argparse.Namespace) -> int:
    """Write a synthetic chest CT series with its ground truth (labels.nii.gz, truth.json)."""
    from lungburden.phantom import PhantomSpec, generate_phantom, write_phantom_series

    spec = PhantomSpec(
        seed=args.seed, slices=args.slices, slice_spacing_mm=args.spacing,
        contrast=args.contrast, burden_percent=args.burden, neck_mm=args.neck,
    )
    phantom = generate_phantom(spec)
    identity = {k: v for k, v in (("PatientID", args.patient_id), ("PatientName", args.patient_name),
                                  ("IssuerOfPatientID", args.issuer), ("StudyDate", args.study_date)) if v}
    out = write_phantom_series(phantom, Path(args.out_dir), spec, identity or None)
    print(f"phantom series (seed {spec.seed}, {spec.slices} slices of {spec.slice_spacing_mm} mm) written to {out}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List the registered segmenters."""
    from lungburden.segmentation.registry import DEFAULT_SEGMENTER, available_segmenters

    for name in available_segmenters():
        print(f"{name}{'  (default)' if name == DEFAULT_SEGMENTER else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lungburden.config.schema import FollowupConfig

    parser = argparse.ArgumentParser(prog="lungburden", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lungburden {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="analyse a chest CT series found in a folder")
    p.add_argument("input_dir", help="folder (searched recursively) with the DICOM files")
    p.add_argument("--out", required=True, help="output folder for seg.dcm, sr.dcm, result.json")
    p.add_argument("--model", default=None, help="segmenter name (see `lungburden models`)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="network weights file, e.g. site-tuned weights (default: the shipped weights)")
    p.add_argument("--series", default=None, help="analyse this SeriesInstanceUID instead of the selected one")
    p.add_argument("--min-slices", type=int, default=16, help="reject series with fewer slices (default 16)")
    g = p.add_argument_group("follow-up", "compare with the patient's prior chest CTs in a PACS (docs/followup.md); "
                                          "credentials from $LUNGBURDEN_DICOMWEB_USERNAME and _PASSWORD")
    g.add_argument("--priors-from", default=None, metavar="URL",
                   help="the PACS holding the priors: its DICOMweb base URL, e.g. http://pacs:8042/dicom-web, "
                        "or dicom://AE_TITLE@host:port for C-FIND / C-GET / C-STORE (our AE title LUNGBURDEN)")
    g.add_argument("--priors-move-to", default=None, metavar="AE_TITLE:PORT",
                   help="with dicom://: retrieve the priors by C-MOVE to this AE title (known to the PACS), received "
                        "on this port, instead of by C-GET")
    g.add_argument("--lookback-days", type=int, default=FollowupConfig.lookback_days, metavar="DAYS",
                   help=f"priors dated at most this many days earlier (default {FollowupConfig.lookback_days})")
    g.add_argument("--max-priors", type=int, default=FollowupConfig.max_priors, metavar="N",
                   help=f"at most N priors, the most recent first (default {FollowupConfig.max_priors})")
    g.add_argument("--no-store-priors", action="store_true",
                   help="do not store the results of a prior analysed here (no lungburden SR of it in the PACS) "
                        "back into the PACS")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("phantom", help="write a synthetic chest CT series with ground truth")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slices", type=int, default=64)
    p.add_argument("--spacing", type=float, default=5.0, help="slice spacing = thickness in mm (default 5)")
    p.add_argument("--contrast", action="store_true", help="IV contrast (bright vessels, heart, aorta)")
    p.add_argument("--burden", type=float, default=None, help="target pneumonia burden in %% (default random)")
    p.add_argument("--neck", type=float, default=20.0, metavar="MM",
                   help="how far the scan range reaches above the lung apices (default 20; 40-70 adds more of the "
                        "shoulder girdle and the root of the neck)")
    p.add_argument("--patient-id", default=None, help="Patient ID (default PHANTOM-SEED<seed>)")
    p.add_argument("--patient-name", default=None, help="Patient's Name (default PHANTOM^SEED<seed>)")
    p.add_argument("--issuer", default=None, help="Issuer of Patient ID (default none)")
    p.add_argument("--study-date", default=None, metavar="YYYYMMDD", help="Study Date (default from the seed)")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("models", help="list the available segmenters")
    p.set_defaults(func=cmd_models)

    for module_name in COMMAND_MODULES:
        if importlib.util.find_spec(module_name) is not None:
            importlib.import_module(module_name).add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
