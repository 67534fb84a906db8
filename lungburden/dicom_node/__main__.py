"""``python -m lungburden.dicom_node serve|jobs|retry|pull`` (same as the ``lungburden`` subcommands)."""

import sys

from lungburden.dicom_node.commands import main

sys.exit(main())
