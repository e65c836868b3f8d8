"""Segment one image with a bundle through MONAI Label's bundle inference task (``BundleInferTask``).

    .venv-label/bin/python scripts/monai_label_infer.py --bundle_dir DIR --image IMG --output OUT.nii.gz
    # several jobs in one process (imports and ITK's first load are paid once): repeat the triple
    .venv-label/bin/python scripts/monai_label_infer.py --bundle_dir A --image a.nii.gz --output a_seg.nii.gz \
        --bundle_dir B --image b.nii.gz --output b_seg.nii.gz

Runs in the MONAI Label venv (``scripts/monai_label_env.py``; the repository on ``PYTHONPATH`` so the
bundle's ``$import common...`` lines resolve). That venv carries MONAI Label's inference stack (and
``fire``, which ``scripts.cli.run`` needs for the one-line error convention); arguments are parsed with
``argparse`` (repeated flags). What MONAI Label does with the bundle directory (monailabel
0.8.5, ``monailabel/tasks/infer/bundle.py``):

- reads ``configs/inference.json`` and sets its ``bundle_root`` to ``bundle_dir``;
- instantiates ``network_def`` and loads ``models/model.pt`` (``{"model": state_dict}``, the layout
  ``common.checkpoint.save_weights`` writes; a bare state dict also loads);
- takes the task's dimension from ``len(metadata.json → network_data_format.inputs.<first>.spatial_shape)``
  and its labels from the output's ``channel_def`` (background left out);
- runs ``preprocessing`` (``LoadImaged`` wrapped so that metadata is kept), ``inferer`` on the
  batched image, ``postprocessing`` without ``SaveImaged``, then its own ``Restored`` (back to the
  input's spatial shape), and writes the label with its ``Writer`` (ITK) to a temporary file.

This script copies that file to ``--output`` (atomically) and prints one JSON line per job to stdout:
``{"output", "dimension", "labels", "type", "version", "latencies"}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

__all__ = ["segment", "main"]


def segment(bundle_dir: str | Path, image: str | Path, output: str | Path, device: str = "cpu") -> dict:
    """Segment ``image`` with the bundle at ``bundle_dir`` through ``BundleInferTask``; copy the label
    file MONAI Label's writer produced (ITK, in the input's file format: give ``output`` the same
    extension) to ``output`` and return the task's facts (see the module docstring).

    Raises ``FileNotFoundError`` naming the bundle's inference config, its ``models/model.pt`` or the
    image when missing, :class:`common.errors.InputError` naming ``models/model.pt`` when it does not load
    with ``torch.load(weights_only=True)`` (checked before MONAI Label, whose loader does not pass
    ``weights_only`` and so would run a pickle's code under ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``; its
    loads run under :func:`common.safe_load.weights_only_loads`), and ``ValueError`` for a bundle that
    MONAI Label rejects.
    """
    bundle_dir, image, output = Path(bundle_dir).resolve(), Path(image).resolve(), Path(output)
    config = bundle_dir / "configs" / "inference.json"
    weights = bundle_dir / "models" / "model.pt"
    for name, path in (("bundle_dir", config), ("bundle_dir", weights), ("image", image)):
        if not path.is_file():
            raise FileNotFoundError(f"{name}: no such file {path}")

    from common.safe_load import check_weights_only, weights_only_loads

    check_weights_only(weights, "bundle_dir")  # before MONAI Label's own torch.load sees the file

    from monailabel.tasks.infer.bundle import BundleInferTask

    from common.io import atomic_path

    with weights_only_loads():
        task = BundleInferTask(str(bundle_dir), conf={})
        if not task.is_valid():
            raise ValueError(f"bundle_dir: MONAI Label did not accept {bundle_dir} as a bundle (see its log)")
        ext = "".join(image.suffixes[-2:]) if image.name.endswith(".nii.gz") else image.suffix
        result_file, result = task({"image": str(image), "device": device, "result_extension": ext})
    if not isinstance(result_file, str) or not Path(result_file).is_file():
        raise ValueError(f"bundle_dir: MONAI Label wrote no label file for {image} (got {result_file!r})")
    with atomic_path(output) as tmp:
        shutil.copyfile(result_file, tmp)
    Path(result_file).unlink()
    return {
        "output": str(output),
        "dimension": task.dimension,
        "labels": task.labels,
        "type": str(task.type),
        "version": task.version,
        "latencies": result.get("latencies", {}),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    """Command line: ``--bundle_dir``, ``--image`` and ``--output`` (each given once per job, jobs run in
    order in this process), optional ``--device`` (default cpu)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--bundle_dir", "--image", "--output"):
        parser.add_argument(flag, action="append", required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if not len(args.bundle_dir) == len(args.image) == len(args.output):
        raise ValueError(
            f"bundle_dir, image, output: expected one of each per job, got {len(args.bundle_dir)}, "
            f"{len(args.image)} and {len(args.output)}"
        )
    results = []
    for bundle_dir, image, output in zip(args.bundle_dir, args.image, args.output):
        results.append(segment(bundle_dir, image, output, args.device))
        print(json.dumps(results[-1], default=str), flush=True)
    return results


if __name__ == "__main__":
    from scripts.cli import run

    run(main, parses_argv=True)
