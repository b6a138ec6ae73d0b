"""A10: de-identified copies of a series for models that run outside the hospital, and re-identified results.

The copy follows PS3.15 Annex E, Basic Application Level Confidentiality Profile (Table E.1-1 of the 2025 edition),
with no retain option. The identity map (pseudonym UID → original UID, and the source's patient and study attributes)
is written next to the original instances in the node's spool, never under `spool/deid/`, the only part of the spool a
remote worker mounts; the delivery task, which runs on the node's host, re-identifies each result from it.
docs/security.md §8 says what is removed and kept, and how to deploy remote workers.

Over 300 lines on purpose: the Annex E attribute actions are one table, read with the code that applies them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag

from pacsai import audit
from pacsai.errors import PeerRefused, PeerUnavailable, StudyRejected
from pacsai.settings import Settings
from pacsai.state import JobRow
from pacsai.storage import DEID_DIR, Spool, write_atomic

METHOD = "PS3.15 E.1 Basic Profile, no options (pacsai)"
BASIC_PROFILE = ("113100", "DCM", "Basic Application Confidentiality Profile")
# modalities whose pixels often carry the patient's name or dates as burned-in text, and secondary captures
BURNED_IN_MODALITIES = frozenset({"US", "IVUS", "XA", "RF", "ES", "XC", "GM", "SM", "SC", "OT", "DOC"})
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_DICOM_ROOT = "1.2.840.10008."  # UIDs the standard defines (SOP classes, coding schemes): never replaced
# restored on each result: the patient, patient study and general study attributes a PACS files and shows it by
_IDENTITY = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientComments",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyID",
    "ReferringPhysicianName",
    "StudyDescription",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "LongitudinalTemporalInformationModified",
)
_MARKERS = (
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "LongitudinalTemporalInformationModified",
)

# Table E.1-1, basic profile column, by action. Where the table offers a choice, whose pick depends on the
# attribute's type in each IOD, we take: X/D → X (remove); Z/D → Z (empty); X/Z and X/Z/D → "X/Z": Z for a value,
# X for a sequence (an empty sequence is wrong where it is optional, and results copy some of them); X/Z/U*
# (Referenced/Source Image Sequence) → U: kept, every UID inside replaced. D on a sequence or a binary value removes
# it. Private attributes, curves (50xx) and overlays (60xx) go whole.
_TABLE = {
    "X": """
    00001000 00080012 00080015 00080021 00080024 00080025 00080031 00080034 00080035 00080054 00080055 00080081
    00080092 00080094 00080096 0008009D 00080201 00081000 00081030 0008103E 00081040 00081041 00081048 00081049
    00081050 00081052 00081060 00081062 00081072 00081080 00081084 00081088 00081120 00082111 00084000 00100021
    00100032 00100050 00100101 00100102 00101000 00101001 00101002 00101005 00101010 00101020 00101030 00101040
    00101050 00101060 00101080 00101081 00101090 00101100 00102000 00102110 00102150 00102152 00102154 00102155
    00102160 00102180 001021A0 001021B0 001021C0 001021D0 001021F0 00102297 00102299 00104000 00120022 00120023
    00120032 00120041 00120043 00120051 00120055 00120071 00120072 00120073 00120082 00120086 00120087 0014407C
    0014407E 0016002B 0016004B 0016004D 0016004E 0016004F 00160050 00160051 00160070 00160071 00160072 00160073
    00160074 00160075 00160076 00160077 00160078 00160079 0016007A 0016007B 0016007C 0016007D 0016007E 0016007F
    00160080 00160081 00160082 00160083 00160084 00160085 00160086 00160087 00160088 00160089 0016008A 0016008B
    0016008C 0016008D 0016008E 00180027 00180035 00181004 00181005 00181007 00181008 00181009 0018100A 00181012
    00181014 00181030 00181042 00181043 00181072 00181073 00181078 00181079 00181200 00181201 00181202 00181204
    00181205 00181400 00184000 00185011 0018700A 0018700C 0018700E 00189185 00189373 0018937B 0018937F 00189424
    00189516 00189517 00189937 0018A002 0018A003 00200027 00203401 00203403 00203405 00203406 00204000 00209158
    00284000 00320012 00320032 00320033 00320034 00320035 00321000 00321001 00321010 00321011 00321020 00321021
    00321030 00321032 00321033 00321040 00321041 00321050 00321051 00321066 00321067 00321070 00324000 00380004
    00380010 00380011 00380014 0038001A 0038001B 0038001C 0038001D 0038001E 00380020 00380021 00380030 00380032
    00380040 00380050 00380060 00380061 00380062 00380064 00380300 00380400 00380500 00384000 003A0329 003A032B
    00400001 00400002 00400003 00400004 00400005 00400006 00400007 00400009 0040000B 00400010 00400011 00400012
    00400241 00400242 00400243 00400244 00400245 00400250 00400251 00400253 00400254 00400275 00400280 00400310
    0040050A 0040051A 00400600 00400602 004006FA 00401001 00401002 00401004 00401005 0040100A 00401010 00401011
    00401102 00401103 00401104 00401400 00402001 00402004 00402005 00402008 00402009 00402010 00402011 00402400
    00403001 00404005 00404008 00404010 00404011 00404025 00404027 00404028 00404030 00404034 00404035 00404036
    00404037 00404050 00404051 00404052 0040A023 0040A024 0040A032 0040A033 0040A078 0040A07A 0040A07C 0040A110
    0040A112 0040A192 0040A193 0040A307 0040A352 0040A353 0040A354 0040A358 0040DB06 0040DB07 0040E004 00440004
    0044000B 00440010 00440105 0050001B 00500020 00500021 006A0006 00700082 00700083 00700086 00741234 00741236
    00880200 00880904 00880906 00880910 00880912 01000420 04000310 04000402 04000403 04000404 04000550 04000551
    04000552 04000561 04000600 20300020 21000040 21000050 21000070 30020121 30020123 30060004 30060006 30060028
    3006002D 3006002E 30060038 3006004D 3006004E 30060085 30060088 30080054 30080056 30080250 30080251 300A0003
    300A0004 300A0006 300A0007 300A000B 300A000E 300A0016 300A0072 300A00C3 300A00DD 300A0196 300A01A6 300A01B2
    300A0216 300A02EB 300A0676 300A078E 300A0792 300A0794 300A079A 300C0113 30100036 30100037 3010004C 3010004D
    30100056 30100061 30100077 30100085 40000010 40004000 40080040 40080042 40080100 40080101 40080102 40080108
    40080109 4008010A 4008010B 4008010C 40080111 40080112 40080113 40080114 40080115 40080118 40080119 4008011A
    40080200 40080202 40080300 40084000 FFFAFFFA FFFCFFFC
