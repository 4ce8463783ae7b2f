"""The result objects the worker writes into the source study.

- :mod:`~worker.results.outcome`: what the model concluded (prediction or unassessable);
- :mod:`~worker.results.source`: what a result needs from, and copies of, its source image;
- :mod:`~worker.results.uids`: deterministic UIDs of the results;
- :mod:`~worker.results.equipment`: this software as the DICOM device that made them;
- :mod:`~worker.results.sr`: the TID 1500 Structured Report;
- :mod:`~worker.results.render`: the attribution map as a picture;
- :mod:`~worker.results.sc`: that picture as a Secondary Capture.
"""
