"""The tests' bundle runner is the scripts' one (:mod:`scripts.bundle_run`)."""

from scripts.bundle_run import BUNDLES, REPO, run_bundle

__all__ = ["BUNDLES", "REPO", "run_bundle"]
