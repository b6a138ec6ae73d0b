"""Issue #4: patient names in ISO_IR 100, ISO_IR 192, ISO 2022 IR 87 (Japanese), ISO 2022 IR 13 + IR 87 and
GB18030 come back unchanged in the SEG, SR and SC overlays the worker makes from a real CT series, and the text we
write ourselves (model and label names) is always encodable in the character set the result declares.

The sources are 12 slices of the shared CT with the Specific Character Set and Patient's Name of a corpus charset
file (its bytes as they are), and a Referring Physician's Name that pydicom encodes in that character set.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from pydicom import Dataset, dcmread
from pydicom.dataelem import DataElement
from pydicom.uid import UID
from pydicom.valuerep import PersonName

from models.registry import LoadedModel, load_model, load_spec, pick_device
from models.spec import Code, Label, ModelSpec
from tests.checks import dciodvfy_errors, read_strict, segmentation_spec, to_bytes
from tests.conftest import need
from worker.encode_seg import encode_seg
from worker.encode_sr import encode_sr
from worker.load_volume import load_series
from worker.pipeline import process_series
from worker.uids import output_uids

pytestmark = [pytest.mark.integration]
SLICES = 12
# corpus file → a second name that pydicom writes in that file's character set
REFERRING = {
    "chrFren.dcm": "Dupré^Hélène",  # ISO_IR 100
    "chrX1.dcm": "Müller^Zoë=王^小明",  # ISO_IR 192
    "chrH31.dcm": "Suzuki^Hanako=鈴木^花子=すずき^はなこ",  # \ISO 2022 IR 87
    "chrH32.dcm": "ｽｽﾞｷ^ﾊﾅｺ=鈴木^花子=すずき^はなこ",  # ISO 2022 IR 13\ISO 2022 IR 87
    "chrX2.dcm": "Li^Ming=李^明",  # GB18030
}
TEXT_VRS = {"SH", "LO", "ST", "LT", "UT", "UC", "PN"}
LANGUAGE_OF_CONTENT = "121049"  # DCM: Language of Content Item and Descendants (TID 1204)


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model(load_spec("ct-organs-tiny"), pick_device("cpu"))


def ct_slices(ct_series: Path) -> list[Path]:
    """The first SLICES slices along z: a contiguous volume the model accepts."""
    files = [p for p in ct_series.iterdir() if p.is_file() and p.name not in ("LICENSE", "README.md")]
    return sorted(files, key=lambda p: float(dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))[:SLICES]


def charset_series(ct_series: Path, corpus_file: Path, target: Path) -> Dataset:
    """Copy the CT with the corpus file's character set and name as raw bytes, and REFERRING encoded by pydicom;
    return the corpus file (decoded) for comparison."""
    corpus = dcmread(corpus_file)
    raw_charset, raw_name = corpus.get_item("SpecificCharacterSet").value, corpus.get_item("PatientName").value
    target.mkdir(parents=True)
    for index, path in enumerate(ct_slices(ct_series)):
        ds = dcmread(path)
        ds["SpecificCharacterSet"] = DataElement(0x00080005, "CS", raw_charset)
        ds["PatientName"] = DataElement(0x00100010, "PN", raw_name)
        ds.ReferringPhysicianName = REFERRING[corpus_file.name]
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "2.25.4001", "2.25.4002"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(f"2.25.4003{index}")
        ds.save_as(target / f"{index:02d}.dcm", enforce_file_format=True)
    corpus.decode()
    return corpus


def text_values(ds: Dataset, where: str = "") -> Iterator[tuple[str, str]]:
    """(position, value) of every text value at every depth, as str without trailing spaces (padding)."""
    for element in ds:
        if element.VR == "SQ":
            for index, item in enumerate(element.value):
                yield from text_values(item, f"{where}{element.keyword}[{index}].")
        elif element.VR in TEXT_VRS and element.value is not None:
            values = element.value if element.VM > 1 else [element.value]
            yield from ((f"{where}{element.keyword}", str(value).rstrip(" ")) for value in values)


def components(name: PersonName) -> tuple[str, str, str]:
    return name.alphabetic, name.ideographic, name.phonetic


def language_of(sr: Dataset) -> str:
    """The RFC 5646 code of the report's Language of Content Item and Descendants."""
    items = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == LANGUAGE_OF_CONTENT]
    return str(items[0].ConceptCodeSequence[0].CodeValue)


