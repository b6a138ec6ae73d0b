"""The OOD check's outcome as a TID 1501 measurement group of an SR: the model's OOD score and its threshold.

Every result SR of a model with an OOD check carries it (worker/encode_sr.py), so a reader sees how typical the
image was for the model; a "not evaluated" SR carries the same two numbers in its own group.
"""

from __future__ import annotations

from collections.abc import Mapping

import highdicom as hd
from pydicom.dataset import Dataset

from models.spec import ModelSpec
from worker.uids import derive_uid

SCHEME = "99PACSAI"
OOD_CHECK = hd.sr.CodedConcept(value="OOD-CHECK", scheme_designator=SCHEME, meaning="Out-of-distribution check")
OOD_SCORE = hd.sr.CodedConcept(value="OOD-SCORE", scheme_designator=SCHEME, meaning="OOD score")
OOD_THRESHOLD = hd.sr.CodedConcept(value="OOD-THRESHOLD", scheme_designator=SCHEME, meaning="OOD score threshold")
NO_UNITS = hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")


def ood_measurements(ood: tuple[float, float], spec: ModelSpec) -> list[hd.sr.Measurement]:
    """The score and the threshold above which the model does not evaluate, each with the algorithm (OHIF)."""
    algorithm = hd.sr.AlgorithmIdentification(name=spec.name[:64], version=spec.version[:64])
    return [
        hd.sr.Measurement(name=OOD_SCORE, value=ood[0], unit=NO_UNITS, algorithm_id=algorithm),
        hd.sr.Measurement(name=OOD_THRESHOLD, value=ood[1], unit=NO_UNITS, algorithm_id=algorithm),
    ]


def ood_group(
    ood: tuple[float, float], source: Dataset, spec: ModelSpec, uids: Mapping[str, str]
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One group on the series' first image with the OOD score and threshold."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_uid(uids["sr_series"], "tracking", "ood"), identifier="OOD check"
        ),
        finding_type=OOD_CHECK,
        algorithm_id=hd.sr.AlgorithmIdentification(name=spec.name[:64], version=spec.version[:64]),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        measurements=ood_measurements(ood, spec),
    )
