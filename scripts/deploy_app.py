"""A MONAI Deploy application that segments one NIfTI image with an exported bundle of this project.

    python -m scripts.deploy_env                 # the SDK's own venv, .venv-deploy (once; seconds)
    PYTHONPATH=. .venv-deploy/bin/python -m scripts.deploy_app --bundle model.ts --input case.nii.gz \\
        --output_dir out/
    PYTHONPATH=. .venv-deploy/bin/python -m scripts.deploy_app --bundle my_bundle_dir --input case.nii.gz \\
        --output_dir out/ --config_names inference,inference_demo

Bad input (a missing or unreadable file, a ``models/model.pt`` that is not weights-only) ends in one line
``error: ...`` naming the file, exit status 2 (``scripts.cli.run``); ``--debug`` adds the traceback.

The operator graph is ``NiftiImageLoaderOperator → MonaiBundleInferenceOperator → NiftiSegWriterOperator``:

- the loader reads the file with MONAI's ``LoadImage(ensure_channel_first=True)`` — exactly the
  ``LoadImaged`` of the bundles' ``preprocessing`` — and emits an SDK ``Image`` of shape
  (C, *spatial) whose metadata is the MetaTensor's (affine, original_affine, spatial_shape, ...);
- the SDK's ``MonaiBundleInferenceOperator`` parses the bundle's ``inference`` config(s), drops the
  ``LoadImage*`` / ``SaveImage*`` transforms, and runs the rest of ``preprocessing``, the ``inferer`` and
  ``postprocessing`` (softmax, ``Invertd`` back to the input grid, argmax) on the exported network;
- the writer saves the label map as ``<output_dir>/<input name>_seg.nii.gz`` (uint8) with the input's
  affine, atomically (``common.io.atomic_path``).

``--bundle`` is either the TorchScript file written by ``python -m monai.bundle ckpt_export`` (metadata
and inference config embedded as extra files; the SDK's primary format, loaded by its ``ModelFactory``)
or a bundle directory holding ``configs/metadata.json``, ``configs/<config_names>.json`` and
``models/model.ts`` or ``models/model.pt`` (the SDK's fallback: ``network`` or ``network_def`` from the
config, weights from ``{"model": state_dict}``, ``{"state_dict": ...}`` or a bare state dict).

The bundle's ``network_data_format`` must name its input ``image`` and its output ``pred`` (all bundles
of this project do); the operator's I/O ports are those names.

The SDK's own ``NiftiDataLoader`` is not used: it returns a bare array without the affine (its source
says so), so the writer could not restore the input's geometry and ``Invertd`` would have no metadata,
and the bundle operator rejects the 2D array it gives for a 2D image ("Unsupported input rank 2").
"""

from __future__ import annotations

import gzip
import logging
import os
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.io import atomic_path
from common.safe_load import check_weights_only, weights_only_loads

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application, Fragment, Image, IOType, Operator, OperatorSpec
from monai.deploy.operators import BundleConfigNames, IOMapping, MonaiBundleInferenceOperator

__all__ = [
    "NiftiImageLoaderOperator",
    "NiftiSegWriterOperator",
    "BundleSegmentationApp",
    "label_map_from_image",
    "write_label_nifti",
    "segment",
    "check_weights",
    "main",
]

