"""CoroNet DICOM node.

- :mod:`dicom_node.core`: the contract between node and worker (settings, errors, statuses,
  spool format, task, TLS, logging); it imports nothing else of the project;
- :mod:`dicom_node.scp`: the Storage SCP that receives chest radiographs;
- :mod:`dicom_node.stack`: the whole system on one machine (``coronet run``, ``coronet demo``);
- :mod:`dicom_node.cli`: the ``coronet`` command, the only place that sees everything.

The worker is the top-level package ``worker``, the model the MONAI bundle ``monai_bundle``.
"""

__version__ = "0.1.0"
