"""Send every file of the shared DICOM corpus to a real node and classify each answer; render docs/corpus-report.md.

One dcmtk storescu run per file, proposing only the file's own transfer syntax so the node sees the file as it is
stored. A file storescu cannot send (it cannot read it, finds no SOP class, or crashes) is sent again as raw bytes by
pynetdicom, which does not parse the dataset; only when both fail is it "not sendable". Each file gets its own calling
AE title, which is how the node's refusal log line is matched to the file.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import re
import subprocess
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.services import DIMSE_STATUS, SHARED, Process, free_port, pacsai_env, port_open, require_binary, start_pacsai

CORPUS = SHARED / "dicom"
REPORT = Path(__file__).resolve().parent.parent / "docs" / "corpus-report.md"
COMMAND = ".venv/bin/python scripts/corpus_report.py"
NODE_AE = "PACSAI"
_SPLIT = {"pydicom", "dcm_qa_ct"}  # folders whose subfolders are separate sources (see the corpus README)
_UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2")
_CONTEXT = re.compile(r"Context ID:\s+\d+ \((?P<result>[^)]+)\)")
_REFUSED = re.compile(r"refused instance from (?P<ae>\S+): (?P<reason>.*?)(?: \(0x[0-9A-F]{4}\))?$")
_NEGOTIATING = ("Proposed", "Accepted")
_CHUNKED = threading.Lock()
GENERIC_REASON = "unreadable dataset"  # the node's catch-all: names an exception type, not what is wrong


@dataclass(frozen=True, slots=True)
class CorpusFile:
    path: str  # relative to the corpus root
    sop_class: str  # from MANIFEST.tsv; empty when the file has none
    transfer_syntax: str  # from MANIFEST.tsv; empty when the file meta has none

    @property
    def folder(self) -> str:
        parts = self.path.split("/")
        return "/".join(parts[:2]) if parts[0] in _SPLIT and len(parts) > 2 else parts[0]


@dataclass(frozen=True, slots=True)
class Sent:
    sender: str  # "storescu" or "pynetdicom" (raw bytes)
    status: int | None  # the C-STORE response status; None when nothing was answered
    note: str = ""  # why it was not sent (sender's words, file path removed)
    rejected: str = ""  # the node rejected the presentation context: its A-ASSOCIATE-AC result
    exit_code: int | None = None  # storescu's exit code (None: timed out, or not storescu)


@dataclass(frozen=True, slots=True)
class Outcome:
    file: CorpusFile
    calling_ae: str
    sent: Sent  # the answered send: storescu's, else the raw one
    storescu_note: str = ""  # why storescu itself could not send the file ("" when it did)
    storescu_exit: int | None = None
    node_reason: str = ""  # the reason in the node's refusal log line

    @property
    def kind(self) -> str:
        if self.sent.rejected:
            return "refused"
        if self.sent.status is None:
            return "not sendable"
        return "accepted" if self.sent.status == 0 or 0xB000 <= self.sent.status <= 0xBFFF else "refused"


@dataclass(frozen=True, slots=True)
class CorpusRun:
    outcomes: tuple[Outcome, ...]
    crashes: tuple[str, ...]  # folders after which the node was not running or not listening
    spool_files: int  # .dcm files under the node's spool at the end
    distinct_accepted: int  # distinct (study, series, SOP instance) UIDs among accepted files
    node_errors: tuple[str, ...] = field(default=())  # ERROR or Traceback lines in the node's log

    def silent(self) -> list[Outcome]:
        """C-STORE refusals without a specific node log line (a drop the sender could not explain)."""
        return [
            o
            for o in self.outcomes
            if o.kind == "refused"
            and not o.sent.rejected
            and (not o.node_reason or o.node_reason.startswith(GENERIC_REASON))
        ]


def read_manifest(root: Path = CORPUS) -> list[CorpusFile]:
    with open(root / "MANIFEST.tsv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [CorpusFile(row["path"], row["SOPClassUID"], row["TransferSyntaxUID"]) for row in rows]


def write_storescu_config(files: Sequence[CorpusFile], path: Path) -> dict[tuple[str, str], str]:
    """One storescu profile per (SOP class, transfer syntax): a single context with the file's own syntax."""
    keys = sorted({(f.sop_class, f.transfer_syntax) for f in files if f.sop_class})
    names = {key: f"P{index}" for index, key in enumerate(keys)}
    lines = ["[[TransferSyntaxes]]"]
    for key, name in names.items():
        syntaxes = (key[1],) if key[1] else _UNCOMPRESSED
        lines += [f"[T{name}]"] + [f"TransferSyntax{i} = {ts}" for i, ts in enumerate(syntaxes, 1)]
    lines.append("[[PresentationContexts]]")
    lines += [f"[C{name}]\nPresentationContext1 = {key[0]}\\T{name}" for key, name in names.items()]
    lines.append("[[Profiles]]")
    lines += [f"[{name}]\nPresentationContexts = C{name}" for name in names.values()]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return names


