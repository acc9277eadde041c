"""``medcl data``: check datasets, describe a volume, write synthetic phantoms.

::

    medcl data check PATH [--json FILE]           # exit 0 when clean, 1 when any problem was found
    medcl data info FILE_OR_DICOM_DIR [--json FILE]  # exit 0 when readable (warnings shown), 2 when not
    medcl data phantoms OUT --n N --size S --seed K [--modality mri|ct]

Heavy imports happen inside the handlers, so ``medcl --help`` stays fast.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` subcommand and its actions to the top-level ``medcl`` parser."""
    p = subparsers.add_parser("data", help="check datasets, describe volumes, make synthetic phantoms",
                              description="Check datasets, describe volumes, make synthetic phantoms.")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True

    c = sub.add_parser("check", help="load every case of a dataset and list every problem",
                       description="Load every case (folder, CSV, MSD/nnU-Net dataset.json, file or DICOM folder), "
                                   "print a table and every problem; exit 1 when there is any problem.")
    c.add_argument("path", help="dataset folder, CSV, dataset.json, volume file or DICOM folder")
    c.add_argument("--json", dest="json_out", metavar="FILE", help="also write the report as JSON")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=_cmd_check)

    i = sub.add_parser("info", help="describe one volume (file or DICOM series folder)",
                       description="Describe one volume: format, shape, spacing, orientation, affine, intensities.")
    i.add_argument("path", help="volume file or DICOM series folder")
    i.add_argument("--json", dest="json_out", metavar="FILE", help="also write the description as JSON")
    i.set_defaults(func=_cmd_info)

    ph = sub.add_parser("phantoms", help="write synthetic MRI/CT-like phantoms with labels (MSD layout)",
                        description="Write N synthetic torso phantoms with organ labels in MSD layout "
                                    "(imagesTr/, labelsTr/, dataset.json).")
    ph.add_argument("out", help="output folder")
    ph.add_argument("--n", type=int, default=8, help="number of phantoms (default 8)")
    ph.add_argument("--size", type=_size, default=(48, 48, 48), help="grid size S or X,Y,Z (default 48)")
    ph.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    ph.add_argument("--modality", choices=("mri", "ct"), default="mri", help="MRI-like or CT-like (default mri)")
    ph.set_defaults(func=_cmd_phantoms)


def _size(text: str) -> tuple[int, int, int]:
    from medcl.config import parse_int_list
    from medcl.core.errors import MedclConfigError

    try:
        parts = parse_int_list(text, "--size")
    except MedclConfigError as exc:
        raise argparse.ArgumentTypeError(f"size must be S or X,Y,Z integers, got {text!r}") from exc
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or min(parts) < 2:
        raise argparse.ArgumentTypeError(f"size must be S or X,Y,Z with every size >= 2, got {text!r}")
    return (parts[0], parts[1], parts[2])


def _cmd_check(args: argparse.Namespace) -> int:
    from medcl.data.check import check_dataset, format_report, write_json

    report = check_dataset(args.path, progress=False if args.no_progress else None)
    print(format_report(report))
    if args.json_out:
        write_json(report, args.json_out)
    return 1 if report["problems"] else 0


def _cmd_info(args: argparse.Namespace) -> int:
    from medcl.core.errors import MedclDataError
    from medcl.data.check import format_info, inspect_volume, write_json

    info = inspect_volume(args.path)
    if args.json_out:
        write_json(info, args.json_out)
    if info["problems"]:  # unreadable: one error line on stderr (``medcl.cli.main``), exit 2
        first = info["problems"][0]
        raise MedclDataError(first["path"], first["problem"])
    print(format_info(info))
    return 0


def _cmd_phantoms(args: argparse.Namespace) -> int:
    from medcl.data.phantoms import write_phantom_dataset

    out = write_phantom_dataset(args.out, n=args.n, size=args.size, seed=args.seed, modality=args.modality)
    print(f"wrote {args.n} {args.modality.upper()} phantoms of {'x'.join(map(str, args.size))} voxels to {out} "
          f"(MSD layout: imagesTr/, labelsTr/, dataset.json)")
    return 0
