"""Follow-up: the same patient's prior chest CTs and the change since the most recent one.

:mod:`~lungburden.followup.trend` holds the typed results (:class:`PriorResult`,
:class:`Change`, :class:`FollowUp`) that the pipeline writes into result.json, the SR, the SC
summary and the PDF; :mod:`~lungburden.followup.priors` finds the priors in a PACS (QIDO-RS),
reads their numbers from a lungburden SR made by the same model version or retrieves (WADO-RS)
and analyses them with the one pipeline.
"""
