"""The DICOM node: C-STORE SCP and STOW-RS intake, durable spool, series completion, selection,
SQLite job queue, inference workers and export to PACS (``lungburden serve``; docs/node.md)."""
