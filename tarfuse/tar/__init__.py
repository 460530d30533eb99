"""Reading tar: header blocks, the walk over members, sparse maps, the files tar -x would leave.

No I/O of its own: every read goes through a `read_at` handed in.
"""
