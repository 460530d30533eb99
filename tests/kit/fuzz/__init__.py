"""The fuzz engine: seed archives (seeds), mutations (layout, mutate, maps), compression and HTTP (packed),
one case (engine), and many cases in worker processes (pool)."""
