"""Prepare the papers' 2D datasets from their native layouts (one sub-command per dataset).

    python -m scripts.prepare_2d_datasets jsrt --root /data/JSRT --scr_root /data/SCR --out_dir /data/jsrt_256
    python -m scripts.prepare_2d_datasets jsrt --root /data/JSRT --out_dir /data/jsrt_cert --split random \
        --size 512 --target classes
    python -m scripts.prepare_2d_datasets montgomery --root /data/MontgomerySet --out_dir /data/montgomery
    python -m scripts.prepare_2d_datasets shenzhen --root /data/ChinaSet_AllFiles --out_dir /data/shenzhen
    python -m scripts.prepare_2d_datasets isbi2016 --root /data/ISBI2016 --out_dir /data/isbi2016
    python -m scripts.prepare_2d_datasets isic2018 --root /data/ISIC2018 --out_dir /data/isic2018
    python -m scripts.prepare_2d_datasets cvc --root /data/CVC-ClinicDB --out_dir /data/cvc --size None

Each prints the path of the written ``datalist.json``. ``--size`` takes one integer, ``256,256`` or None
(native grid). JSRT's ``--target`` decides overlapping SCR masks: "lungs" (default, NLCEN: the lung
labels are the union of the SCR lung masks) or "classes" (certification: clavicles > heart > lungs), see
``common.data.chest_xray``. ``--help`` after a sub-command lists its options (the functions' docstrings in
``common.data.chest_xray``, ``common.data.dermoscopy`` and ``common.data.endoscopy``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import fire

from common.data.chest_xray import prepare_jsrt, prepare_montgomery, prepare_shenzhen
from common.data.dermoscopy import prepare_isbi2016, prepare_isic2018
from common.data.endoscopy import prepare_cvc_clinicdb

__all__ = ["COMMANDS", "main"]


def _printing_path(fn: Callable[..., Any]) -> Callable[..., str]:
    """Wrap a ``prepare_*`` function so that fire prints the returned path as a plain string."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> str:
        return str(fn(*args, **kwargs))

    return run


COMMANDS: dict[str, Callable[..., str]] = {
    "jsrt": _printing_path(prepare_jsrt),
    "montgomery": _printing_path(prepare_montgomery),
    "shenzhen": _printing_path(prepare_shenzhen),
    "isbi2016": _printing_path(prepare_isbi2016),
    "isic2018": _printing_path(prepare_isic2018),
    "cvc": _printing_path(prepare_cvc_clinicdb),
}


def main(argv: Sequence[str] | None = None) -> Any:
    """Run one sub-command (``argv`` as on the command line; None reads ``sys.argv``)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return fire.Fire(COMMANDS, command=None if argv is None else list(argv))


if __name__ == "__main__":
    from scripts.cli import run

    run(main, parses_argv=True)
