"""Fuzz harnesses for kvwire's untrusted-input parsers (atheris); docs/reliability.md."""
