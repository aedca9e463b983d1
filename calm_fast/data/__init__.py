"""Offline dataset builders: everything is synthesised or rendered here, nothing downloaded.

Each builder is deterministic from a seed and writes FLAC files plus a JSONL manifest.
System tools are installed by ``scripts/install_data_tools.sh``; a missing one raises
``MissingToolError`` naming the Debian package.
"""
from .tools import MissingToolError, require_tool  # noqa: F401
