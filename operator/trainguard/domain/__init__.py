"""The pure core: every decision trainguard makes, with no kopf or kubernetes import.

Handlers unpack Kubernetes objects into plain dicts, call these functions, and apply what
they return. An import-linter contract in pyproject.toml keeps this package pure.
"""
