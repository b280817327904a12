"""``python -m experiments.bench``: every benchmark row in one run (see run_all.py)."""

from experiments.bench.run_all import main

main()
