"""Coded concepts of the SEG and SR outputs (DICOM PS3.16 context groups; see docs/conformance.md).

Constants are immutable pydicom :class:`~pydicom.sr.coding.Code` values; highdicom turns them
into fresh Code Sequence items on every use.

Every code is taken from pydicom's DICOM code dictionary where it is there (so its meaning is the
one of the DICOM edition pydicom ships); the two SNOMED CT concepts that the dictionary lacks
(95436008 lung consolidation, 169069000 CT of chest) are written out with their SNOMED CT terms.
"""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

# --- Segmented property categories (CID 7150 Segmentation Property Categories) -----------------
ANATOMICAL_STRUCTURE = codes.SCT.AnatomicalStructure  # SCT 91723000
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = codes.SCT.MorphologicallyAbnormalStructure  # SCT 49755003

# --- Segmented property types / findings --------------------------------------------------------
#: SCT 39607008 "Lung" (CID 7151/CID 7166); also the finding site of every group.
LUNG = codes.SCT.Lung
#: DCM 112120 "Ground glass opacity" (CID 6102 Chest Finding or Feature, CID 6104 Abnormal Opacity).
GROUND_GLASS_OPACITY = codes.DCM.GroundGlassOpacity
#: SCT 95436008 "Lung consolidation": type of the high-opacity class (consolidation + effusion).
CONSOLIDATION = Code("95436008", "SCT", "Lung consolidation")
#: SCT 60046008 "Pleural effusion": the second component of the high-opacity class, named in the
#: segment description text (a segment has exactly one property type, PS3.3 C.8.20.2).
PLEURAL_EFFUSION = codes.SCT.PleuralEffusion
#: DCM 112033 "Abnormal opacity" (CID 6104): the union GGO + high opacity of the burden group.
ABNORMAL_OPACITY = codes.DCM.AbnormalOpacity

# --- Laterality (CID 244) -----------------------------------------------------------------------
LEFT = codes.SCT.Left  # SCT 7771000
RIGHT = codes.SCT.Right  # SCT 24028007

# --- Algorithm ------------------------------------------------------------------------------------
#: DCM 123110 "Artificial Intelligence" (CID 7162 Surface Processing Algorithm Families).
ARTIFICIAL_INTELLIGENCE = codes.DCM.ArtificialIntelligence
#: DCM 109102 "Processing Equipment" (CID 7005 Contributing Equipment Purposes of Reference).
PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment

# --- SR (TID 1500) --------------------------------------------------------------------------------
#: SCT 169069000 "Computed tomography of chest" as Procedure Reported (BCID 100, extensible).
CT_OF_CHEST = Code("169069000", "SCT", "CT of chest")
#: SCT 118565006 "Volume" (CID 7469 Generic Intensity and Size Measurements).
VOLUME = codes.SCT.Volume
#: DCM 113288 "Volume Ratio" (CID 7469): finding volume / lung field volume, in percent.
VOLUME_RATIO = codes.DCM.VolumeRatio
#: DCM 112031 "Attenuation Coefficient" (CID 7469), with derivation "Mean" below.
ATTENUATION_COEFFICIENT = codes.DCM.AttenuationCoefficient
#: SCT 373098007 "Mean" (CID 7464 Region of Interest Measurement Modifiers).
MEAN = codes.SCT.Mean

# --- Units (UCUM) -----------------------------------------------------------------------------------
#: UCUM "cm3": 1 cm3 = 1 mL, so the mL of :class:`~lungburden.quantify.Quantities` apply.
CUBIC_CENTIMETER = codes.UCUM.CubicCentimeter
PERCENT = codes.UCUM.Percent  # "%"
HOUNSFIELD_UNIT = codes.UCUM.HounsfieldUnit  # "[hnsf'U]"

# --- Lung zones (CID 6171 Zone of Lung) and the severity score ---------------------------------------
#: SCT 281392002 / 281393007 / 281394001 "Upper / Middle / Lower zone of lung" (CID 6171), with
#: Laterality (CID 244) as the finding site of each zone's numbers (zones, not lobes).
UPPER_ZONE_OF_LUNG = codes.SCT.UpperZoneOfLung
MIDDLE_ZONE_OF_LUNG = codes.SCT.MiddleZoneOfLung
LOWER_ZONE_OF_LUNG = codes.SCT.LowerZoneOfLung
LUNG_ZONES = {"upper": UPPER_ZONE_OF_LUNG, "middle": MIDDLE_ZONE_OF_LUNG, "lower": LOWER_ZONE_OF_LUNG}
#: SCT 246262008 "Score" with UCUM "1" (no units): the 0-5 score of a zone, the 0-30 total.
SCORE = codes.SCT.Score
NO_UNITS = codes.UCUM.NoUnits

# --- Comparison with a prior study ---------------------------------------------------------------------
#: DCM 121018 "Procedure Study Instance UID" (TID 1005): the prior study a group's numbers belong to.
PROCEDURE_STUDY_INSTANCE_UID = codes.DCM.ProcedureStudyInstanceUID
#: SCT 385673002 "Interval" in UCUM "d": days from the prior study to the current one.
INTERVAL = codes.SCT.Interval
DAY = codes.UCUM.Day
