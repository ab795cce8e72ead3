"""Tests of the reporter (reports/) and of the record readers it uses (cl_bench.results)."""