INPUT_NAME = "image"  # network_data_format input key of every bundle here, and the operator port
OUTPUT_NAME = "pred"  # network_data_format output key, and the operator port
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _nifti_stem(path: Path) -> str:
    """File name without ``.nii`` / ``.nii.gz``."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


class NiftiImageLoaderOperator(Operator):
    """Read one NIfTI file with MONAI ``LoadImage(image_only=True, ensure_channel_first=True)``.

    Output port ``image``: an SDK ``Image`` holding a float numpy array (C, *spatial) in the file's
    voxel order and, as metadata, the MetaTensor's dictionary (``affine``, ``original_affine``,
    ``spatial_shape``, ``original_channel_dim``, ``filename_or_obj``, ...). The bundle operator turns it
    back into the same MetaTensor the bundle's own ``LoadImaged`` would have produced.
    """

    def __init__(self, fragment: Fragment, *args, input_path: str | os.PathLike, **kwargs) -> None:
        self.input_path = Path(input_path)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output(INPUT_NAME)

    def compute(self, op_input, op_output, context) -> None:
        from monai.transforms import LoadImage

        img = LoadImage(image_only=True, ensure_channel_first=True)(str(self.input_path))
        meta = dict(img.meta)
        op_output.emit(Image(img.numpy(), metadata=meta), INPUT_NAME)


class NiftiSegWriterOperator(Operator):
    """Write the bundle operator's segmentation ``Image`` as a uint8 NIfTI with the input's affine.

    Input port ``pred``: the SDK ``Image`` from ``MonaiBundleInferenceOperator`` (see
    :func:`label_map_from_image`). ``written_path`` holds the file written.
    """

    def __init__(self, fragment: Fragment, *args, output_file: str | os.PathLike, **kwargs) -> None:
        self.output_file = Path(output_file)
        self.written_path: Path | None = None
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(OUTPUT_NAME)

    def compute(self, op_input, op_output, context) -> None:
        seg, affine = label_map_from_image(op_input.receive(OUTPUT_NAME))
        write_label_nifti(seg, affine, self.output_file)
        self.written_path = self.output_file


def label_map_from_image(image: Image) -> tuple[np.ndarray, np.ndarray]:
    """The label map and the input file's affine (4, 4) from the bundle operator's output ``Image``.

    ``MonaiBundleInferenceOperator`` squeezes the channel of the (1, *spatial) prediction, casts it to
    uint8 and, for 3D, reverses the axes to DICOM order (D, H, W); a 2D map is left as (H, W). This
    undoes the reversal (so the map is in the input file's voxel order), checks the shape against the
    input's ``spatial_shape`` and takes ``original_affine`` from the metadata (the preprocessed input's
    MetaTensor dictionary). Raises ``ValueError`` naming ``pred`` when either does not fit.
    """
    if not isinstance(image, Image):
        raise ValueError(f"{OUTPUT_NAME}: expected a monai.deploy Image, got {type(image).__name__}")
    meta = image.metadata() or {}
    seg = np.asarray(image.asnumpy())
    if seg.ndim == 3:
        seg = np.swapaxes(seg, 0, 2)
    if "original_affine" not in meta or "spatial_shape" not in meta:
        raise ValueError(f"{OUTPUT_NAME}: metadata lacks original_affine or spatial_shape (use LoadImage)")
    expected = tuple(int(s) for s in np.asarray(meta["spatial_shape"]).ravel())
    if seg.shape != expected:
        raise ValueError(
            f"{OUTPUT_NAME}: segmentation shape {seg.shape} differs from the input's {expected}; "
            "the bundle's postprocessing must invert its resizing (Invertd)"
        )
    return seg, np.asarray(meta["original_affine"], dtype=np.float64)


def write_label_nifti(seg: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an integer label map (spatial axes in the file's voxel order) as gzipped NIfTI-1 uint8 with
    ``affine`` (4, 4, mm) as both sform and qform, atomically. Raises ``ValueError`` for labels outside
    0-255 or a non-finite / non-4x4 affine."""
    import nibabel as nib

    if seg.size and (seg.min() < 0 or seg.max() > 255):
        raise ValueError(f"seg: labels must lie in 0-255 (stored as uint8), got {seg.min()}..{seg.max()}")
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"affine: expected a finite 4x4 matrix, got {affine.shape} / non-finite values")
    img = nib.Nifti1Image(seg.astype(np.uint8), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:  # nibabel picks the format from the name, so serialise in memory
        tmp.write_bytes(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))
    return Path(path)


