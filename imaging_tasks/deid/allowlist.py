"""Reviewed allow-lists for what PS3.15 Table E.1-1 does not list.

Table E.1-1 lists the attributes known to carry identifying information; everything else used to be kept.
That is right for geometry, pixel description and acquisition parameters, and wrong for free text: a
DocumentTitle (0042,0010) of an encapsulated PDF, a ContentDescription, an AcquisitionContextDescription can
hold a patient's name as easily as any comment the table lists.  Two rules, applied at every sequence depth
by the reference walker and the byte-level fast path alike (both ask ``rules.code_for``):

**Unlisted free text** (VR LO, SH, ST, LT, UT or UC, by the element's VR or by its dictionary VR): removed,
unless the attribute is in :data:`TEXT_ALLOWED` (coded or technical values: code sequence contents, equipment
make/model/software, pixel and LUT descriptions, acquisition parameter names, waveform channel labels...),
or it is in :data:`TEXT_REQUIRED`: an attribute a common IOD requires, which gets a dummy (Type 1) or an empty
value (Type 2) instead of being removed (SegmentLabel, DocumentTitle, ContentDescription).  The SR/graphic text
values and a few worklist comments keep their own rules (``rules.EXTRA_CODES``).

**Strict mode** (``DeidOptions(strict=True)``, CLI ``--option strict``): of everything the profile would keep
verbatim (action K: unlisted attributes of any VR, and the table's K), only what :data:`STRICT_ALLOWED` names is
kept; the rest is removed.  The profile's own replacements are written as usual (keyed pseudonymous UIDs and IDs,
shifted dates, dummies, emptied Type 2 attributes), and so is what an option the caller enabled explicitly
retains (e.g. ``retain_device_identity`` keeps StationName).  :data:`STRICT_ALLOWED` holds the attributes the
four specialties' processors, the warehouse header summary and common image IODs need (image pixel and plane,
LUTs, CT/MR/PET/MG/DX acquisition parameters, enhanced multi-frame functional groups, segmentation, waveform,
RT dose); an attribute missing from it is lost in strict mode, never leaked.

How the lists were reviewed: every unlisted attribute found in pydicom's test files, the charset files and the
synthetic studies of ``imaging_tasks.synth`` was classified by hand (what it means in the standard, whether a
person or a site can be named in it); the specialties' processors, ``index.py`` and ``rules.HEADER_FIELDS``
were grepped for the attributes they read.
``tests/test_deid_allowlist.py`` checks each keyword resolves, that no identifying attribute of the audit list
is allowed, and that strict mode keeps what the processors read.
"""
from __future__ import annotations

from types import MappingProxyType

from pydicom.datadict import tag_for_keyword

# Unlisted free-text attributes known to be safe (coded or technical values).
TEXT_ALLOWED_KEYWORDS = (
    # code sequence items (Code Sequence macro, coding scheme identification)
    "CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning", "LongCodeValue",
    "MappingResourceName", "CodingSchemeName", "CodingSchemeResponsibleOrganization",
    # equipment make, model and software (General Equipment; serial numbers and station names are listed)
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions",
    # pixel, LUT and presentation descriptions
    "RescaleType", "WindowCenterWidthExplanation", "LUTExplanation", "ProcessingFunction",
    "DimensionDescriptionLabel", "PositionReferenceIndicator",
    # acquisition parameter names (CT kernel/filter, MR sequence/coils/nucleus, CR plate, NM/PET methods)
    "ConvolutionKernel", "FilterType", "SequenceName", "PulseSequenceName", "ReceiveCoilName",
    "TransmitCoilName", "ImagedNucleus", "PlateType", "AcquisitionDeviceProcessingCode", "ContrastBolusRoute",
    "Radiopharmaceutical", "ReconstructionMethod", "AttenuationCorrectionMethod", "ScatterCorrectionMethod",
    # waveform channels, encapsulated document type, segmentation algorithm, de-identification method
    "MultiplexGroupLabel", "ChannelLabel", "MIMETypeOfEncapsulatedDocument", "SegmentAlgorithmName",
    "DeidentificationMethod",
)

# Unlisted free-text attributes a common IOD requires: "D" (Type 1: a dummy) or "Z" (Type 2: empty).
TEXT_REQUIRED_KEYWORDS = {
    "SegmentLabel": "D",  # Segment Description macro (Segmentation IOD), Type 1
    "DocumentTitle": "Z",  # Encapsulated Document module, Type 2
    "ContentDescription": "Z",  # Content Identification macro (presentation states, SEG, KOS), Type 2
}

