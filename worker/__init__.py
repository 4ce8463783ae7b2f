"""The CoroNet worker: spooled study in, SR and heatmap SC delivered to the PACS.

- :mod:`~worker.options`: the worker's own options (pool, heatmap mode, limits, retries);
- :mod:`~worker.runtime`: devices, threads and the model, once per process;
- :mod:`~worker.engine`: the MONAI bundle, loaded;
- :mod:`~worker.pipeline`: one image to its prediction, SC and SR;
- :mod:`~worker.results`: the result objects (SR, SC) and what they are built from;
- :mod:`~worker.sources` and :mod:`~worker.fetching`: a task's instances, from the shared spool
  or fetched from the node;
- :mod:`~worker.processor`: one study, from its source to the destinations (no Celery);
- :mod:`~worker.locks`: coordination of workers in Redis;
- :mod:`~worker.delivery`: the Storage SCU (C-STORE and C-ECHO to a destination);
- :mod:`~worker.rounds`: delivery rounds over the outbox;
- :mod:`~worker.celery_app`: the thin Celery glue;
- :mod:`~worker.infer`: the same pipeline on files, offline.

It shares only :mod:`dicom_node.core` with the node (the spool, the fetch protocol and the outbox
are formats of the core), and uses :mod:`monai_bundle`.
"""
