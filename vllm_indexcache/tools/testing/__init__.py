"""Harnesses shared by the tests and the ``reliability`` command: servers on loopback and the reliability checks."""
