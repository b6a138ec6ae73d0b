"""TID 1600 Image Library of an SR: one entry per source instance, described with what its header holds.

highdicom's ImageLibrary needs every TID 1603/1604 attribute (PixelSpacing, SliceThickness, ImagePositionPatient…,
PatientOrientation, ImagerPixelSpacing) and has no place for an enhanced multi-frame source's shared functional
groups; ours describes each entry with the attributes present and leaves out the others, which TID 1602 allows.
OHIF's SR loader lists the images of the library's first group, so all entries go in one group. Descriptors equal
for every entry (modality, frame of reference, size, spacing, thickness, orientation in a plain CT series) are
stated once for the group (TID 1600 row 3, TID 1602 at group level); an entry then holds what differs, its
position: a 300-slice CT's library has ~4 instead of ~16 items per entry, which pydicom writes 4× faster.
Descriptors are read from the headers as plain values first; an item of any value type is made once per distinct
descriptor, from concepts made once: a 300-slice CT's library makes ~315 descriptor items (was ~930, modality and
frame of reference once per entry) and no CodedConcept per item (each costs highdicom and pydicom ~0.1 ms).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DataElementSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

_CONTEXT = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS
_SOURCE = hd.sr.CodedConcept(value="260753009", scheme_designator="SCT", meaning="Source")
_Key = tuple[str, str, str, str, str]  # concept name (value, scheme), the value, unit (value, scheme)


class _Term(NamedTuple):
    """A concept made once, with its value and scheme as plain strings (a CodedConcept's are slow attributes)."""

    concept: hd.sr.CodedConcept
    value: str
    scheme: str


def _terms(*codes_: Code) -> tuple[_Term, ...]:
    return tuple(_Term(hd.sr.CodedConcept.from_code(code), code.value, code.scheme_designator) for code in codes_)


_PIXELS, _COSINE = _terms(Code("{pixels}", "UCUM", "pixels"), Code("{-1:1}", "UCUM", "{-1:1}"))
(_MM,) = _terms(codes.UCUM.Millimeter)
_MODALITY, _FRAME_OF_REFERENCE, _ROWS, _COLUMNS = _terms(
    codes.DCM.Modality, codes.DCM.FrameOfReferenceUID, codes.DCM.PixelDataRows, codes.DCM.PixelDataColumns
)
_PATIENT_ORIENTATION = _terms(codes.DCM.PatientOrientationRow, codes.DCM.PatientOrientationColumn)
_HORIZONTAL, _VERTICAL, _THICKNESS = _terms(
    codes.DCM.HorizontalPixelSpacing, codes.DCM.VerticalPixelSpacing, codes.DCM.SliceThickness
)
_POSITION = _terms(codes.DCM.ImagePositionPatientX, codes.DCM.ImagePositionPatientY, codes.DCM.ImagePositionPatientZ)
_ORIENTATION = _terms(
    codes.DCM.ImageOrientationPatientRowX,
    codes.DCM.ImageOrientationPatientRowY,
    codes.DCM.ImageOrientationPatientRowZ,
    codes.DCM.ImageOrientationPatientColumnX,
    codes.DCM.ImageOrientationPatientColumnY,
    codes.DCM.ImageOrientationPatientColumnZ,
)
_MODALITIES = {term.value: term for term in _terms(*(getattr(codes.cid33, kw) for kw in codes.cid33.dir()))}


class _Row(NamedTuple):
    """One TID 1602 descriptor before it is an item: its key, value type, concept name, value and (NUM) unit."""

    key: _Key
    value_type: hd.sr.ValueTypeValues
    name: _Term
    value: _Term | str | int | float
    unit: _Term | None = None


def image_library(sources: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """The Image Library container (DCM 111028) listing each distinct source instance once, in the given order."""
    described: dict[str, tuple[Dataset, list[_Row]]] = {}
    for ds in sources:
        if str(ds.SOPInstanceUID) not in described:
            described[str(ds.SOPInstanceUID)] = ds, _descriptors(ds)
    entries = list(described.values())
    common: set[_Key] = set()  # stated once for the group: the descriptors all of several entries share
    if len(entries) > 1:
        common = set.intersection(*({row.key for row in rows} for _, rows in entries))
    made: dict[_Key, hd.sr.ContentItem] = {}  # descriptors with the same key are one item, shared by the entries
    shared = [_item(row, made) for row in entries[0][1] if row.key in common] if entries else []
    group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=_CONTAINS)
    group.ContentSequence = DataElementSequence(  # highdicom makes it a ContentSequence (one twice)
        shared + [_entry(ds, [_item(row, made) for row in rows if row.key not in common]) for ds, rows in entries]
    )
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=_CONTAINS)
    library.ContentSequence = DataElementSequence([group])
    return library


