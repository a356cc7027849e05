"""The ``scalr-zoo`` command line (also ``python -m scalr_zoo``).

Every command has ``--help``. Bad input ends with exit code 2 and one line on
stderr (``scalr-zoo: error: ...``), never a traceback; ``--debug`` shows it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .io import scan_stem

__all__ = ["main"]

logger = logging.getLogger("scalr_zoo.cli")

#: Errors that are the user's input, reported as one line.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ImportError, OSError, KeyError, LookupError)

FEATURE_SUFFIXES = (".npy", ".npz", ".safetensors", ".ply")
LABEL_SUFFIXES = (".npy", ".npz")


class CommandError(Exception):
    """A user-facing error of a command (printed as one line)."""


# --- shared pieces ---------------------------------------------------------------


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", "-m", required=True,
        help="registry name (see 'scalr-zoo list'), hf-hub:owner/repo[@rev], a save_pretrained "
        "directory, or an original .pth (with --config)",
    )
    parser.add_argument("--config", type=Path, help="JSON config for a bare original .pth checkpoint")
    parser.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")
    parser.add_argument("--dtype", choices=("float32", "bf16", "fp16"), default="float32", help="autocast dtype")
    parser.add_argument(
        "--sensor",
        help="intensity normalisation: nuscenes, semantickitti, pandar64, pandargt, raw, or MEAN,STD "
        "(default: the model's own)",
    )
    parser.add_argument("--input-format", help="force the file format (kitti, nuscenes, pcd, ply, las, npy, npz)")
    parser.add_argument("--local-files-only", action="store_true", help="never touch the network")


def _parse_sensor(value: str | None) -> str | tuple[float, float] | None:
    if value is None or "," not in value:
        return value
    try:
        mean, std = (float(v) for v in value.split(","))
    except ValueError:
        raise CommandError(f"--sensor {value!r}: give a preset name or MEAN,STD") from None
    return mean, std


def _load_model(args: argparse.Namespace):
    import scalr_zoo

    kwargs: dict[str, Any] = {"device": args.device}
    if args.config is not None:
        kwargs["config"] = json.loads(Path(args.config).read_text())
    if args.local_files_only:
        kwargs["local_files_only"] = True
    return scalr_zoo.load(args.model, **kwargs)


def _extract_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"sensor": _parse_sensor(args.sensor), "dtype": None if args.dtype == "float32" else args.dtype}


def _output_paths(inputs: Sequence[Path], output: Path, suffix_choices: Sequence[str], default_suffix: str) -> list[Path]:
    """One output per input: ``output`` itself for a single input with a known suffix, else ``output/STEM.ext``."""
    if len(inputs) == 1 and output.suffix in suffix_choices:
        return [output]
    if output.suffix in suffix_choices:
        raise CommandError(f"{len(inputs)} inputs need an output directory, not the file {output}")
    output.mkdir(parents=True, exist_ok=True)
    return [output / (scan_stem(path) + default_suffix) for path in inputs]


def _progress(items: Sequence[Any], desc: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="file", disable=len(items) < 2 or not sys.stderr.isatty())


def _inputs(paths: Sequence[str]) -> list[Path]:
    files = [Path(p) for p in paths]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise CommandError(f"no such file: {', '.join(missing)}")
    return files


# --- commands --------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    import scalr_zoo

    filters = {k: v for k, v in (("family", args.family), ("task", args.task), ("dataset", args.dataset)) if v}
    names = scalr_zoo.list_models(args.pattern, **filters)
    if args.json:
        print(json.dumps(names, indent=2))
    else:
        for name in names:
            print(name)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import scalr_zoo

    info = scalr_zoo.model_info(args.name)
    print(json.dumps(info.to_dict() if hasattr(info, "to_dict") else info, indent=2, default=str))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    import scalr_zoo

    path = scalr_zoo.download(args.name, local_files_only=args.local_files_only)
    print(path)
    return 0


def _save_features(path: Path, features: np.ndarray, points: np.ndarray, fov_mask: np.ndarray) -> None:
    from . import viz
    from .io import atomic_write

    if path.suffix == ".npy":
        with atomic_write(path) as handle:
            np.save(handle, features)
    elif path.suffix == ".npz":
        with atomic_write(path) as handle:
            np.savez(handle, features=features, fov_mask=fov_mask)
    elif path.suffix == ".safetensors":
        from safetensors.numpy import save

        with atomic_write(path) as handle:
            handle.write(save({"features": features, "fov_mask": fov_mask.astype(np.uint8)}))
    elif path.suffix == ".ply":
        viz.save_ply(path, points, viz.pca_colors(features))
    else:
        raise CommandError(f"unknown output type {path.suffix!r}; use one of {FEATURE_SUFFIXES}")


def cmd_extract(args: argparse.Namespace) -> int:
    from .io import read_points

    inputs = _inputs(args.files)
    outputs = _output_paths(inputs, Path(args.output), FEATURE_SUFFIXES, "." + args.format)
    model = _load_model(args)
    kwargs = _extract_kwargs(args)
    for source, target in zip(_progress(inputs, "extract"), outputs):
        points = read_points(source, format=args.input_format)
        features, mask = model.extract(points, head=args.head, return_fov_mask=True, **kwargs)
        _save_features(target, features.cpu().numpy(), points, mask.cpu().numpy())
        logger.info("%s -> %s %s", source, target, tuple(features.shape))
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from .io import atomic_write, read_points

    inputs = _inputs(args.files)
    outputs = _output_paths(inputs, Path(args.output), LABEL_SUFFIXES, "." + args.format)
    model = _load_model(args)
    kwargs = _extract_kwargs(args)
    for source, target in zip(_progress(inputs, "segment"), outputs):
        result = model.segment(read_points(source, format=args.input_format), **kwargs)
        with atomic_write(target) as handle:
            if target.suffix == ".npy":
                np.save(handle, result.labels)
            else:
                np.savez(
                    handle,
                    labels=result.labels,
                    names=result.names,
                    probabilities=result.probabilities,
                    class_names=np.asarray(result.class_names),
                    fov_mask=result.fov_mask,
                )
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    from . import viz
    from .io import read_points

    source = _inputs([args.file])[0]
    output = Path(args.output)
    if output.suffix not in (".png", ".html", ".ply"):
        raise CommandError(f"-o must end in .png, .html or .ply, got {output.name!r}")
    points = read_points(source, format=args.input_format)
    model = _load_model(args)
    if args.mode == "labels":
        result = model.segment(points, **_extract_kwargs(args))
        colors = viz.label_colors(result.labels, len(result.class_names))
        legend = {name: viz.label_colors(np.array([i]), len(result.class_names))[0] for i, name in enumerate(result.class_names)}
        features = None
    else:
        features = model.extract(points, **_extract_kwargs(args)).cpu().numpy()
        if args.mode == "similarity":
            if not 0 <= args.query < len(points):
                raise CommandError(f"--query {args.query} is not a point index (0..{len(points) - 1})")
            colors = viz.similarity_colors(features, args.query)
        else:
            colors = viz.pca_colors(features)
        legend = None
    if output.suffix == ".png":
        viz.save_bev_png(output, points, colors, title=f"{source.name}: {args.mode}", legend=legend)
    elif output.suffix == ".ply":
        viz.save_ply(output, points, colors)
    else:
        viz.save_html(output, points, features=features, colors=colors, legend=legend, title=source.name)
    print(output)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_archive, convert_checkpoint, convert_registered
    from .loading import _as_config

    if args.all:
        hashes = convert_registered(args.output, overwrite=args.overwrite, local_files_only=args.local_files_only)
        print(json.dumps(hashes, indent=2))
        return 0
    if not args.source:
        raise CommandError("give a checkpoint (.pth or release .tar.gz) or --all")
    if (args.config is None) == (args.name is None):
        raise CommandError("give the architecture with exactly one of --config JSON or --name REGISTRY_NAME")
    config = _as_config(json.loads(Path(args.config).read_text()) if args.config else args.name)
    source = Path(args.source)
    convert = convert_archive if source.name.endswith((".tar.gz", ".tgz")) else convert_checkpoint
    print(convert(source, config, args.output, overwrite=args.overwrite))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    import scalr_zoo

    model = scalr_zoo.load(args.source, device="cpu")
    url = model.push_to_hub(args.repo_id, private=args.private, commit_message=args.message)
    print(url)
    return 0


def cmd_extract_dataset(args: argparse.Namespace) -> int:
    from .dataset import distributed_context, extract_dataset

    context = distributed_context(args.device)
    try:
        args.device = str(context.device)
        model = _load_model(args)
        result = extract_dataset(
            model, args.input_dir, args.output, model_name=args.model, batch_size=args.batch_size,
            num_workers=args.num_workers, sensor=_parse_sensor(args.sensor),
            dtype=None if args.dtype == "float32" else args.dtype, head=args.head, context=context,
        )
    finally:
        context.close()
    if context.rank == 0:
        print(f"{len(result.written)} written, {len(result.skipped)} already there (rank 0); index: {result.index}")
    if result.failed:
        raise CommandError(f"{len(result.failed)} scans failed, e.g. {next(iter(result.failed.items()))}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .train import fit

    model = _load_model(args)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    result = fit(
        model, args.train_dir, mode=args.mode, val_dir=args.val_dir, classes=classes, num_classes=args.num_classes,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, lovasz_weight=args.lovasz_weight,
        sensor=_parse_sensor(args.sensor), dtype=None if args.dtype == "float32" else args.dtype,
        num_workers=args.num_workers, seed=args.seed,
    )
    output = Path(args.output)
    model.save_pretrained(output)
    from .io import atomic_write

    with atomic_write(output / "metrics.json", "w") as handle:
        json.dump(result.to_dict(), handle, indent=2)
    print(result.scores.table())
    print(f"mIoU {result.miou:.4f} on {result.evaluated_on}; model saved to {output}")
    return 0


# --- parser ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scalr-zoo",
        description="Pretrained WaffleIron / ScaLR lidar backbones: list, download, extract, segment, visualise.",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log progress")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(func=func)
        return sub

    sub = command("list", cmd_list, "list the registered models")
    sub.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern, e.g. '*kitti*'")
    sub.add_argument("--family")
    sub.add_argument("--task")
    sub.add_argument("--dataset")
    sub.add_argument("--json", action="store_true", help="print JSON")

    sub = command("info", cmd_info, "show a model's manifest entry (architecture, preprocessing, classes, source)")
    sub.add_argument("name")

    sub = command("download", cmd_download, "download, verify, convert and cache a model; print its folder")
    sub.add_argument("name")
    sub.add_argument("--local-files-only", action="store_true", help="only check the cache")

    sub = command("extract", cmd_extract, "per-point features of point-cloud files")
    sub.add_argument("files", nargs="+", metavar="FILE")
    sub.add_argument("-o", "--output", required=True, help="output file (one input) or directory")
    sub.add_argument("--format", choices=[s[1:] for s in FEATURE_SUFFIXES], default="npy",
                     help="output type when -o is a directory (default npy)")
    sub.add_argument("--head", action="store_true", help="head outputs instead of backbone features")
    _add_model_options(sub)

    sub = command("segment", cmd_segment, "class id of every point (models with a class head)")
    sub.add_argument("files", nargs="+", metavar="FILE")
    sub.add_argument("-o", "--output", required=True, help="output file (one input) or directory")
    sub.add_argument("--format", choices=[s[1:] for s in LABEL_SUFFIXES], default="npy",
                     help="npy: class ids; npz: also names and probabilities (when -o is a directory)")
    _add_model_options(sub)

    sub = command("viz", cmd_viz, "picture of a scan's features: PNG (bird's-eye view), HTML (3D, interactive) or PLY")
    sub.add_argument("file", metavar="FILE")
    sub.add_argument("-o", "--output", required=True, help="OUT.png, OUT.html or OUT.ply")
    sub.add_argument("--mode", choices=("pca", "similarity", "labels"), default="pca")
    sub.add_argument("--query", type=int, default=0, help="point index for --mode similarity")
    _add_model_options(sub)

    sub = command("convert", cmd_convert, "convert original checkpoints into Hub-ready folders")
    sub.add_argument("source", nargs="?", help="original .pth or release .tar.gz")
    sub.add_argument("-o", "--output", required=True, help="output folder")
    sub.add_argument("--config", help="JSON config (for a checkpoint outside the registry)")
    sub.add_argument("--name", help="registry name whose config applies")
    sub.add_argument("--all", action="store_true", help="every registered archive, into OUTPUT/NAME/")
    sub.add_argument("--overwrite", action="store_true", help="replace existing folders")
    sub.add_argument("--local-files-only", action="store_true", help="with --all: only archives already cached")

    sub = command("extract-dataset", cmd_extract_dataset,
                  "features of every scan below a folder, one STEM.npy each (resumable; scales out with torchrun)")
    sub.add_argument("input_dir", metavar="INPUT_DIR")
    sub.add_argument("-o", "--output", required=True, metavar="OUT_DIR")
    sub.add_argument("--batch-size", type=int, default=4, help="scans per forward pass")
    sub.add_argument("--num-workers", type=int, default=2, help="DataLoader workers reading and preprocessing")
    sub.add_argument("--head", action="store_true", help="head outputs instead of backbone features")
    _add_model_options(sub)

    sub = command("finetune", cmd_finetune,
                  "linear-probe or fine-tune on a folder of labelled scans; report per-class IoU and mIoU")
    sub.add_argument("train_dir", metavar="TRAIN_DIR", help="STEM.npz (points, labels) or .bin + .label files")
    sub.add_argument("-o", "--output", required=True, help="folder for the trained model (save_pretrained)")
    sub.add_argument("--val-dir", help="labelled scans to score on (default: the training scans)")
    sub.add_argument("--mode", choices=("linear_probe", "finetune"), default="linear_probe")
    sub.add_argument("--classes", help="comma-separated class names (default: from the data)")
    sub.add_argument("--num-classes", type=int)
    sub.add_argument("--epochs", type=int)
    sub.add_argument("--lr", type=float)
    sub.add_argument("--batch-size", type=int)
    sub.add_argument("--lovasz-weight", type=float, help="weight of the Lovasz-softmax loss (0: cross-entropy only)")
    sub.add_argument("--num-workers", type=int, default=0)
    sub.add_argument("--seed", type=int, default=0)
    _add_model_options(sub)

    sub = command("push", cmd_push, "upload a model folder to the Hugging Face Hub")
    sub.add_argument("source", help="model folder (save_pretrained) or registry name")
    sub.add_argument("repo_id", help="owner/name on the Hub")
    sub.add_argument("--private", action="store_true")
    sub.add_argument("--message", default="Upload WaffleIron weights with scalr-zoo")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("scalr-zoo: interrupted", file=sys.stderr)
        return 130
    except (CommandError, *USER_ERRORS) as exc:
        if args.debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"scalr-zoo {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
