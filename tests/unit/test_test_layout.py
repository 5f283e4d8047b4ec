"""The test tree itself: pytest imports test modules by basename (no ``__init__.py`` in ``tests/``), so two test
files of one name in ``tests/unit`` and ``tests/engine`` stop ``make test`` at collection ("import file mismatch")."""
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_no_two_test_modules_share_a_basename():
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []
