"""The contract between the node and the worker; it imports nothing else of this project.

- :mod:`~dicom_node.core.settings`: the typed configuration and how it is loaded;
- :mod:`~dicom_node.core.config_file`: comment-keeping edits of the configuration file;
- :mod:`~dicom_node.core.errors`: the error tree;
- :mod:`~dicom_node.core.statuses`: named DIMSE and association statuses;
- :mod:`~dicom_node.core.durable`: durable (fsync'ed, atomic) file writes;
- :mod:`~dicom_node.core.spool`: the spool format, written by the node, read by the worker;
- :mod:`~dicom_node.core.task`: the task name and its arguments;
- :mod:`~dicom_node.core.chest`: the frontal-chest rule;
- :mod:`~dicom_node.core.backoff`: the retry delays;
- :mod:`~dicom_node.core.tls`: TLS contexts;
- :mod:`~dicom_node.core.logs`: logging set-up.
"""
