"""Print the SOP class and transfer syntax tables of docs/conformance.md from what the node really accepts."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydicom.uid import UID  # noqa: E402

from dicom_node.commitment import COMMITMENT  # noqa: E402
from dicom_node.receive import build_ae  # noqa: E402
from pacsai.settings import Settings  # noqa: E402


def main() -> int:
    ae = build_ae(Settings.from_env({"PACSAI_DATA_DIR": "/tmp/pacsai-conformance", "PACSAI_ALLOW_ANY_CALLER": "true"}))
    syntaxes: dict[str, str] = {}
    print("| SOP class | UID | role |\n|---|---|---|")
    for context in ae.supported_contexts:
        uid = UID(str(context.abstract_syntax))
        role = "SCU (reports accepted from the peer in the SCP role)" if uid == COMMITMENT else "SCP"
        print(f"| {uid.name} | `{uid}` | {role} |")
        for ts in context.transfer_syntax:
            syntaxes[str(ts)] = UID(str(ts)).name
    print("\n| transfer syntax | UID |\n|---|---|")
    for ts_uid, name in syntaxes.items():
        print(f"| {name} | `{ts_uid}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
