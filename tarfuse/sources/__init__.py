"""The bytes under the tar reader: a local file, a decompressed stream (with its seek index and
spill), an http(s) URL (http/); and the side files root may write. locations.py turns a location into
a source; file.py says what every source answers.
"""

# -o cache_size: the memory a mount may spend on cached bytes, one budget for every layer (a URL's blocks
# take their share, the decompressed chunks the rest: mount.open_source). 64 MiB: sixty-four 1 MiB chunks
# of a compressed archive.
DEFAULT_CACHE_SIZE = 64 << 20
# -o cache_max: what the cache directory may hold on disk (sources/cachedir.py): far more than a few
# images' indexes and spills, far less than a disk.
DEFAULT_CACHE_MAX = 16 << 30
