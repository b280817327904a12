# The two commands of the README's quick start, and a few more.
.PHONY: demo test test-slow install lint bench

demo:  ## install, then run the main job on Fashion-MNIST
	scripts/install.sh
	.venv/bin/jaxprune demo

test:  ## install with the test extras, then run the test suite (the default tier, minutes)
	scripts/install.sh --dev
	.venv/bin/python -m pytest -q

test-slow:  ## the slow tier: end-to-end runs, kill-and-resume, paper configs on mock data
	scripts/install.sh --dev
	.venv/bin/python -m pytest -q -m slow

lint:
	scripts/install.sh --dev
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

bench:  ## every benchmark row beside PyTorch / Torch-Pruning, one table (minutes; not a test)
	scripts/install.sh
	.venv/bin/python -m experiments.bench