def send_storescu(path: Path, calling_ae: str, port: int, config: Path, profile: str | None) -> Sent:
    argv = [
        require_binary("storescu"),
        "-d",
        "-aet",
        calling_ae,
        "-aec",
        NODE_AE,
        "-to",
        "10",
        "-ta",
        "10",
        "-td",
        "60",
    ]
    argv += ["-xf", str(config), profile] if profile else []
    try:
        run = subprocess.run([*argv, "127.0.0.1", str(port), str(path)], capture_output=True, timeout=180)
    except subprocess.TimeoutExpired:
        return Sent("storescu", None, "storescu timed out")
    output = (run.stdout + run.stderr).decode("utf-8", "replace")
    match = DIMSE_STATUS.search(output)
    if match:
        return Sent("storescu", int(match.group(1), 16), exit_code=run.returncode)
    rejected = [m.group("result") for m in _CONTEXT.finditer(output) if m.group("result") not in _NEGOTIATING]
    if rejected and "No Acceptable Presentation Contexts" in output:
        return Sent("storescu", None, "no acceptable presentation contexts", rejected[0], run.returncode)
    if run.returncode < 0:
        return Sent("storescu", None, f"storescu crashed (signal {-run.returncode})", exit_code=run.returncode)
    problems = [line[3:] for line in output.splitlines() if line.startswith(("F: ", "E: "))]
    note = _without_path(problems[0] if problems else f"exit code {run.returncode}", path)
    return Sent("storescu", None, note, exit_code=run.returncode)


def _without_path(text: str, path: Path) -> str:
    text = text.replace(str(path), "<file>")
    return re.sub(r"(:\s*<file>)?:?\s*$", "", re.sub(r"\s+", " ", text)).strip()


@contextlib.contextmanager
def _chunked_send() -> Iterator[None]:
    """pynetdicom streams a file's dataset bytes as they are (no parsing) while this is set."""
    from pynetdicom import _config

    with _CHUNKED:
        before = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            yield
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = before


def send_raw(path: Path, calling_ae: str, port: int) -> Sent:
    """C-STORE the file's dataset bytes unchanged, with the SOP class and transfer syntax of its file meta."""
    from pynetdicom import AE
    from pynetdicom.dsutils import split_dataset

    try:
        meta, _ = split_dataset(path)
    except Exception as exc:
        return Sent("pynetdicom", None, f"no file meta to send from ({type(exc).__name__})")
    needed = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
    missing = [keyword for keyword in needed if not meta.get(keyword)]
    if missing:
        return Sent("pynetdicom", None, f"file meta lacks {', '.join(missing)}")
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 10, 60, 60
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    with _chunked_send():
        assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
        if not assoc.is_established:
            return Sent("pynetdicom", None, "association rejected or aborted")
        try:
            response = assoc.send_c_store(path)
        except ValueError:
            return Sent("pynetdicom", None, "the node accepted no presentation context for the file's syntax")
        finally:
            assoc.release()
    if "Status" not in response:
        return Sent("pynetdicom", None, "no C-STORE response")
    return Sent("pynetdicom", int(response.Status))


def send_file(
    root: Path, file: CorpusFile, calling_ae: str, port: int, config: Path, profiles: dict[tuple[str, str], str]
) -> Outcome:
    path = root / file.path
    sent = send_storescu(path, calling_ae, port, config, profiles.get((file.sop_class, file.transfer_syntax)))
    if sent.status is not None or sent.rejected:
        return Outcome(file, calling_ae, sent, storescu_exit=sent.exit_code)
    raw = send_raw(path, calling_ae, port)
    answered = raw if raw.status is not None else Sent("", None, raw.note)
    return Outcome(file, calling_ae, answered, sent.note, sent.exit_code)