class BundleSegmentationApp(Application):
    """NIfTI loader → ``MonaiBundleInferenceOperator`` → NIfTI writer, run once on one file.

    ``bundle``: an exported TorchScript bundle (``.ts``) or a bundle directory (see the module
    docstring); ``config_names``: the bundle config files parsed, merged in order (e.g.
    ``("inference", "inference_demo")``); ``output_file``: where the label map goes.
    """

    def __init__(self, bundle: Path, input_file: Path, output_file: Path, config_names: Sequence[str]):
        self.bundle = Path(bundle)
        self.input_file = Path(input_file)
        self.output_file = Path(output_file)
        self.config_names = list(config_names)
        self.writer: NiftiSegWriterOperator | None = None
        super().__init__([sys.argv[0]])  # no holoscan command-line flags: paths come from the arguments

    def compose(self) -> None:
        # The AppContext's "model" is what the SDK's ModelFactory loads: for the TorchScript file a
        # TorchScriptModel. A directory bundle gets no model object (the factory would wrap the folder in
        # a bare Model with no network), so the operator falls back to bundle_path and loads
        # models/model.ts or models/model.pt itself.
        app_context = AppContext(
            {"input": str(self.input_file), "output": str(self.output_file.parent), "model": str(self.bundle)}
        )
        if self.bundle.is_dir():
            app_context.models = None
        loader = NiftiImageLoaderOperator(
            self, CountCondition(self, 1), input_path=self.input_file, name="nifti_loader"
        )  # a source operator runs once per CountCondition tick
        inference = ChannelFirstBundleInferenceOperator(
            self,
            input_mapping=[IOMapping(INPUT_NAME, Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping(OUTPUT_NAME, Image, IOType.IN_MEMORY)],
            app_context=app_context,
            bundle_path=self.bundle,
            bundle_config_names=BundleConfigNames(config_names=self.config_names),
            name="bundle_inference",
        )
        self.writer = NiftiSegWriterOperator(self, output_file=self.output_file, name="nifti_writer")
        self.add_flow(loader, inference, {(INPUT_NAME, INPUT_NAME)})
        self.add_flow(inference, self.writer, {(OUTPUT_NAME, OUTPUT_NAME)})


class ChannelFirstBundleInferenceOperator(MonaiBundleInferenceOperator):
    """The SDK's bundle operator, accepting a label map whose channel the bundle already squeezed.

    The SDK's ``_send_output`` always squeezes axis 0 of an ``Image`` output (it assumes a (1, *spatial)
    prediction). Our 2D bundles end their postprocessing with ``SqueezeDimd`` so that MONAI Label (whose
    ``Restored`` squeezes only 4-D arrays) writes an (H, W) label; for such an output, with one axis fewer
    than the channel-first input, this puts the channel back before the SDK's conversion.
    """

    def _send_output(self, value: Any, name: str, metadata: dict, op_output, context):
        spatial = metadata.get("spatial_shape") if isinstance(metadata, dict) else None
        if spatial is not None and getattr(value, "ndim", None) == len(np.asarray(spatial).ravel()):
            value = value[None]
        return super()._send_output(value, name, metadata, op_output, context)


def _check_bundle(bundle: Path, config_names: Sequence[str]) -> None:
    """``bundle`` must be a TorchScript zip with embedded ``metadata.json`` and the named configs, or a
    directory with ``configs/metadata.json``, the named configs and ``models/model.ts`` or ``model.pt``."""
    if not bundle.exists():
        raise FileNotFoundError(f"bundle: no such file or directory {bundle}")
    wanted = ["metadata", *config_names]
    if bundle.is_file():
        try:
            with zipfile.ZipFile(bundle) as archive:
                names = {Path(n).name for n in archive.namelist() if "/extra/" in n}
        except zipfile.BadZipFile:
            raise ValueError(f"bundle: {bundle} is not a TorchScript archive (ckpt_export)") from None
        missing = [c for c in wanted if f"{c}.json" not in names]
        if missing:
            raise ValueError(
                f"bundle: {bundle} does not embed {[m + '.json' for m in missing]} "
                "(export with ckpt_export --config_file listing them)"
            )
        return
    suffixes = (".json", ".yaml", ".yml")
    missing = [c for c in wanted if not any((bundle / "configs" / f"{c}{s}").is_file() for s in suffixes)]
    if missing:
        raise FileNotFoundError(f"bundle: {bundle / 'configs'} has no config file for {missing}")
    if not any((bundle / "models" / m).is_file() for m in ("model.ts", "model.pt")):
        raise FileNotFoundError(f"bundle: {bundle / 'models'} has neither model.ts nor model.pt")


def check_weights(bundle: Path) -> None:
    """A directory bundle's ``models/model.pt`` must load with ``torch.load(weights_only=True)`` before the
    SDK loads it with its own ``torch.load`` (see :mod:`common.safe_load`); raises
    :class:`common.errors.InputError` naming the file otherwise. A TorchScript file (``model.ts``,
    ``--bundle x.ts``) is loaded with ``torch.jit.load``, which runs no pickled Python code."""
    weights = bundle / "models" / "model.pt"
    if bundle.is_dir() and weights.is_file():
        check_weights_only(weights, "bundle")


def _check_input_image(path: Path) -> None:
    """Read ``path`` as the bundles' ``LoadImaged`` does; an empty, truncated or non-image file, or one
    holding NaN / Inf, raises :class:`common.errors.InputError` naming it (before the application starts:
    inside it the same fault would end in a long operator traceback that does not name the file)."""
    import torch

    from common.errors import InputError
    from common.transforms import LoadImaged

    image = LoadImaged(keys="image", image_only=True)({"image": str(path)})["image"]
    bad = int((~torch.isfinite(torch.as_tensor(image))).sum())
    if bad:
        raise InputError(f"input: {path} holds {bad} NaN/Inf values")


def segment(
    bundle: str | os.PathLike,
    input: str | os.PathLike,
    output_dir: str | os.PathLike,
    config_names: Sequence[str] | str = ("inference",),
) -> Path:
    """Run :class:`BundleSegmentationApp` on ``input`` and return the written
    ``<output_dir>/<input name>_seg.nii.gz``. Raises ``FileNotFoundError`` / ``ValueError`` naming the bad
    argument (:class:`common.errors.InputError` for a bundle whose ``models/model.pt`` is not weights-only,
    see :func:`check_weights`, and for an input that cannot be read as an image), and ``RuntimeError`` if
    the application ends without writing the segmentation. The SDK's own loads run under
    :func:`common.safe_load.weights_only_loads`."""
    bundle, input_path = Path(bundle).expanduser().resolve(), Path(input).expanduser().resolve()
    if isinstance(config_names, str):
        config_names = [c for c in config_names.split(",") if c.strip()]
    config_names = [str(c).strip() for c in config_names]
    if not config_names or any(not c or "/" in c or ".." in c for c in config_names):
        raise ValueError(f"config_names: expected config file names like 'inference', got {config_names!r}")
    _check_bundle(bundle, config_names)
    if not input_path.is_file():
        raise FileNotFoundError(f"input: no such file {input_path}")
    if not input_path.name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"input: expected a NIfTI file (.nii or .nii.gz), got {input_path.name}")
    check_weights(bundle)
    _check_input_image(input_path)
    output_file = Path(output_dir).expanduser().resolve() / f"{_nifti_stem(input_path)}_seg.nii.gz"
    app = BundleSegmentationApp(bundle, input_path, output_file, config_names)
    with weights_only_loads():
        app.run()
    if app.writer is None or app.writer.written_path != output_file:
        raise RuntimeError(f"the Deploy application ended without writing {output_file} (see the log above)")
    return output_file


def main(bundle: str, input: str, output_dir: str, config_names: Any = "inference") -> str:
    """Command line: segment ``input`` with ``bundle`` into ``output_dir``; prints the written path.
    ``config_names`` is a comma-separated list of the bundle configs to merge (default ``inference``)."""
    logging.basicConfig(level=logging.WARNING)
    if isinstance(config_names, (list, tuple)):
        config_names = [str(c) for c in config_names]
    return str(segment(bundle, input, output_dir, config_names))


if __name__ == "__main__":
    from scripts.cli import run

    run(main)
