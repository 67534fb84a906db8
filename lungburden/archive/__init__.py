"""Archive mode: quantify the chest CT series of a whole PACS archive over DICOMweb.

``search`` enumerates studies and series by QIDO-RS and applies the selection rules,
``tasks`` analyses one series (WADO-RS retrieve, the one pipeline, STOW-RS store) on a local
process pool or on Celery workers, ``batch`` coordinates a run and writes the results table,
``commands`` adds ``lungburden batch`` and ``lungburden worker``. See docs/archive.md.
"""
