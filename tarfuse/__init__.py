"""tarfuse: serve the disk image inside a tar archive as one flat, read-only file."""

__version__ = "0.1.0"
