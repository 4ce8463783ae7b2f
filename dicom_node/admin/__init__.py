"""The node's admin service, run by ``coronet node serve``: health, metrics, REST API and web
console, and the operations behind them.

- :mod:`~dicom_node.admin.users`: the admin users and their argon2 hashes;
- :mod:`~dicom_node.admin.config_edits`: audited edits of callers and destinations;
- :mod:`~dicom_node.admin.studies`: recent studies and their state; retry of dead letters;
- :mod:`~dicom_node.admin.retention`: removing delivered studies after N days;
- :mod:`~dicom_node.admin.jobs`: the periodic job that runs it;
- :mod:`~dicom_node.admin.services`: what the app works with, bound by the CLI;
- :mod:`~dicom_node.admin.auth`: HTTP Basic for the API, session and CSRF for the console;
- :mod:`~dicom_node.admin.health`, :mod:`~dicom_node.admin.metrics`,
  :mod:`~dicom_node.admin.api`, :mod:`~dicom_node.admin.console`: the routers;
- :mod:`~dicom_node.admin.app`: the app, composed of the routers;
- :mod:`~dicom_node.admin.server`: uvicorn in a thread of the node.

It imports :mod:`dicom_node.core` and :mod:`dicom_node.scp`; never the worker, which it reads
through the core's formats (spool, outbox, telemetry) and whose C-ECHO the CLI injects.
"""
