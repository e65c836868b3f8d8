"""Robustness cards for any MONAI bundle (issue #9): read the bundle, measure, render.

``run_card`` lives in :mod:`common.card.runner`; import it from there (this package stays light so that
importing the renderer does not import torch-heavy modules).
"""
