"""The node's DICOM listener: a Storage and Verification SCP (pynetdicom).

- :mod:`~dicom_node.scp.contexts`: the SOP classes and transfer syntaxes accepted;
- :mod:`~dicom_node.scp.access`: which callers may associate;
- :mod:`~dicom_node.scp.selection`: which stored instances go to the model;
- :mod:`~dicom_node.scp.ingest`: one C-STORE: check, persist, select, schedule;
- :mod:`~dicom_node.scp.queueing`: publishing spooled studies to the broker;
- :mod:`~dicom_node.scp.handlers`: the pynetdicom event handlers;
- :mod:`~dicom_node.scp.node`: the node's lifecycle (start, reload, stop).

It shares only :mod:`dicom_node.core` with the worker.
"""
