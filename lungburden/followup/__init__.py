"""Follow-up: the same patient's prior chest CTs and the change since the most recent one.

:mod:`~lungburden.followup.trend` holds the typed results (:class:`PriorResult`,
:class:`Change`, :class:`FollowUp`) that the pipeline writes into result.json, the SR, the SC
summary and the PDF; :mod:`~lungburden.followup.priors` finds the priors in a PACS, reads their
numbers from a lungburden SR made by the same model version or retrieves and analyses them with
the one pipeline; the PACS is reached by DICOMweb (:mod:`~lungburden.followup.sources`) or by
DIMSE C-FIND / C-GET / C-STORE (:mod:`~lungburden.followup.dimse`).
"""