def send_group(
    root: Path, group: Sequence[tuple[int, CorpusFile]], port: int, config: Path, profiles: dict[tuple[str, str], str]
) -> list[Outcome]:
    """Send files that share a SOP Instance UID one after another (the spool keeps one file per instance)."""
    return [send_file(root, file, f"CORPUS{index:04d}", port, config, profiles) for index, file in group]


def instance_key(path: Path) -> str:
    """The file's SOP Instance UID, or its path when pydicom cannot read one."""
    from pydicom import dcmread

    try:
        ds = dcmread(path, stop_before_pixels=True, force=True, specific_tags=["SOPInstanceUID"])
        return str(ds.get("SOPInstanceUID", "")).rstrip("\x00 ") or str(path)
    except Exception:  # e.g. RecursionError on the deeply nested file
        return str(path)


def distinct_instances(paths: Sequence[Path]) -> int:
    """Distinct (study, series, SOP instance) UIDs: the spool keeps one file per triple (a re-send overwrites)."""
    from pydicom import dcmread

    keywords = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]
    triples = set()
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True, force=True, specific_tags=keywords)
        triples.add(tuple(str(ds.get(keyword, "")).rstrip("\x00 ") for keyword in keywords))
    return len(triples)


def node_log_reasons(log: str) -> dict[str, str]:
    reasons: dict[str, str] = {}
    for line in log.splitlines():
        match = _REFUSED.search(line)
        if match:
            reasons[match.group("ae")] = match.group("reason")
    return reasons