""",
    "Z": """
    00080020 00080023 00080030 00080033 00080050 00080090 0008009C 00100010 00100020 00100030 00100040 00120021
    00120030 00120031 00120050 00120060 00180010 00181203 00189919 00200010 00400513 00400562 00400610 00402016
    00402017 0040A082 0040A088 00700084 04000564 30060008 30060009 30060026 300600A6 300A0611 300A0615 300A067D
    300E0004 300E0005 3010000F 30100017 3010001B 30100043 3010005A 3010005C 3010007A 3010007B 3010007F 30100081
""",
    "X/Z": """
    00080013 00080022 0008002A 00080032 00080080 00080082 00081010 00081070 00081110 00081111 00102203 00181000
    00321060 00400555 22000002 22000005 30080105 300A00B2 300E0008
""",
    "D": """
    00080106 00080107 00120010 00120020 00120040 00120042 00120081 001811BB 00189074 00189151 00189367 00189369
    0018936A 00189371 00189623 00189701 00189804 00340001 00340002 00340005 00340007 003A0314 00400512 00400551
    00401101 0040A027 0040A030 0040A073 0040A075 0040A120 0040A121 0040A122 0040A123 0040A13A 0040A730 00420011
    00440104 00686226 00686270 006A0003 006A0005 00700001 0072000A 0072005E 0072005F 00720061 00720063 00720065
    00720066 00720068 0072006A 0072006B 0072006C 0072006D 0072006E 00720070 00720071 04000105 04000115 04000562
    04000563 04000565 21000140 30060002 30080024 30080025 30080162 30080164 30080166 30080168 300A0002 300A022C
    300A022E 300A0608 300A0619 300A0623 300A062A 300A067C 300A0734 300A0736 300A073A 300A0741 300A0742 300A0760
    300A0783 300C0127 3010002D 30100033 30100034 30100035 30100038 30100054
