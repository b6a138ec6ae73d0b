"""models/domain.py: the `domain:` block of a spec and each criterion of the header check."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from pydicom.dataset import Dataset

from models.domain import Domain, SeriesHeader, Unknown, age_years, check_domain, parse_domain, series_header

CHILD_CHEST = SeriesHeader(
    modality="CR",
    sop_class="1.2.840.10008.5.1.4.1.1.1",
    body_part="CHEST",
    view="AP",
    age_years=3.0,
    pixel_spacing_mm=(0.2, 0.2),
    rows=1000,
    columns=800,
    slices=1,
    photometric="MONOCHROME2",
)
CXR: dict[str, Any] = {
    "modalities": ["CR", "DX"],
    "sop_classes": ["1.2.840.10008.5.1.4.1.1.1"],
    "body_parts": ["chest"],
    "views": ["AP", "PA"],
    "age_years": [1, 5],
    "unknown_age": "refuse",
    "pixel_spacing_mm": [0.05, 0.5],
    "field_of_view_mm": [120, 450],
    "slices": [1, 1],
    "photometric": ["MONOCHROME1", "MONOCHROME2"],
}


def test_a_spec_block_parses_into_a_domain() -> None:
    domain = parse_domain(CXR)
    assert domain is not None
    assert domain.body_parts == ("CHEST",) and domain.unknown_age is Unknown.REFUSE
    assert domain.age_years == (1.0, 5.0) and domain.slices == (1.0, 1.0)
    assert parse_domain(None) is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"modality": ["CR"]}, "unknown fields modality"),
        ({"modalities": "CR"}, "domain.modalities must be a list"),
        ({"age_years": [5, 1]}, "domain.age_years needs"),
        ([1, 2], "domain must be a mapping"),
    ],
)
def test_a_wrong_domain_block_names_its_field(raw: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_domain(raw)


def test_bad_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_domain({"unknown_age": "maybe"})


def _domain() -> Domain:
    domain = parse_domain(CXR)
    assert domain is not None
    return domain


def test_a_header_inside_every_range_passes() -> None:
    assert check_domain(_domain(), CHILD_CHEST) == []


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"modality": "CT"}, "modality CT is not one of CR, DX"),
        ({"sop_class": "1.2.840.10008.5.1.4.1.1.7"}, "SOP class 1.2.840.10008.5.1.4.1.1.7 is not one of"),
        ({"photometric": "RGB"}, "photometric interpretation RGB is not one of MONOCHROME1, MONOCHROME2"),
        ({"species": "CANIS LUPUS"}, "patient species is not human"),
        ({"body_part": "PELVIS"}, "body part PELVIS is not one of CHEST"),
        ({"view": "LL"}, "view position LL is not one of AP, PA"),
        ({"age_years": 64.0}, "patient age 64 years is outside 1–5 years"),
        ({"age_years": None}, "patient age is not known and the model needs 1–5 years"),
        ({"pixel_spacing_mm": (1.2, 1.2)}, "pixel spacing 1.2 mm is outside 0.05–0.5 mm"),
        ({"pixel_spacing_mm": None}, "pixel spacing is not known"),
        ({"rows": 3000, "columns": 3000}, "field of view 600 mm is outside 120–450 mm"),
        ({"slices": 2}, "image count 2 is outside 1–1"),
    ],
)
def test_each_criterion_refuses_with_its_reason(change: dict[str, Any], reason: str) -> None:
    reasons = check_domain(_domain(), dataclasses.replace(CHILD_CHEST, **change))
    assert any(r.startswith(reason) for r in reasons), reasons


def test_an_absent_body_part_or_view_follows_the_unknown_policy() -> None:
    domain = _domain()
    blank = dataclasses.replace(CHILD_CHEST, body_part="", view="")
    assert check_domain(domain, blank) == []  # accept is the default
    strict = dataclasses.replace(domain, unknown_body_part=Unknown.REFUSE, unknown_view=Unknown.REFUSE)
    assert check_domain(strict, blank) == [
        "body part is not stated and the model needs one of CHEST",
        "view position is not stated and the model needs one of AP, PA",
    ]


def test_a_domain_without_constraints_takes_anything() -> None:
    assert check_domain(Domain(), dataclasses.replace(CHILD_CHEST, modality="MR", slices=300)) == []


def _ds(**values: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("values", "years"),
    [
        ({"PatientAge": "005Y"}, 5.0),
        ({"PatientAge": "018M"}, 1.5),
        ({"PatientAge": "026W"}, 26 * 7 / 365.25),
        ({"PatientBirthDate": "20200615", "StudyDate": "20230614"}, 2.0),
        ({"PatientBirthDate": "20200615", "StudyDate": "20230615"}, 3.0),
        ({"PatientBirthDate": "20230615", "StudyDate": "20200615"}, None),
        ({"PatientAge": "5 years"}, None),
        ({"PatientAge": "000Y"}, None),  # a removed age (de-identified), not a newborn
        ({"PatientAge": "000Y", "PatientBirthDate": "19700101", "StudyDate": "20230615"}, 53.0),
        ({"PatientAge": "000D"}, 0.0),  # stated in days: a newborn
        ({}, None),
    ],
)
def test_age_in_completed_years(values: dict[str, str], years: float | None) -> None:
    assert age_years(_ds(**values)) == (None if years is None else pytest.approx(years))


def test_series_header_from_pydicom_headers() -> None:
    first = _ds(
        Modality="DX",
        SOPClassUID="1.2.840.10008.5.1.4.1.1.1.1",
        BodyPartExamined="chest",
        ViewPosition="pa",
        PatientAge="004Y",
        ImagerPixelSpacing=[0.15, 0.15],
        Rows=2000,
        Columns=1600,
        PhotometricInterpretation="MONOCHROME1",
    )
    header = series_header([first, _ds(NumberOfFrames=3)])
    assert (header.body_part, header.view, header.age_years) == ("CHEST", "PA", 4.0)
    assert header.pixel_spacing_mm == (0.15, 0.15) and header.field_of_view_mm == pytest.approx(300.0)
    assert header.slices == 4  # one image plus a three-frame one


def test_an_enhanced_multiframe_spacing_is_read_from_the_shared_groups() -> None:
    measures = _ds(PixelSpacing=[0.8, 0.8])
    shared = _ds(PixelMeasuresSequence=[measures])
    header = series_header([_ds(Modality="CT", Rows=512, Columns=512, SharedFunctionalGroupsSequence=[shared])])
    assert header.pixel_spacing_mm == (0.8, 0.8)
    assert series_header([_ds(Modality="CT", PixelSpacing=[0, 1])]).pixel_spacing_mm is None


def test_an_enhanced_multiframe_spacing_given_per_frame_only_is_read_from_the_first_frame() -> None:
    frames = [_ds(PixelMeasuresSequence=[_ds(PixelSpacing=[0.5, 0.6])]) for _ in range(3)]
    shared = _ds(PlaneOrientationSequence=[_ds(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])])  # no pixel measures
    header = series_header(
        [
            _ds(
                Modality="MR",
                Rows=256,
                Columns=256,
                NumberOfFrames=3,
                SharedFunctionalGroupsSequence=[shared],
                PerFrameFunctionalGroupsSequence=frames,
            )
        ]
    )
    assert header.pixel_spacing_mm == (0.5, 0.6)
    assert header.field_of_view_mm == pytest.approx(max(256 * 0.5, 256 * 0.6))
