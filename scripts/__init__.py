"""The operator's scripts; a package so that `python -m scripts.soak` imports the tests' support."""
