"""CoroNet DICOM node: configuration, admin CLI and the C-STORE listener."""

__version__ = "0.1.0"
