"""The regression gate (``python -m tests.regression.gate``, ``tox -e regression``): docs/regression.md."""
