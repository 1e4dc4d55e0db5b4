"""End-to-end experiments of the LPLR paper on data that ships inside packages.

Each module is a pipeline run from the repository root with one command, e.g.
``python -m pipelines.images [--quick] [--out results/images] [cluster options]``; it writes
``report.md`` (tables), ``results.json`` (the numbers) and PNG figures into ``--out``.
Needs the ``pipelines`` extra: ``pip install -e '.[pipelines]'``.
"""