@pytest.mark.catalogue("C8")
@pytest.mark.parametrize("corpus_name", sorted(REFERRING))
def test_names_come_back_unchanged_in_seg_sr_and_overlays(
    corpus_name: str, model: LoadedModel, shared: Path, ct_series: Path, tmp_path: Path
) -> None:
    """The worker re-declares its inputs' text as UTF-8 (ISO_IR 192: one repertoire holds every source's and
    ours), so each result declares ISO_IR 192, holds the names as UTF-8 bytes, and reads back with the same
    alphabetic, ideographic and phonetic groups as the source; every text value survives the write (nothing
    became "?"), dciodvfy finds no error, and the SR says its content is English, the language we write."""
    need("dciodvfy")
    corpus = charset_series(
        ct_series, shared / "dicom" / "pydicom" / "charset_files" / corpus_name, tmp_path / "source"
    )
    source = dcmread(tmp_path / "source" / "00.dcm")
    source.decode()
    assert str(source.PatientName) == str(corpus.PatientName)
    results = process_series(sorted((tmp_path / "source").iterdir()), model, overlays=True)
    kinds = [str(ds.Modality) for ds in results]
    assert kinds[:2] == ["SEG", "SR"] and len(kinds) > 2 and set(kinds[2:]) == {"OT"}
    for index, built in enumerate(results[:3]):  # the SEG, the SR and the first overlay
        data = to_bytes(built)
        back = read_strict(data)
        assert back.SpecificCharacterSet == "ISO_IR 192"
        assert back.get_item("PatientName").value == str(corpus.PatientName).encode("utf-8")
        assert str(back.PatientName) == str(corpus.PatientName)
        assert components(back.PatientName) == components(corpus.PatientName)
        assert components(back.ReferringPhysicianName) == components(source.ReferringPhysicianName)
        assert list(text_values(back)) == list(text_values(built)), "a text value did not survive the write"
        (tmp_path / f"{index}.dcm").write_bytes(data)
        assert dciodvfy_errors(tmp_path / f"{index}.dcm") == [], f"dciodvfy errors in the {back.Modality}"
    assert language_of(read_strict(to_bytes(results[1]))) == "en-US"


ANATOMY = Code("123037004", "Anatomical Structure")
LIVER = Label(1, "Leber (肝臓)", ANATOMY, Code("10200004", "Liver"), (221, 130, 101))
SPLEEN = Label(2, "Milz", ANATOMY, Code("78961009", "Spleen"), (157, 108, 162))


def spec_with(*labels: Label, name: str = "ct-organs-tiny") -> ModelSpec:
    return segmentation_spec(*labels, name=name)


def default_repertoire_series(ct_series: Path, target: Path) -> list[Path]:
    """The CT without a Specific Character Set (the default repertoire: ASCII only)."""
    target.mkdir(parents=True)
    for index, path in enumerate(ct_slices(ct_series)):
        ds = dcmread(path)
        del ds.SpecificCharacterSet
        ds.save_as(target / f"{index:02d}.dcm", enforce_file_format=True)
    return sorted(target.iterdir())


def label_map_of(shape: tuple[int, ...]) -> NDArray[np.uint8]:
    labels = np.zeros(shape, dtype=np.uint8)
    labels[2:8, 100:200, 150:260] = LIVER.number
    labels[4:9, 300:340, 330:370] = SPLEEN.number
    return labels


def test_our_own_non_ascii_text_makes_a_default_repertoire_result_declare_utf8(ct_series: Path, tmp_path: Path) -> None:
    """A source in the default repertoire and a spec whose label and model names are not ASCII: the SEG and SR
    declare ISO_IR 192 and hold those names, instead of writing them as "?" (or as undeclared latin-1)."""
    need("dciodvfy")
    volume = load_series(default_repertoire_series(ct_series, tmp_path / "source"))
    assert "SpecificCharacterSet" not in volume.datasets[0]
    spec = spec_with(LIVER, SPLEEN, name="organe-ü")
    uids = output_uids(str(volume.datasets[0].SeriesInstanceUID), spec.name, spec.version)
    label_map = label_map_of(volume.array.shape)
    seg = encode_seg(volume, label_map, spec, uids, software_version="pacsai test")
    sr = encode_sr(seg, volume, label_map, spec, uids, software_version="pacsai test")
    for index, built in enumerate((seg, sr)):
        data = to_bytes(built)
        back = read_strict(data)
        assert back.SpecificCharacterSet == "ISO_IR 192"
        assert back.ManufacturerModelName == "organe-ü"
        assert list(text_values(back)) == list(text_values(built))
        (tmp_path / f"{index}.dcm").write_bytes(data)
        assert dciodvfy_errors(tmp_path / f"{index}.dcm") == []
    assert [str(item.SegmentLabel) for item in read_strict(to_bytes(seg)).SegmentSequence] == ["Leber (肝臓)", "Milz"]
    identifiers = [value for where, value in text_values(read_strict(to_bytes(sr))) if where.endswith("TextValue")]
    assert "Leber (肝臓)" in identifiers


def test_an_ascii_result_of_a_default_repertoire_source_declares_nothing(ct_series: Path, tmp_path: Path) -> None:
    """Nothing to declare: a source without Specific Character Set and ASCII names of ours give results without
    one, like their source."""
    volume = load_series(default_repertoire_series(ct_series, tmp_path / "source"))
    spec = spec_with(Label(1, "liver", ANATOMY, Code("10200004", "Liver"), (221, 130, 101)))
    uids = output_uids(str(volume.datasets[0].SeriesInstanceUID), spec.name, spec.version)
    label_map = label_map_of(volume.array.shape) * (label_map_of(volume.array.shape) == 1)
    seg = encode_seg(volume, label_map, spec, uids, software_version="pacsai test")
    sr = encode_sr(seg, volume, label_map, spec, uids, software_version="pacsai test")
    for built in (seg, sr):
        assert "SpecificCharacterSet" not in read_strict(to_bytes(built))
