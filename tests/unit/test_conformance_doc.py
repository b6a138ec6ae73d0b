"""docs/conformance.md lists every SOP class and transfer syntax the node accepts."""

from __future__ import annotations

from pathlib import Path

from dicom_node.receive import build_ae
from pacsai.settings import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"


def test_every_accepted_sop_class_and_transfer_syntax_is_in_the_statement(tmp_path: Path) -> None:
    text = DOC.read_text(encoding="utf-8")
    ae = build_ae(Settings.from_env({"PACSAI_DATA_DIR": str(tmp_path), "PACSAI_PEERS": "PACS@127.0.0.1:104"}))
    missing = [cx.abstract_syntax for cx in ae.supported_contexts if f"`{cx.abstract_syntax}`" not in text]
    missing += sorted({ts for cx in ae.supported_contexts for ts in cx.transfer_syntax if f"`{ts}`" not in text})
    assert missing == []
