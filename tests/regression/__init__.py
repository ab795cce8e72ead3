"""Tests of the regression gate (``regression/gate.py``)."""
