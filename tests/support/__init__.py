"""What the tests share, besides the fixtures in ``tests/conftest.py``.

- :mod:`~tests.support.polling`: the one poll-until helper (never a fixed sleep);
- :mod:`~tests.support.ports`: the one free-port helper;
- :mod:`~tests.support.processes`: the one child-process runner;
- :mod:`~tests.support.settings`: the one settings builder;
- :mod:`~tests.support.certificates`: the one certificate maker;
- :mod:`~tests.support.dicom_data`: real radiographs and copies with fresh UIDs;
- :mod:`~tests.support.node`: an in-process node, SCU associations, storescu, the queue;
- :mod:`~tests.support.results`: real result objects without the model;
- :mod:`~tests.support.scp`: a recording Storage SCP (the PACS that receives results);
- :mod:`~tests.support.redis_server`, :mod:`~tests.support.orthanc`,
  :mod:`~tests.support.dicom_tools`: real Redis, Orthanc and dcmtk/dicom3tools peers.
"""