# Strict mode: everything kept verbatim must be named here (the text allow-list is part of it).
STRICT_KEYWORDS = TEXT_ALLOWED_KEYWORDS + (
    # enhanced MR: the TR and echo times of a multi-frame BOLD live in these functional-group sequences
    "MRTimingAndRelatedParametersSequence", "MREchoSequence",
    # SOP common, general image/series, de-identification marks
    "SpecificCharacterSet", "SOPClassUID", "ImageType", "Modality", "InstanceNumber", "SeriesNumber",
    "AcquisitionNumber", "PatientIdentityRemoved", "DeidentificationMethodCodeSequence",
    "LongitudinalTemporalInformationModified", "BurnedInAnnotation", "RecognizableVisualFeatures",
    "LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod", "PresentationIntentType",
    "PatientOrientation", "PatientPosition", "BodyPartExamined", "Laterality", "ImageLaterality", "ViewPosition",
    "TypeOfPatientID", "QualityControlImage", "ContentQualification",
    # image pixel, palette, ICC, float pixel data
    "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "PlanarConfiguration", "PixelAspectRatio", "SmallestImagePixelValue",
    "LargestImagePixelValue", "PixelPaddingValue", "PixelPaddingRangeLimit", "NumberOfFrames",
    "FrameIncrementPointer", "RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData", "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData", "ICCProfile", "ColorSpace", "PixelData", "FloatPixelData",
    "DoubleFloatPixelData", "ExtendedOffsetTable", "ExtendedOffsetTableLengths", "FloatPixelPaddingValue",
    # image plane and geometry
    "PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing", "ImageOrientationPatient",
    "ImagePositionPatient", "SliceThickness", "SpacingBetweenSlices", "SliceLocation",
    "PixelSpacingCalibrationType", "EstimatedRadiographicMagnificationFactor",
    # modality / VOI / presentation LUTs
    "RescaleIntercept", "RescaleSlope", "WindowCenter", "WindowWidth", "VOILUTFunction", "ModalityLUTSequence",
    "VOILUTSequence", "LUTDescriptor", "LUTData", "ModalityLUTType", "PresentationLUTShape",
    "PixelIntensityRelationship", "PixelIntensityRelationshipSign",
    # CT acquisition
    "KVP", "DataCollectionDiameter", "ReconstructionDiameter", "DistanceSourceToDetector",
    "DistanceSourceToPatient", "GantryDetectorTilt", "TableHeight", "RotationDirection", "ExposureTime",
    "XRayTubeCurrent", "Exposure", "ExposureInuAs", "GeneratorPower", "FocalSpots", "RevolutionTime",
    "SingleCollimationWidth", "TotalCollimationWidth", "TableSpeed", "TableFeedPerRotation", "SpiralPitchFactor",
    "CTDIvol", "ScanOptions", "ReconstructionTargetCenterPatient",
    # MR acquisition
    "ScanningSequence", "SequenceVariant", "MRAcquisitionType", "AngioFlag", "RepetitionTime", "EchoTime",
    "InversionTime", "NumberOfAverages", "ImagingFrequency", "EchoNumbers", "MagneticFieldStrength",
    "NumberOfPhaseEncodingSteps", "EchoTrainLength", "PercentSampling", "PercentPhaseFieldOfView",
    "PixelBandwidth", "AcquisitionMatrix", "InPlanePhaseEncodingDirection", "FlipAngle", "VariableFlipAngleFlag",
    "SAR", "dBdt", "TriggerTime", "DiffusionBValue", "DiffusionGradientOrientation", "DiffusionDirectionality",
    "MRDiffusionSequence", "DiffusionGradientDirectionSequence", "AcquisitionContrast", "ComplexImageComponent",
    "PixelPresentation", "VolumetricProperties", "VolumeBasedCalculationTechnique", "TemporalPositionIdentifier",
    "NumberOfTemporalPositions", "TemporalResolution",
    # cardiac MR: cine timing, phase-contrast velocity encoding, real-world value mapping (velocity in cm/s)
    "CardiacNumberOfImages", "NominalInterval", "HeartRate", "LowRRValue", "HighRRValue", "IntervalsAcquired",
    "IntervalsRejected", "BeatRejectionFlag", "TriggerWindow", "CardiacSynchronizationTechnique",
    "NominalCardiacTriggerDelayTime", "CardiacSynchronizationSequence", "MRVelocityEncodingSequence",
    "VelocityEncodingDirection", "VelocityEncodingMinimumValue", "VelocityEncodingMaximumValue",
    "VelocityEncodingAcquisitionSequence", "PhaseContrast", "MRImageFrameTypeSequence", "FrameType",
    "RealWorldValueMappingSequence", "RealWorldValueSlope", "RealWorldValueIntercept",
    "RealWorldValueFirstValueMapped", "RealWorldValueLastValueMapped", "SequenceName",
    # PET / NM
    "Units", "CorrectedImage", "DecayCorrection", "SeriesType", "CountsSource", "RandomsCorrectionMethod",
    "DecayFactor", "DoseCalibrationFactor", "ScatterFractionFactor", "DeadTimeFactor", "FrameReferenceTime",
    "ActualFrameDuration", "ImageIndex", "NumberOfSlices", "RadiopharmaceuticalInformationSequence",
    "RadionuclideCodeSequence", "RadionuclideTotalDose", "RadionuclideHalfLife", "RadionuclidePositronFraction",
    "EnergyWindowVector", "DetectorVector", "NumberOfDetectors", "NumberOfEnergyWindows",
    # MG / DX / CR
    "ViewCodeSequence", "ViewModifierCodeSequence", "BodyPartThickness", "CompressionForce", "AnodeTargetMaterial",
    "FilterMaterial", "DetectorType", "ExposureIndex", "TargetExposureIndex", "DeviationIndex", "OrganDose",
    "EntranceDoseInmGy", "RelativeXRayExposure", "Sensitivity", "ExposureControlMode", "PartialView",
    "PositionerPrimaryAngle", "PositionerSecondaryAngle", "FieldOfViewShape", "FieldOfViewDimensions",
    "BreastImplantPresent", "ExaminedBodyThickness", "ImageAndFluoroscopyAreaDoseProduct",
    # coded anatomy and concepts
    "AnatomicRegionSequence", "AnatomicRegionModifierSequence", "PrimaryAnatomicStructureSequence",
    "ConceptNameCodeSequence", "ConceptCodeSequence", "MeasurementUnitsCodeSequence", "DerivationCodeSequence",
    "PurposeOfReferenceCodeSequence", "CodingSchemeIdentificationSequence", "CodingSchemeUID", "ContextIdentifier",
    "ContextUID", "MappingResource", "MappingResourceUID", "ContextGroupExtensionFlag", "URNCodeValue",
    # references (UIDs inside are replaced by the table's U)
    "ReferencedSOPClassUID", "ReferencedFrameNumber", "ReferencedSegmentNumber",
    # enhanced multi-frame functional groups and dimensions
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "PixelMeasuresSequence",
    "PlanePositionSequence", "PlaneOrientationSequence", "FrameContentSequence", "FrameAcquisitionNumber",
    "DimensionIndexValues", "StackID", "InStackPositionNumber", "TemporalPositionIndex",
    "DimensionOrganizationSequence", "DimensionIndexSequence", "DimensionIndexPointer", "FunctionalGroupPointer",
    "PixelValueTransformationSequence", "FrameVOILUTSequence", "DimensionOrganizationType",
    # segmentation
    "SegmentSequence", "SegmentNumber", "SegmentAlgorithmType", "SegmentedPropertyCategoryCodeSequence",
    "SegmentedPropertyTypeCodeSequence", "SegmentationType", "MaximumFractionalValue",
    "SegmentationFractionalType", "SegmentIdentificationSequence", "RecommendedDisplayCIELabValue",
    # waveform
    "WaveformSequence", "MultiplexGroupTimeOffset", "TriggerTimeOffset", "WaveformOriginality",
    "NumberOfWaveformChannels", "NumberOfWaveformSamples", "SamplingFrequency", "ChannelDefinitionSequence",
    "WaveformChannelNumber", "ChannelStatus", "ChannelSourceSequence", "ChannelSourceModifiersSequence",
    "ChannelSensitivity", "ChannelSensitivityUnitsSequence", "ChannelSensitivityCorrectionFactor",
    "ChannelBaseline", "ChannelTimeSkew", "ChannelSampleSkew", "ChannelOffset", "WaveformBitsStored",
    "FilterLowFrequency", "FilterHighFrequency", "NotchFilterFrequency", "NotchFilterBandwidth",
    "WaveformBitsAllocated", "WaveformSampleInterpretation", "WaveformPaddingValue", "WaveformData",
    # RT dose grid
    "DoseUnits", "DoseType", "DoseSummationType", "GridFrameOffsetVector", "DoseGridScaling",
)


def _tags(keywords) -> frozenset[int]:
    out = set()
    for kw in keywords:
        tag = tag_for_keyword(kw)
        if tag is None:
            raise ValueError(f"allow-list keyword {kw!r} is not in pydicom's DICOM dictionary")
        out.add(int(tag))
    return frozenset(out)


TEXT_ALLOWED: frozenset[int] = _tags(TEXT_ALLOWED_KEYWORDS)
TEXT_REQUIRED = MappingProxyType({int(tag_for_keyword(k)): code for k, code in TEXT_REQUIRED_KEYWORDS.items()})
STRICT_ALLOWED: frozenset[int] = _tags(STRICT_KEYWORDS)

__all__ = ["TEXT_ALLOWED", "TEXT_REQUIRED", "STRICT_ALLOWED", "TEXT_ALLOWED_KEYWORDS", "TEXT_REQUIRED_KEYWORDS",
           "STRICT_KEYWORDS"]
