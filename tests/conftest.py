"""Make ``tests/`` importable (``bundle_run``) and keep the suite's temporary files inside pytest's tmp dirs."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
