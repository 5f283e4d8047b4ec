"""The README's example commands write their files where git ignores them, not into the repository root (issue 36,
item 6)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_readme_offline_batch_files_are_git_ignored():
    text = (REPO / "README.md").read_text()
    lines = [line for line in text.splitlines() if "offline_batch.py" in line or "prompts.jsonl" in line]
    files = {f for line in lines for f in re.findall(r"[\w./-]+\.jsonl\b", line)}
    assert files >= {"runs/prompts.jsonl", "runs/out.jsonl"}, files
    for f in files:
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", f], cwd=REPO)
        assert ignored.returncode == 0, f"{f} would be left untracked in the repository"
    assert any(line.strip().startswith("mkdir -p runs") for line in text.splitlines())
