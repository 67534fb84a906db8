"""lungburden: COVID-19 pneumonia burden on chest CT, as a DICOM node (SEG + TID 1500 SR)."""

import os

# torch's OpenMP threads busy-wait between parallel regions by default; on a shared CPU (a PACS
# host, the node's SCP beside a worker) that stalls inference several-fold (docs/model-development.md).
# It is read once when torch loads, so it is set here, before any lungburden module imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.2.0"
