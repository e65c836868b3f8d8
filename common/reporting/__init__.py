"""Reporting: tables, plots and the paper-shaped tables built from the evaluation engine's rows."""
