"""Benchmarks for casa_executors (see ``casa_benchmarks.adl``)."""
