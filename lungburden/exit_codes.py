"""Exit statuses of the commands, the node and the Orthanc plugin's worker (sysexits where one fits).

This module imports nothing, so the command line can use it without loading the job engine.
"""

EXIT_OK = 0
#: The command ran but did not succeed (a job failed, nothing to analyse, a retrieval failed).
EXIT_FAILED = 1
#: Wrong command-line usage or unusable input (the same value as ``lungburden analyze``'s).
EXIT_BAD_INPUT = 2
#: Invalid configuration (sysexits ``EX_CONFIG``); the plugin does not restart a worker that exits so.
EXIT_CONFIG = 78
