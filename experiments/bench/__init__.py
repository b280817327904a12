"""jaxprune's benchmarks against PyTorch and Torch-Pruning; ``python -m experiments.bench``."""
