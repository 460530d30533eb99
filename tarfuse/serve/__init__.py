"""The FUSE side: the pyfuse3 operations, the request loop, the mount's life, the mount table.

The only layer that may import pyfuse3 and trio (pyproject.toml: ruff TID251 bans them everywhere else).
"""
