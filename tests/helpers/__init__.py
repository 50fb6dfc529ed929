"""Helpers the tests share (importable as `helpers`: pyproject's pytest `pythonpath` puts tests/ on
the path, for the test process and for the processes it spawns)."""
