"""ADL benchmark suite: the eight IRIS-HEP ADL queries as coffea processors,
a loop-based reference, an RDataFrame peer, a synthetic data generator and a
command line (``python -m casa_benchmarks.adl``) to run them on casa_executors.

Modules: ``queries`` (QUERIES, HISTOGRAMS), ``reference``, ``rdf``,
``generate``/``synth``, ``sample`` (write_root), ``cli``/``runner``.
"""