""",
    "U": """
    00001001 00020003 00041511 00080014 00080017 00080018 00080019 00080058 00081140 00081155 00081195 00082112
    00083010 00181002 0018100B 00182042 0020000D 0020000E 00200052 00200200 00209161 00209164 00281199 00281214
    003A0310 00400554 00404023 0040A124 0040A171 0040A172 0040A402 0040DB0C 0040DB0D 00620021 00640003 0070031A
    00701101 00701102 00880140 04000100 30060024 300600C2 300A0013 300A0083 300A0609 300A0650 300A0700 300A0785
    30100006 3010000B 30100013 30100015 30100031 3010003B 3010006E 3010006F
""",
}
ACTIONS: dict[int, str] = {int(tag, 16): action for action, tags in _TABLE.items() for tag in tags.split()}
_DATES = ("DA", "DT", "TM")
_DUMMY = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "PN": "ANONYMOUS",
    "IS": "0",
    "DS": "0",
    "AS": "000D",
    **dict.fromkeys(("AE", "CS", "LO", "LT", "SH", "ST", "UC", "UT"), "ANONYMIZED"),
}


class NotDeidentifiable(StudyRejected):
    """The series must not leave de-identified (burned-in text, recognisable features, unreadable): no copy made."""


class IdentityMapMissing(PeerUnavailable):
    """This process has no identity map for the job (a remote worker took a delivery): retried, like a peer that is
    down, so a delivery worker on the node's host can take it."""


class NotReidentifiable(PeerRefused):
    """A result does not refer to the de-identified study: never sent (the job fails with this reason)."""


def refusal_reason(ds: Dataset) -> str:
    """Why this instance's pixels may show patient data, so that no de-identified copy may be made ('' if none)."""
    modality = str(ds.get("Modality", "")).upper()
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        return "burned-in annotation (BurnedInAnnotation is YES)"
    if str(ds.get("RecognizableVisualFeatures", "")).upper() == "YES":
        return "recognisable visual features (RecognizableVisualFeatures is YES)"
    if modality in BURNED_IN_MODALITIES:
        return f"modality {modality} often carries burned-in text"
    if str(ds.get("SOPClassUID", "")).startswith(_SECONDARY_CAPTURE):
        return "a secondary capture often carries burned-in text"
    return ""


