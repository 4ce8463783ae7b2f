"""Helpers shared by the tests: real DICOM tools (``dicom_tools``) and a real Orthanc
(``orthanc``) on loopback."""
