"""The benchmark: `python -m bench.run`; see bench/README.md (the README shows the latest run)."""