def with_library(report: hd.sr.MeasurementReport, sources: Sequence[Dataset]) -> hd.sr.MeasurementReport:
    """`report` with an Image Library just before its Imaging Measurements (TID 1500 row order); returns `report`."""
    content = report[0].ContentSequence
    position = next(
        index
        for index, item in enumerate(content)
        if item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ImagingMeasurements.value
    )
    content.insert(position, image_library(sources))
    return report


def _entry(ds: Dataset, descriptors: list[hd.sr.ContentItem]) -> hd.sr.ImageContentItem:
    """TID 1601: the image and the TID 1602 descriptors not stated for its whole group."""
    entry = hd.sr.ImageContentItem(
        name=_SOURCE,
        referenced_sop_class_uid=ds.SOPClassUID,
        referenced_sop_instance_uid=ds.SOPInstanceUID,
        relationship_type=_CONTAINS,
    )
    if descriptors:
        entry.ContentSequence = DataElementSequence(descriptors)
    return entry


def _item(row: _Row, made: dict[_Key, hd.sr.ContentItem]) -> hd.sr.ContentItem:
    """The content item of a descriptor, made the first time its key is asked for."""
    if row.key not in made:
        made[row.key] = _make(row)
    return made[row.key]


def _make(row: _Row) -> hd.sr.ContentItem:
    name, value = row.name.concept, row.value
    if isinstance(value, (int, float)) and row.unit is not None:
        return hd.sr.NumContentItem(name=name, value=value, unit=row.unit.concept, relationship_type=_CONTEXT)
    if isinstance(value, _Term):
        return hd.sr.CodeContentItem(name=name, value=value.concept, relationship_type=_CONTEXT)
    if row.value_type is hd.sr.ValueTypeValues.UIDREF:
        return hd.sr.UIDRefContentItem(name=name, value=str(value), relationship_type=_CONTEXT)
    return hd.sr.TextContentItem(name=name, value=str(value), relationship_type=_CONTEXT)


def _descriptors(ds: Dataset) -> list[_Row]:
    """TID 1602 for one image (modality, frame of reference, size, and geometry)."""
    rows: list[_Row] = []
    modality = _MODALITIES.get(str(ds.get("Modality", "")))
    if modality is not None:
        rows.append(_coded(hd.sr.ValueTypeValues.CODE, _MODALITY, modality))
    if uid := ds.get("FrameOfReferenceUID"):
        rows.append(_coded(hd.sr.ValueTypeValues.UIDREF, _FRAME_OF_REFERENCE, str(uid)))
    rows += [_number(_ROWS, int(ds.Rows), _PIXELS), _number(_COLUMNS, int(ds.Columns), _PIXELS)]
    return rows + _geometry(ds)


def _coded(value_type: hd.sr.ValueTypeValues, name: _Term, value: _Term | str) -> _Row:
    text = value.value if isinstance(value, _Term) else value
    return _Row((name.value, name.scheme, text, "", ""), value_type, name, value)


def _geometry(ds: Dataset) -> list[_Row]:
    """TID 1604 (cross-sectional) or 1603 (projection) descriptors that the header (or its shared groups) holds."""
    shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else Dataset()
    measures = shared.PixelMeasuresSequence[0] if shared.get("PixelMeasuresSequence") else Dataset()
    plane = shared.PlaneOrientationSequence[0] if shared.get("PlaneOrientationSequence") else Dataset()
    spacing = ds.get("PixelSpacing") or measures.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    thickness = ds.get("SliceThickness") or measures.get("SliceThickness")
    orientation = ds.get("ImageOrientationPatient") or plane.get("ImageOrientationPatient")
    rows: list[_Row] = []
    if (patient := ds.get("PatientOrientation")) and len(patient) == 2:
        rows += [
            _coded(hd.sr.ValueTypeValues.TEXT, name, str(value))
            for name, value in zip(_PATIENT_ORIENTATION, patient, strict=True)
        ]
    if spacing and all(float(v) > 0 for v in spacing):
        rows += [_number(_HORIZONTAL, spacing[1], _MM), _number(_VERTICAL, spacing[0], _MM)]
    if thickness:
        rows.append(_number(_THICKNESS, thickness, _MM))
    if position := ds.get("ImagePositionPatient"):
        rows += [_number(name, value, _MM) for name, value in zip(_POSITION, position, strict=True)]
    if orientation:
        rows += [_number(name, value, _COSINE) for name, value in zip(_ORIENTATION, orientation, strict=True)]
    return rows


def _number(name: _Term, value: object, unit: _Term) -> _Row:
    number = value if isinstance(value, int) else float(str(value))  # DS values arrive as DSfloat or str
    key = (name.value, name.scheme, repr(number), unit.value, unit.scheme)
    return _Row(key, hd.sr.ValueTypeValues.NUM, name, number, unit)