class Pseudonyms:
    """Same source UID → same pseudonym within one job: a 2.25 UID from HMAC-SHA256 under the job's secret, so a
    copy made again after a crash is the same copy; `originals` maps each pseudonym back."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.originals: dict[str, str] = {}

    def __call__(self, uid: str) -> str:
        uid = uid.rstrip("\x00 ")
        if not uid or uid.startswith(_DICOM_ROOT):
            return uid
        digest = hmac.new(self.secret, uid.encode("ascii", "replace"), hashlib.sha256).digest()
        pseudonym = f"2.25.{int.from_bytes(digest[:16], 'big')}"
        self.originals[pseudonym] = uid
        return pseudonym


def deidentify(ds: Dataset, pseudonyms: Pseudonyms) -> Dataset:
    """Apply the basic profile to `ds` in place (pixel data untouched) and mark it (0012,0062–0064); return it."""
    _clean(ds, pseudonyms)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE
    ds.DeidentificationMethodCodeSequence = [code]
    ds.LongitudinalTemporalInformationModified = "REMOVED"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
    ds.file_meta = meta  # a new file meta: the sender's AE title and private meta elements go too
    return ds


def _clean(ds: Dataset, pseudonyms: Pseudonyms) -> None:
    """One dataset level; attributes not in the table get a safety net: person names emptied, dates and times
    removed, instance UIDs replaced."""
    for tag in list(ds.keys()):
        if tag.is_private or tag.group >> 8 in (0x50, 0x60):
            del ds[tag]
            continue
        element = ds[tag]
        action = ACTIONS.get(int(tag), "")
        if action == "X" or (action == "X/Z" and element.VR == "SQ") or (not action and element.VR in _DATES):
            del ds[tag]
        elif action in ("Z", "X/Z") or (not action and element.VR == "PN"):
            element.value = [] if element.VR == "SQ" else None
        elif action == "D":
            _dummy(ds, element, pseudonyms)
        elif element.VR == "SQ":
            for item in element.value:
                _clean(item, pseudonyms)
        elif element.VR == "UI" and (action == "U" or not _names_a_class(tag)):
            element.value = _mapped(element.value, pseudonyms)


def _dummy(ds: Dataset, element: DataElement, pseudonyms: Pseudonyms) -> None:
    if element.VR == "UI":
        element.value = _mapped(element.value, pseudonyms)
    elif element.VR in _DUMMY:
        element.value = _DUMMY[element.VR]
    else:  # sequences, numbers and bytes: there is no harmless dummy, so remove
        del ds[element.tag]


def _names_a_class(tag: BaseTag) -> bool:
    """UIDs of SOP classes, transfer syntaxes and coding schemes name no instance: kept."""
    keyword = keyword_for_tag(tag)
    return keyword.endswith(("ClassUID", "TransferSyntaxUID")) or keyword in ("CodingSchemeUID", "ContextUID")


def _mapped(value: Any, convert: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return convert(value) if value else value
    return [convert(str(item)) for item in value] if value else value


@dataclass(frozen=True, slots=True)
class IdentityMap:
    """What restores a job's results: pseudonym → original UID and the source's identifying attributes."""

    secret: bytes
    study_uid: str
    uids: dict[str, str]
    attributes: dict[str, Any]  # DICOM JSON (PS3.18 F.2) of the _IDENTITY attributes of the first instance

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"secret": self.secret.hex(), "study_uid": self.study_uid, "uids": self.uids, "attributes": self.attributes}
        ).encode()

    @classmethod
    def read(cls, path: Path) -> IdentityMap:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(bytes.fromhex(data["secret"]), data["study_uid"], data["uids"], data["attributes"])


def identity_of(ds: Dataset) -> dict[str, Any]:
    """The source's identifying patient and study attributes, as DICOM JSON, to put back on its results."""
    kept = Dataset()
    for keyword in _IDENTITY:
        if keyword in ds:
            kept[keyword] = ds[keyword]
    if "SpecificCharacterSet" in ds:
        kept.SpecificCharacterSet = ds.SpecificCharacterSet
    return kept.to_json_dict()


def reidentify(ds: Dataset, identity: IdentityMap) -> Dataset:
    """Put the original UIDs back wherever a pseudonym is (references, study, frame of reference) and the
    patient and study attributes; the result's own SOP and series UIDs stay. In place; returns `ds`."""
    _restore_uids(ds, identity.uids)
    if str(ds.get("StudyInstanceUID", "")) != identity.study_uid:
        raise NotReidentifiable("a result does not refer to the de-identified study; not sent")
    for keyword in _MARKERS:
        if keyword in ds:
            del ds[keyword]
    original = Dataset.from_json(identity.attributes)
    charset = original.get("SpecificCharacterSet")
    if charset and charset not in ("ISO_IR 6", "") and charset != ds.get("SpecificCharacterSet"):
        ds.decode()  # values become text, written again in UTF-8
        ds.SpecificCharacterSet = "ISO_IR 192"
    for element in original:
        if element.keyword != "SpecificCharacterSet":
            ds[element.tag] = element
    return ds


