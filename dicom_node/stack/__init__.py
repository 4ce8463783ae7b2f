"""The whole system on one machine (``coronet run``, ``make run``) and its demo PACS.

- :mod:`~dicom_node.stack.plan`: ports, folders and the effective configuration;
- :mod:`~dicom_node.stack.children`: supervised child processes;
- :mod:`~dicom_node.stack.supervisor`: start and stop Redis, Orthanc, the node and a worker;
- :mod:`~dicom_node.stack.demo`: send the sample radiograph into the demo PACS.

It starts the node and the worker as processes of the ``coronet`` command and imports neither.
"""
