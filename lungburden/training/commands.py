"""Model development commands: ``lungburden model train|evaluate|calibrate|fit-filter|ensemble|compare``
(docs/training.md).

Added to the main CLI as the ``model`` group by :func:`add_subcommands`. They need the ``train``
extra (``pip install 'lungburden[train]'``: scikit-learn, matplotlib).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from lungburden.exit_codes import EXIT_BAD_INPUT
from lungburden.training.checkpoints import build_ensemble, export_checkpoint
from lungburden.training.evaluation import cv_checkpoints, evaluate_cv

log = logging.getLogger(__name__)


#: Held-out evaluation phantoms use seeds 1..100; training phantoms start at 1000 (disjoint).
EVAL_PHANTOM_SEED_START = 1
TRAIN_PHANTOM_SEED_START = 1000
#: Calibration phantoms (decision offsets) use seeds 500..; disjoint from both.
CALIBRATION_PHANTOM_SEED_START = 500
#: The high-opacity component filter is fitted on phantoms 600..999 (disjoint from all three).
FILTER_PHANTOM_SEED_START = 600


def _real_ct(args: argparse.Namespace) -> str | None:
    """``--real-ct``, else ``<--data-root or $LUNGBURDEN_DATA>/real-ct`` when it exists."""
    from lungburden.training.data import default_real_ct

    if args.real_ct:
        return str(args.real_ct)
    found = default_real_ct(args.data_root)
    return str(found) if found is not None else None


def _add_data_arguments(p: argparse.ArgumentParser, *, training: bool, seed_start: int | None = None,
                        phantoms: int = 0) -> None:
    g = p.add_argument_group("data")
    seed0 = seed_start if seed_start is not None else TRAIN_PHANTOM_SEED_START if training else EVAL_PHANTOM_SEED_START
    g.add_argument("--phantoms", type=int, default=phantoms, metavar="N",
                   help=f"number of synthetic phantoms (default {phantoms})")
    g.add_argument("--phantom-seed-start", type=int, default=seed0, metavar="S",
                   help=f"first phantom seed (default {seed0}; training uses 1000+, calibration 500+, "
                        "the component filter 600+, evaluation 1..100)")
    g.add_argument("--phantom-matrix", type=int, default=256, help="phantom in-plane matrix (default 256)")
    g.add_argument("--phantom-max-slices", type=int, default=96, help="most slices per phantom (default 96)")
    g.add_argument("--data-root", default=None, metavar="DIR",
                   help="root of the data folders (real-ct/, real-covid-slices/); default $LUNGBURDEN_DATA")
    g.add_argument("--real-ct", default=None, metavar="DIR",
                   help="real CT folder (TotalSegmentator crops, Lung-PET-CT-Dx study); "
                        "default DATA_ROOT/real-ct")
    g.add_argument("--real-ct-variants", type=int, default=0, metavar="N",
                   help="inserted-lesion variants per real volume (default 0: not used)")
    g.add_argument("--real-ct-seed-start", type=int, default=seed0, metavar="S",
                   help=f"first lesion-insertion seed (default {seed0})")
    g.add_argument("--real-ct-include-study", action="store_true",
                   help="also use the Lung-PET-CT-Dx study (the specificity test case; off by default)")
    if not training:
        g.add_argument("--real-study", action="store_true",
                       help="add the real volumes without inserted lesions (specificity; the study's tumour "
                            "is high opacity) — with --real-ct-include-study for the Lung-PET-CT-Dx study")
    g.add_argument("--nifti", action="append", default=[], metavar="DIR", help="NIfTI image/mask dataset folder")
    g.add_argument("--nifti-layout", default="generic", choices=["medseg", "mosmed", "covid19ctseg", "generic"])
    g.add_argument("--label-map", default=None, metavar="MAP",
                   help='mask value → class, e.g. "1:ggo,2:high,3:high" (classes lung, ggo, high, lesion, '
                        "background; default per layout)")
    g.add_argument("--dicom-seg", action="append", default=[], metavar="DIR",
                   help="folder with DICOM CT series and DICOM SEG instances referencing them")
    g.add_argument("--seg-map", default=None, metavar="MAP",
                   help='segment (number, label or SCHEME-VALUE code) → class, e.g. "Infection:lesion"')
    g.add_argument("--cache", default=None, metavar="DIR", help="preprocessed-case cache (default ~/.cache/...)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the case cache")


def _data_spec(args: argparse.Namespace):
    from lungburden.training.data import DataSpec

    return DataSpec(
        phantoms=args.phantoms,
        phantom_seed_start=args.phantom_seed_start,
        phantom_matrix=args.phantom_matrix,
        phantom_max_slices=args.phantom_max_slices,
        real_ct=_real_ct(args),
        real_ct_variants=args.real_ct_variants,
        real_ct_seed_start=args.real_ct_seed_start,
        real_ct_include_study=args.real_ct_include_study,
        real_ct_clean=bool(getattr(args, "real_study", False)),
        nifti=list(args.nifti),
        nifti_layout=args.nifti_layout,
        label_map=args.label_map,
        dicom_seg=list(args.dicom_seg),
        seg_map=args.seg_map,
    )


def _cache_dir(args: argparse.Namespace) -> Path | None:
    from lungburden.training.data import default_cache_dir

    if args.no_cache:
        return None
    return Path(args.cache) if args.cache else default_cache_dir()


def _hparams(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------------
# train


def cmd_train(args: argparse.Namespace) -> int:
    """Train a model (section 2.6) with k-fold cross-validation (2.7) or the final model."""
    import torch

    from lungburden.training.trainer import TrainConfig, run_training

    config = TrainConfig(
        model=args.model, model_hparams=_hparams(args.hparam), size=args.size, lr=args.lr, optimizer=args.optimizer,
        batch=args.batch,
        micro_batch=args.micro_batch, windows_per_epoch=args.windows_per_epoch,
        val_windows_per_case=args.val_windows_per_case, plateau_patience=args.patience, stop_lr=args.stop_lr,
        max_epochs=args.max_epochs, time_budget_min=args.time_budget, folds=args.folds, fold=args.fold,
        final=args.final, val_fraction=args.val_fraction, split_seed=args.split_seed, seed=args.seed,
        augment=not args.no_augment, slab=args.slab, high_opacity_boost=args.high_opacity_boost,
        precision=args.precision, ema_decay=args.ema_decay, threads=args.threads, device=args.device,
        workers=args.workers, init=args.init, resume=args.resume, progress=not args.quiet,
    )
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        results = run_training(config, _data_spec(args), Path(args.out), _cache_dir(args))
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for r in results:
        last = r.history[-1] if r.history else None
        dice = " ".join(f"{k} {v:.3f}" for k, v in (last.val_dice if last else {}).items() if v is not None)
        print(f"{r.split.name}: {r.epochs} epochs, best epoch {r.best_epoch} (val loss {r.best_val_loss:.4f}), "
              f"final lr {r.final_lr:.0e}, stopped: {r.stop_reason}; last val Dice {dice}\n  -> {r.best_checkpoint}")
    if args.export:
        if len(results) != 1:
            print("error: --export needs a single model (--final or --fold k)", file=sys.stderr)
            return EXIT_BAD_INPUT
        export_checkpoint(results[0].best_checkpoint, Path(args.export))
        print(f"exported {results[0].best_checkpoint} -> {args.export}")
    return 0


# --------------------------------------------------------------------------------------------------
# ensemble


def cmd_ensemble(args: argparse.Namespace) -> int:
    """Combine trained ConvLSTM checkpoints into one ensemble checkpoint (mean of their logits)."""
    try:
        out = build_ensemble([Path(p) for p in args.members], Path(args.out))
    except (ValueError, KeyError, RuntimeError, TypeError, OSError) as exc:  # bad or unreadable checkpoints
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"ensemble of {len(args.members)} networks -> {out} ({out.stat().st_size / 2**20:.1f} MB)")
    return 0


# --------------------------------------------------------------------------------------------------
# evaluate


def _precision_info(segmenter) -> dict[str, str]:
    """``{"precision": …}`` for a report's info when the segmenter records one (network models)."""
    parameters = (segmenter.info.parameters or {}) if segmenter is not None else {}
    return {"precision": parameters["precision"]} if "precision" in parameters else {}


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a model against ground truth and write report.md / report.json / PNGs (section 2.8)."""
    import torch

    from lungburden.training.data import CaseIndex
    from lungburden.training.evaluation import build_segmenter, cpu_description, evaluate_cases, write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.nifti_pairs:
        return _evaluate_nifti_pairs(args, out)
    started = time.perf_counter()
    try:
        if args.cv:
            results, info = evaluate_cv(Path(args.cv), progress=not args.quiet, threads=args.threads)
        else:
            index = CaseIndex(_data_spec(args).build_sources())
            if not index.ids():
                print("error: no evaluation cases: give --phantoms, --real-study, --real-ct-variants, --nifti or "
                      "--dicom-seg", file=sys.stderr)
                return EXIT_BAD_INPUT
            segmenter = build_segmenter(args.model, args.weights, args.threads)
            results = evaluate_cases(segmenter, index.iter_raw(index.ids()), progress=not args.quiet)
            info = {"model": args.weights or args.model or "default segmenter", "cases": len(results),
                    **_precision_info(segmenter)}
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    info.update({"command": " ".join(sys.argv), "cpu": cpu_description(), "threads": torch.get_num_threads(),
                 "wall time": f"{time.perf_counter() - started:.0f} s"})
    summary = write_report(results, out, title="lungburden evaluation", info=info, plots=not args.no_plots)
    for name, d in summary.dice.items():
        mean = "-" if d.mean is None else f"{d.mean:.3f}"
        pooled = "-" if d.pooled is None else f"{d.pooled:.3f}"
        print(f"Dice {name:13s} mean {mean} (n={d.n})  pooled {pooled}")
    burden = summary.agreement["burden_percent"]
    print(f"burden bias {burden.bland_altman.bias:+.2f} % [LoA {burden.bland_altman.loa_low:+.2f}, "
          f"{burden.bland_altman.loa_high:+.2f}]; report in {out / 'report.md'}")
    return 0


def _evaluate_nifti_pairs(args: argparse.Namespace, out: Path) -> int:
    """``model evaluate --nifti-pairs DIR``: real CT with expert lesion masks (training.nifti_eval)."""
    from lungburden.training.evaluation import build_segmenter
    from lungburden.training.nifti_eval import evaluate_nifti

    try:
        segmenter = build_segmenter(args.model, args.weights, args.threads)
        result = evaluate_nifti(Path(args.nifti_pairs), segmenter.segment, out_dir=out, copies=args.slice_copies)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(result.summary())
    print(f"per-case table and overlays in {out}")
    return 0


# --------------------------------------------------------------------------------------------------
# calibrate


def _unseen_cases(args: argparse.Namespace, weights: Path, what: str, seed_start: int):
    """The data arguments' case index and ids for ``what`` (calibrating, fitting the filter) on
    ``weights``, and that checkpoint's dict; refuses the held-out evaluation phantoms (seeds
    1..100), the cases the network's training used (its split) and an empty selection."""
    from lungburden.segmentation.networks import load_checkpoint
    from lungburden.training.calibration import overlapping_ids
    from lungburden.training.data import CaseIndex

    spec = _data_spec(args)
    if spec.phantoms and spec.phantom_seed_start < EVAL_PHANTOM_SEED_START + 100 and \
            spec.phantom_seed_start + spec.phantoms > EVAL_PHANTOM_SEED_START:
        raise ValueError(f"phantom seeds 1..100 are the held-out evaluation set: {what} on them would make "
                         f"its figures optimistic (use --phantom-seed-start {seed_start})")
    _, checkpoint = load_checkpoint(weights)
    index = CaseIndex(spec.build_sources())
    ids = index.ids()
    if not ids:
        raise ValueError(f"no cases for {what}: give --phantoms, --real-ct-variants, --nifti or --dicom-seg")
    used = overlapping_ids(ids, checkpoint)
    if used:
        raise ValueError(f"{len(used)} of the cases were used to train {weights} (e.g. {used[0]}); use cases "
                         f"the training never saw for {what}")
    return index, ids, checkpoint


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Fit per-class logit offsets on validation cases and write a calibrated checkpoint
    (lungburden.training.calibration)."""
    import torch

    from lungburden.segmentation.convlstm import DEFAULT_WEIGHTS, ConvLSTMSegmenter
    from lungburden.training.calibration import (
        collect_cases,
        fit_offsets,
        write_calibrated_checkpoint,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    weights = Path(args.weights) if args.weights else DEFAULT_WEIGHTS
    started = time.perf_counter()
    try:
        grid = [float(v) for v in args.grid.split(",") if v.strip()]
        if not grid:
            raise ValueError("--grid needs at least one offset")
        index, ids, _ = _unseen_cases(args, weights, "calibrating", CALIBRATION_PHANTOM_SEED_START)
        # fit from the raw network and rules, whatever the file holds: no offsets, and no component
        # filter (the calibrated copy drops it, since it learnt the uncalibrated labels)
        segmenter = ConvLSTMSegmenter(weights, threads=args.threads, high_opacity_filter=False)
        segmenter.logit_offsets = None
        cases = collect_cases(segmenter, index.iter_raw(ids))
        calibration = fit_offsets(segmenter, cases, grid=grid, tolerance=args.tolerance,
                                  progress=None if args.quiet else (lambda s: print(s.summary(), flush=True)))
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    info = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source_weights": str(weights), "wall_seconds": round(time.perf_counter() - started, 1)}
    write_calibrated_checkpoint(weights, args.out, calibration, info)
    print(f"before: {calibration.before.summary()}")
    print(f"after:  {calibration.after.summary()}")
    print(f"wrote {args.out} ({len(cases)} cases, {len(calibration.tried)} offset sets tried, "
          f"{info['wall_seconds']:.0f} s)")
    return 0


# --------------------------------------------------------------------------------------------------
# fit-filter


def cmd_fit_filter(args: argparse.Namespace) -> int:
    """Fit the learned high-opacity component filter of a network on cases it never trained on and
    write a checkpoint that carries it (lungburden.segmentation.component_filter)."""
    import torch

    from lungburden.segmentation.component_filter import CHECKPOINT_KEY
    from lungburden.segmentation.convlstm import DEFAULT_WEIGHTS, ConvLSTMSegmenter
    from lungburden.segmentation.networks import write_checkpoint
    from lungburden.training.second_stage import fit_from_cases

    if args.threads:
        torch.set_num_threads(args.threads)
    weights = Path(args.weights) if args.weights else DEFAULT_WEIGHTS
    started = time.perf_counter()
    try:
        if args.folds < 2:
            raise ValueError(f"--folds must be at least 2, got {args.folds}")
        if Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a folder; give the checkpoint file to write")
        index, ids, checkpoint = _unseen_cases(args, weights, "fitting the filter", FILTER_PHANTOM_SEED_START)
        segmenter = ConvLSTMSegmenter(weights, threads=args.threads, high_opacity_filter=False)
        fit = fit_from_cases(segmenter, index.iter_raw(ids), folds=args.folds,
                             progress=None if args.quiet else (lambda line: print(line, flush=True)))
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    stored = fit.filter.to_dict()
    stored["provenance"].update({"command": " ".join(sys.argv),
                                 "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 "source_weights": str(weights),
                                 "wall_seconds": round(time.perf_counter() - started, 1)})
    checkpoint[CHECKPOINT_KEY] = stored
    try:
        write_checkpoint(args.out, checkpoint)
    except OSError as exc:
        print(f"error: cannot write {args.out}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if fit.folds_skipped:
        print(f"warning: {fit.folds_skipped} of {args.folds} cross-validation folds had only one kind of component "
              "left to fit on; their cases count as unfiltered in the figures below")
    print(f"high-opacity volume Spearman r over the {len(fit.cases)} cases: {fit.spearman_before:.4f} without the "
          f"filter, {fit.spearman_cv:.4f} with it ({args.folds}-fold cross-validation by case; it relabelled "
          f"{fit.removed_false_ml:.0f} mL that is mostly not high opacity and {fit.removed_true_ml:.0f} mL that is)")
    print(f"wrote {args.out} ({stored['provenance']['components']} components, "
          f"{stored['provenance']['wall_seconds']:.0f} s)")
    return 0


# --------------------------------------------------------------------------------------------------
# compare


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{what} {item!r} is not NAME=PATH")
        out[name] = value
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    """Several models side by side: Dice on the same cases and compute cost (paper Table 4)."""
    import torch

    from lungburden.training.data import CaseIndex
    from lungburden.training.evaluation import (
        ModelComparison,
        build_segmenter,
        cpu_description,
        evaluate_cases,
        measure_compute,
        summarize,
        write_comparison,
        write_report,
        write_timing_volume,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        weights = _pairs(args.weights, "--weights")
        cvs = _pairs(args.cv, "--cv")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    index = CaseIndex(_data_spec(args).build_sources())
    sizes = [int(s) for s in args.timing_slices.split(",") if s.strip()] if not args.no_timing else []
    out = Path(args.out)
    rows = []
    tmp = tempfile.TemporaryDirectory(prefix="lungburden-timing-")
    volumes: dict[int, Path] = {}
    for name in names:
        ckpt = weights.get(name)
        segmenter = None
        try:
            if name in cvs:
                results, _ = evaluate_cv(Path(cvs[name]), progress=not args.quiet, threads=args.threads)
                ckpt = ckpt or str(cv_checkpoints(Path(cvs[name]))[0])
            elif index.ids():
                segmenter = build_segmenter(name, ckpt, args.threads)
                results = evaluate_cases(segmenter, index.iter_raw(index.ids()), progress=not args.quiet)
            else:
                results = []
        except (ValueError, FileNotFoundError, KeyError) as exc:
            print(f"{name}: not evaluated: {exc}", file=sys.stderr)
            rows.append(ModelComparison(name, ckpt, None, {}))
            continue
        if results:
            write_report(results, out / name, title=f"lungburden evaluation: {name}",
                         info={"model": ckpt or name, **_precision_info(segmenter)}, plots=not args.no_plots)
        compute = {}
        for n in sizes:
            print(f"{name}: timing {n} slices ...", file=sys.stderr)
            if n not in volumes:
                volumes[n] = write_timing_volume(Path(tmp.name) / f"timing-{n}.npz", n, args.timing_rows)
            compute[f"{n}x{args.timing_rows}"] = measure_compute(name, ckpt, volumes[n], threads=args.threads)
        rows.append(ModelComparison(name, ckpt, summarize(results) if results else None, compute))
    info = {"command": " ".join(sys.argv), "cpu": cpu_description(), "threads": args.threads or torch.get_num_threads(),
            "cases": len(index.ids()) if not cvs else "each model's cross-validation test sets"}
    tmp.cleanup()
    path = write_comparison(rows, out, info)
    print(path.read_text())
    return 0


# --------------------------------------------------------------------------------------------------


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``model`` group (``train``, ``evaluate``, ``calibrate``, ``fit-filter``, ``ensemble``,
    ``compare``) to the ``lungburden`` parser."""
    group = subparsers.add_parser("model", help="model development: train, evaluate, calibrate, fit the second "
                                  "stage, build ensembles, compare (needs the train extra)",
                                  description="Model development commands (docs/training.md).")
    sub = group.add_subparsers(dest="model_command", required=True, metavar="COMMAND")
    p = sub.add_parser("train", help="train a segmentation network (k-fold CV or the final model)",
                       description=cmd_train.__doc__)
    p.add_argument("--out", required=True, help="run folder (fold-K/ or final/ with best.pt, last.pt, state.pt)")
    p.add_argument("--model", default="convlstm", choices=["convlstm", "unet2d", "unet3d"])
    p.add_argument("--size", type=int, default=None, help="network input size S (default: the preprocessing's)")
    p.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                   help="model constructor argument (JSON value), e.g. --hparam hidden=16")
    p.add_argument("--batch", type=int, default=32, help="windows per optimiser step (default 32)")
    p.add_argument("--micro-batch", type=int, default=8, help="windows per forward pass (gradient accumulation)")
    p.add_argument("--slab", type=int, default=0, metavar="N",
                   help="convlstm: train on slabs of N consecutive targets (shared per-slice work, ~4x faster "
                        "on CPU); 0 = independent windows (default)")
    p.add_argument("--high-opacity-boost", type=float, default=0.0, metavar="K",
                   help="draw each case with weight 1 + K x its high-opacity share of the lung (white lungs, "
                        "effusions seen more often); default 0 = every case alike")
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="bfloat16 autocast of the network while training (weights and loss stay float32); auto "
                        "(default) = bfloat16 where the CPU (AMX / AVX512-BF16) or GPU computes it natively")
    p.add_argument("--ema-decay", type=float, default=0.0, metavar="D",
                   help="validate, select and save an exponential moving average of the weights with decay D "
                        "per optimiser step (e.g. 0.99); default 0 = the raw weights")
    p.add_argument("--lr", type=float, default=1e-3, help="initial learning rate (default 1e-3)")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"],
                   help="sgd (momentum 0.9, the paper's) or adam (faster on a CPU budget; default sgd)")
    p.add_argument("--patience", type=int, default=10, help="ReduceLROnPlateau patience in epochs (default 10)")
    p.add_argument("--stop-lr", type=float, default=1e-7, help="stop when the lr reaches this (default 1e-7)")
    p.add_argument("--windows-per-epoch", type=int, default=512, help="sampled windows per epoch (default 512)")
    p.add_argument("--val-windows-per-case", type=int, default=12, help="validation windows per case (default 12)")
    p.add_argument("--max-epochs", type=int, default=None, help="stop after this many epochs")
    p.add_argument("--time-budget", type=float, default=None, metavar="MIN", help="stop each fold after MIN minutes")
    p.add_argument("--folds", type=int, default=5, help="k of the k-fold cross-validation (default 5)")
    p.add_argument("--fold", type=int, default=None, help="train only this fold (default: all)")
    p.add_argument("--final", action="store_true", help="one model on all cases (train + val), for shipping")
    p.add_argument("--val-fraction", type=float, default=0.2, help="validation share of the non-test cases")
    p.add_argument("--seed", type=int, default=0, help="initialisation / sampling seed")
    p.add_argument("--split-seed", type=int, default=0, help="fold split seed")
    p.add_argument("--no-augment", action="store_true", help="disable the section 2.4 augmentation")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu",
                   help="where the network trains: cpu, cuda, cuda:N or auto (default cpu; data stay on the CPU)")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="processes that generate/preprocess the cases before training (default 0: this one)")
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="start from this checkpoint's weights (fine-tuning; its hyperparameters are used, "
                        "and --model must name its model, e.g. --model unet3d for a UNet3D checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/<fold>/state.pt")
    p.add_argument("--export", default=None, metavar="PATH", help="copy the best checkpoint here (e.g. "
                   "lungburden/weights/convlstm.pt); single model only")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_data_arguments(p, training=True)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a model against ground truth (Dice, volumes, Bland-Altman)",
                       description=cmd_evaluate.__doc__)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", default=None, help="registered segmenter name (see `lungburden models`)")
    which.add_argument("--weights", default=None, metavar="PATH",
                       help="a checkpoint written by `lungburden model train`")
    which.add_argument("--cv", default=None, metavar="DIR",
                       help="a cross-validation run folder: each fold's model on its own test cases")
    p.add_argument("--nifti-pairs", default=None, metavar="DIR",
                   help="real CT with expert lesion masks: NAME_ct.nii.gz + NAME_mask.nii.gz (1 GGO, 2 consolidation); "
                        "per-class Dice, area ratio, Spearman r with bootstrap intervals, overlays of the worst cases")
    p.add_argument("--slice-copies", type=int, default=12, metavar="N",
                   help="with --nifti-pairs: a single slice is analysed as a series of N copies (default 12)")
    p.add_argument("--out", required=True, help="folder for report.md, report.json and the plots")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")
    _add_data_arguments(p, training=False)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("calibrate", help="fit per-class decision offsets of a network on validation cases",
                       description=cmd_calibrate.__doc__)
    p.add_argument("--weights", default=None, metavar="PATH", help="checkpoint to calibrate (default: the shipped)")
    p.add_argument("--out", required=True, metavar="PATH", help="calibrated checkpoint to write (may be --weights)")
    p.add_argument("--grid", default="-0.5,0,0.5,1,1.5", help="offsets tried per class (default -0.5,0,0.5,1,1.5)")
    p.add_argument("--tolerance", type=float, default=0.002,
                   help="largest allowed drop of the GGO / high-opacity volume Spearman r (default 0.002)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true")
    _add_data_arguments(p, training=False, seed_start=CALIBRATION_PHANTOM_SEED_START, phantoms=60)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("fit-filter", help="fit a network's learned high-opacity component filter on unseen cases",
                       description=cmd_fit_filter.__doc__)
    p.add_argument("--weights", default=None, metavar="PATH", help="checkpoint (default: the shipped)")
    p.add_argument("--out", required=True, metavar="PATH", help="checkpoint to write (may be --weights)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds for the printed figures (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true")
    _add_data_arguments(p, training=False, seed_start=FILTER_PHANTOM_SEED_START, phantoms=400)
    p.set_defaults(func=cmd_fit_filter)

    p = sub.add_parser("ensemble", help="combine trained ConvLSTM checkpoints into one ensemble checkpoint",
                       description=cmd_ensemble.__doc__)
    p.add_argument("members", nargs="+", metavar="CKPT", help="trained ConvLSTM checkpoints (at least two)")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="ensemble checkpoint to write (e.g. lungburden/weights/convlstm.pt)")
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("compare", help="compare models side by side: Dice and CPU time / memory (Table 4)",
                       description=cmd_compare.__doc__)
    p.add_argument("--models", default="convlstm,unet2d,unet3d,threshold",
                   help="comma-separated model names (default convlstm,unet2d,unet3d,threshold)")
    p.add_argument("--weights", action="append", default=[], metavar="NAME=PATH", help="checkpoint of a model")
    p.add_argument("--cv", action="append", default=[], metavar="NAME=DIR",
                   help="cross-validation folder of a model (Dice over its folds' test sets, as Table 4)")
    p.add_argument("--timing-slices", default="16,120", help="series lengths to time (default 16,120)")
    p.add_argument("--timing-rows", type=int, default=512, help="matrix of the timing series (default 512)")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")
    _add_data_arguments(p, training=False)
    p.set_defaults(func=cmd_compare)