def _restore_uids(ds: Dataset, originals: dict[str, str]) -> None:
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                _restore_uids(item, originals)
        elif element.VR == "UI" and element.value:
            element.value = _mapped(element.value, lambda uid: originals.get(uid, uid))


def identity_path(spool: Spool, study_key: str, series_key: str, job_id: str) -> Path:
    """Next to the original instances: same protection and retention, outside what a remote worker mounts."""
    return spool.root / study_key / series_key / f"identity-{job_id}.json"


def is_deidentified(manifest: str) -> bool:
    return Path(manifest).parts[:1] == (DEID_DIR,)


def write_copy(
    settings: Settings, spool: Spool, study_key: str, series_key: str, job_id: str, model: str, files: Sequence[str]
) -> str:
    """Write the de-identified copy of one job's input under spool/deid/<job id>/, then the identity map, then the
    manifest (the copy is usable only once the manifest exists); return the manifest's spool-relative path.

    Raises NotDeidentifiable, leaving nothing behind, when an instance may show patient data in its pixels.
    """
    folder = Path(DEID_DIR) / job_id  # per job: two jobs on one series share nothing a remote worker sees (issue 9)
    map_file = identity_path(spool, study_key, series_key, job_id)
    pseudonyms = Pseudonyms(IdentityMap.read(map_file).secret if map_file.exists() else secrets.token_bytes(32))
    names = [str(folder / f"{index:05d}.dcm") for index in range(len(files))]
    try:
        identities = [
            _copy_one(spool.resolve(source), spool.root / name, pseudonyms)
            for source, name in zip(files, names, strict=True)
        ]
    except NotDeidentifiable:
        shutil.rmtree(spool.root / folder, ignore_errors=True)
        raise
    study_uid, attributes = identities[0]
    write_atomic(map_file, IdentityMap(pseudonyms.secret, study_uid, pseudonyms.originals, attributes).to_bytes())
    manifest = spool.write_manifest(study_key, series_key, job_id, names, folder=str(folder))
    audit.record_deidentified(settings, study_key, series_key, model, len(names))
    return manifest


def restore_identity(spool: Spool, job: JobRow | None, files: Sequence[Path]) -> list[Path]:
    """Delivery side: a de-identified job's results, re-identified into its series folder (node only), to send
    instead of the outbox files; any other job's files unchanged."""
    if job is None or not is_deidentified(job.manifest) or not files:
        return list(files)
    map_file = identity_path(spool, job.study_key, job.series_key, job.job_id)
    try:
        identity = IdentityMap.read(map_file)
    except (OSError, ValueError, KeyError) as exc:
        raise IdentityMapMissing(
            f"no readable identity map for this de-identified job on this host "
            f"({type(exc).__name__}); delivery must run on the node's host"
        ) from exc
    restored = []
    for path in files:
        target = map_file.parent / f"results-{job.job_id}" / path.name
        write_atomic(target, _to_bytes(reidentify(dcmread(path), identity)))
        restored.append(target)
    return restored


def _copy_one(source: Path, target: Path, pseudonyms: Pseudonyms) -> tuple[str, dict[str, Any]]:
    """De-identify one instance into `target`; return its Study Instance UID and identifying attributes."""
    try:
        ds = dcmread(source)
        if reason := refusal_reason(ds):
            raise NotDeidentifiable(reason)
        identity = str(ds.StudyInstanceUID), identity_of(ds)
        data = _to_bytes(deidentify(ds, pseudonyms))
    except NotDeidentifiable:
        raise
    except Exception as exc:  # malformed instance; pydicom messages may quote values: the type only
        raise NotDeidentifiable(f"an instance cannot be de-identified ({type(exc).__name__})") from exc
    write_atomic(target, data)  # a disk error propagates: the assembler tries again on its next tick
    return identity


def _to_bytes(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
