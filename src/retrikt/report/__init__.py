"""The evaluate stage's library: statistics, reading the other stages' outputs, markdown, figures.

``stats``    mean ± std over seeds, the paired bootstrap, best baseline, majority class, gap closed
``inputs``   reading and checking the files the other stages wrote (metrics, timings, predictions,
             curves, the store, the retrieval student)
``markdown`` results.md, a view of results.json
``figures``  the PNG figures (matplotlib, Agg, deterministic bytes)
The stage itself (what is read, what is written, the MLflow headline) is :mod:`retrikt.evaluate`.
"""
