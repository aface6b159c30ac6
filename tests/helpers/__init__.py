"""Helpers shared by the test files (importable as `helpers.<module>`: pyproject puts tests/ on the path)."""
