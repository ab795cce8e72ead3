"""The regression gate (``python -m regression.gate``, ``tox -e regression``): docs/regression.md.

A developer tool, not part of the installed package: it runs from a checkout, beside ``tests/``.
"""
