"""Helpers of the real-browser viewer test: a Chromium driven over the DevTools protocol and OHIF
served on the same origin as Orthanc's DICOMweb."""
