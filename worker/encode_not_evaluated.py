"""Step 7 (refusal): the SR saying the model did not evaluate a series and why; no probability, no segment.

A TID 1500 report with one TID 1501 group on the series' first image: a TEXT item "Not evaluated by the model"
(private scheme 99PACSAI) holding the reason and, when the OOD check ran, its score and threshold as numeric items.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from models.spec import ModelSpec
from worker.encode_seg import DISCLAIMER, LO_MAX
from worker.encode_sr import _algorithm, measurement_report, sr_document
from worker.image_library import with_library
from worker.uids import derive_uid

SCHEME = "99PACSAI"
NOT_EVALUATED = hd.sr.CodedConcept(value="NOT-EVALUATED", scheme_designator=SCHEME, meaning="Not evaluated by model")
OOD_SCORE = hd.sr.CodedConcept(value="OOD-SCORE", scheme_designator=SCHEME, meaning="OOD score")
OOD_THRESHOLD = hd.sr.CodedConcept(value="OOD-THRESHOLD", scheme_designator=SCHEME, meaning="OOD score threshold")
_NO_UNITS = hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")


def encode_not_evaluated_sr(
    sources: Sequence[Dataset],
    reason: str,
    ood: tuple[float, float] | None,
    spec: ModelSpec,
    uids: Mapping[str, str],
    *,
    software_version: str,
    revision: int = 1,
) -> hd.sr.Comprehensive3DSR:
    """The refusal report for a series (`sources`: its image headers); uids needs "sr_series" and "sr_instance"."""
    group = _refusal_group(sources, reason, ood, spec, uids)
    report = measurement_report(spec, codes.SCT.ImagingProcedure, [group])
    with_library(report, sources)  # OHIF's SR loader (3.10/3.11) throws on a report without an Image Library
    return sr_document(
        report,
        sources,
        spec,
        uids,
        software_version,
        revision,
        None,
        description=not_evaluated_description(spec.name, revision),
    )


def not_evaluated_description(name: str, revision: int = 1) -> str:
    """ "AI <model> not evaluated - not for diagnosis" ("... v2" for a later revision) within one LO value: a long
    model name is shortened with "...", never the words "not evaluated" nor the disclaimer."""
    tail = " not evaluated" + (f" v{revision}" if revision > 1 else "") + DISCLAIMER
    room = LO_MAX - len("AI ") - len(tail)
    shown = name if len(name) <= room else name[: room - 3] + "..."
    return f"AI {shown}{tail}"


def _refusal_group(
    sources: Sequence[Dataset],
    reason: str,
    ood: tuple[float, float] | None,
    spec: ModelSpec,
    uids: Mapping[str, str],
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The report's one measurement group: "not evaluated", why, and the OOD score when there is one. Its finding
    type is never the model's finding (a viewer would show "Pneumonia" as the group's title)."""
    finding = NOT_EVALUATED
    measurements = []
    if ood is not None:
        measurements = [
            hd.sr.Measurement(name=OOD_SCORE, value=ood[0], unit=_NO_UNITS, algorithm_id=_algorithm(spec)),
            hd.sr.Measurement(name=OOD_THRESHOLD, value=ood[1], unit=_NO_UNITS, algorithm_id=_algorithm(spec)),
        ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_uid(uids["sr_series"], "tracking", "not-evaluated"), identifier="not evaluated"
        ),
        finding_type=finding,
        algorithm_id=_algorithm(spec),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(sources[0])],
        measurements=measurements or None,
    )
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=NOT_EVALUATED,
            value=clip_ut(f"{spec.name} {spec.version} did not evaluate this series: {reason}"),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def clip_ut(text: str) -> str:
    """A TEXT item's value is UT but keep it readable in one line of a viewer."""
    return text if len(text) <= 1024 else text[:1023] + "…"
