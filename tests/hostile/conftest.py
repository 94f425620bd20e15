"""The hostile corpus uses the app's test helpers (tests/app: stores of phantoms, real servers)."""

import sys
from pathlib import Path

APP_TESTS = str(Path(__file__).resolve().parents[1] / "app")
if APP_TESTS not in sys.path:
    sys.path.insert(0, APP_TESTS)
