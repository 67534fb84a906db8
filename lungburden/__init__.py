"""lungburden: COVID-19 pneumonia burden on chest CT, as a DICOM node (SEG + TID 1500 SR)."""

__version__ = "0.1.0"
