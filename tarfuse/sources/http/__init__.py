"""Archives on a web server, read with HTTP range requests: the options (options.py), the source
(archive.py), what an answer must be to be used (answers.py), the deadline on every request
(deadlines.py) and the connection pools, proxies and credentials in a URL (pools.py).

urllib3 and urllib.request are imported when a URL is opened: a local mount does not pay the ~25 ms they
take to import.
"""
