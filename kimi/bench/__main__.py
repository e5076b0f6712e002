"""python -m kimi.bench: see kimi/bench/run.py (spawned ranks need the functions in an importable module)."""

from kimi.bench.run import main

main()
