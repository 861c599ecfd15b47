"""Agents written against upstream flytekit, served by `pyflyte serve agent` in the interop suite."""
