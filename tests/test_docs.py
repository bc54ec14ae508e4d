"""The README's claims table and docs/CLAIMS.md are what the published results and the experiments say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_claims_table_and_claims_document_match_the_published_results():
    p = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "publish_results.py"), "--check"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