class _Node:
    """The node under test, restarted (and the crash recorded) if it ever stops."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.port = workdir, free_port()
        self.env = pacsai_env(
            workdir / "data",
            port=self.port,
            peers="",
            PACSAI_ALLOW_ANY_CALLER="true",
            PACSAI_QUIET_PERIOD_S="86400",
            PACSAI_RELEASE_GRACE_S="86400",
            PACSAI_COMPLETE_ON_DECLARED_COUNT="false",  # no series completes (and no no-model series is cleaned)
        )
        self.process: Process = start_pacsai("node", workdir, self.env)

    def alive(self) -> bool:
        return self.process.popen.poll() is None and port_open(self.port)

    def restart(self) -> None:
        self.process.kill()
        self.process = start_pacsai("node", self.workdir, self.env)


def run_corpus(root: Path = CORPUS, workdir: Path | None = None, *, jobs: int = 4) -> CorpusRun:
    """Start a node, send every manifest file folder by folder, check the node after each folder, stop it."""
    files = read_manifest(root)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pacsai-corpus-")))
        node = _Node(workdir)
        stack.callback(lambda: node.process.stop())
        profiles = write_storescu_config(files, workdir / "storescu.cfg")
        outcomes: list[Outcome] = []
        crashes: list[str] = []
        by_folder: dict[str, list[tuple[int, CorpusFile]]] = defaultdict(list)
        for index, file in enumerate(files):
            by_folder[file.folder].append((index, file))
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            for folder in sorted(by_folder):
                groups: dict[str, list[tuple[int, CorpusFile]]] = defaultdict(list)
                for index, file in by_folder[folder]:
                    groups[instance_key(root / file.path)].append((index, file))
                futures = [
                    pool.submit(send_group, root, group, node.port, workdir / "storescu.cfg", profiles)
                    for group in groups.values()
                ]
                outcomes += [outcome for future in futures for outcome in future.result()]
                if not node.alive():
                    crashes.append(folder)
                    node.restart()
        time.sleep(0.5)  # the node logs a refusal before answering; let the last lines reach the file
        log = node.process.log()
        reasons = node_log_reasons(log)
        outcomes = [
            Outcome(o.file, o.calling_ae, o.sent, o.storescu_note, o.storescu_exit, reasons.get(o.calling_ae, ""))
            for o in outcomes
        ]
        spool = workdir / "data" / "spool"
        spool_files = sum(1 for _ in spool.rglob("*.dcm")) if spool.is_dir() else 0
        accepted = [root / o.file.path for o in outcomes if o.kind == "accepted"]
        errors = tuple(line for line in log.splitlines() if " ERROR " in line or line.startswith("Traceback"))
        return CorpusRun(tuple(outcomes), tuple(crashes), spool_files, distinct_instances(accepted), errors)


def _status(outcome: Outcome) -> str:
    if outcome.sent.rejected:
        return "context rejected"
    return "—" if outcome.sent.status is None else f"0x{outcome.sent.status:04X}"


def _why(outcome: Outcome) -> str:
    if outcome.sent.rejected:
        return f"presentation context rejected at association: {outcome.sent.rejected}"
    if outcome.kind == "refused":
        return outcome.node_reason or "(no node log line)"
    if outcome.kind == "not sendable":
        return f"storescu: {outcome.storescu_note}; pynetdicom: {outcome.sent.note}"
    return ""


def render_report(run: CorpusRun) -> str:
    """The committed docs/corpus-report.md: deterministic for a given corpus and code (no timings, no dates)."""
    outcomes = sorted(run.outcomes, key=lambda o: o.file.path)
    kinds = Counter(o.kind for o in outcomes)
    raw = sum(1 for o in outcomes if o.storescu_note and o.kind != "not sendable")
    lines = [
        "# Corpus report: every file of ../shared/dicom sent to a real node",
        "",
        f"Regenerate with `{COMMAND}` (one to two minutes on two cores);",
        "`tests/integration/test_corpus.py` runs the same code and fails when this file is stale.",
        "Each file is sent on its own association by dcmtk `storescu`, proposing only the file's own transfer syntax;",
        "files that share a SOP Instance UID are sent one after another. Files storescu cannot send (it cannot parse",
        "them, finds no SOP class, or crashes) are sent again as raw bytes by pynetdicom, which does not parse them.",
        "Refusal reasons are the node's own log lines, statuses the C-STORE responses (`dicom_node/validate.py`).",
        "",
        f"**{len(outcomes)} files: {kinds['accepted']} accepted, {kinds['refused']} refused, "
        f"{kinds['not sendable']} not sendable; {raw} of the answered files were sent raw because storescu could not "
        f"send them. Node crashes: {len(run.crashes)}. Refusals without a specific log reason: {len(run.silent())}. "
        f"Spool: {run.spool_files} files for {run.distinct_accepted} distinct accepted instances "
        f"({kinds['accepted']} accepted files; copies of one SOP instance overwrite each other).**",
        "",
        "Statuses: 0xA900 the instance breaks its IOD (image without pixel data, pixel description missing or",
        "inconsistent with the pixel data); 0xC000 cannot understand (invalid UID, truncated element, nesting too",
        "deep); 0xC001 decoded pixel data over the size cap; 0xC002 no decoder exists for the transfer syntax; 0xA700",
        'out of resources (spool). "context rejected": the node accepted the association but not the presentation',
        'context (SOP class or transfer syntax it does not support), so no C-STORE was possible. "Not sendable":',
        "neither storescu nor a raw C-STORE could send the file (it has no SOP Class or SOP Instance UID).",
        "",
        "## Per folder",
        "",
        "| folder | files | accepted | refused (status ×count) | not sendable | sent raw | node crashes |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for folder in sorted({o.file.folder for o in outcomes}):
        group = [o for o in outcomes if o.file.folder == folder]
        counts = Counter(o.kind for o in group)
        statuses = Counter(_status(o) for o in group if o.kind == "refused")
        refused = ", ".join(f"{status} ×{n}" for status, n in sorted(statuses.items())) or "0"
        sent_raw = sum(1 for o in group if o.storescu_note and o.kind != "not sendable")
        lines.append(
            f"| {folder} | {len(group)} | {counts['accepted']} | {refused} | {counts['not sendable']} | "
            f"{sent_raw} | {run.crashes.count(folder)} |"
        )
    lines += ["", "## Per reason", "", "| outcome | status | reason | files | folders |", "|---|---|---|---:|---|"]
    reasons: dict[tuple[str, str, str], list[Outcome]] = defaultdict(list)
    for o in outcomes:
        if o.kind != "accepted":
            reasons[(o.kind, _status(o), _why(o))].append(o)
    for (kind, status, why), group in sorted(reasons.items()):
        folders = ", ".join(sorted({o.file.folder for o in group}))
        lines.append(f"| {kind} | {status} | {why} | {len(group)} | {folders} |")
    lines += [
        "",
        "## Files not accepted",
        "",
        "| file | outcome | status | sender | storescu exit | reason |",
        "|---|---|---|---|---:|---|",
    ]
    for o in outcomes:
        if o.kind != "accepted":
            exit_code = "—" if o.storescu_exit is None else str(o.storescu_exit)
            lines.append(
                f"| {o.file.path} | {o.kind} | {_status(o)} | {o.sent.sender or '—'} | {exit_code} | {_why(o)} |"
            )
    return "\n".join(lines) + "\n"
