"""A scripted PACS for delivery tests: a real pynetdicom Storage SCP whose answers the test configures."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.tcp import set_nodelay
from tests.services import free_port

ABORT = -1  # in `script`: abort the association once the data arrived
SOP_CLASS_NOT_SUPPORTED = 0x0122


@dataclass
class ScriptedPacs:
    """A Storage (and Verification) SCP on a free loopback port.

    Each C-STORE takes the next answer of `script` (a status, or ABORT; success when the script is used up) after the
    next pause of `delays_s`, or `pause_s` when that list is used up; SOP classes in `refuse_sop_classes` are answered
    0x0122. `received` holds what was stored, `storing` is set at the first C-STORE, `connections` counts TCP
    connections.
    """

    ae_title: str = "PACS"
    script: list[int] = field(default_factory=list)
    delays_s: list[float] = field(default_factory=list)
    pause_s: float = 0.0
    refuse_sop_classes: Sequence[str] = ()
    require_called_aet: bool = False
    maximum_associations: int = 10
    calling_aets: list[str] = field(default_factory=list)  # non-empty: only these may call (else RJ 1, 1, 3)
    port: int = field(default_factory=free_port)
    received: list[Dataset] = field(default_factory=list)
    connections: int = 0
    storing: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax))
        ae.add_supported_context(Verification)
        ae.require_called_aet = self.require_called_aet
        ae.require_calling_aet = self.calling_aets
        ae.maximum_associations = self.maximum_associations
        self._lock = threading.Lock()
        handlers: list[Any] = [(evt.EVT_C_STORE, self.answer), (evt.EVT_CONN_OPEN, self.opened)]
        server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        assert server is not None
        self.server = server

    def opened(self, event: evt.Event) -> None:
        set_nodelay(event)
        self.connections += 1

    def answer(self, event: evt.Event) -> int:
        """The scripted answer to one C-STORE."""
        self.storing.set()
        with self._lock:
            delay_s = self.delays_s.pop(0) if self.delays_s else self.pause_s
        time.sleep(delay_s)
        if str(event.request.AffectedSOPClassUID) in self.refuse_sop_classes:
            return SOP_CLASS_NOT_SUPPORTED
        with self._lock:
            status = self.script.pop(0) if self.script else 0x0000
            if status == ABORT:
                event.assoc.abort()
                return 0x0000
            if status == 0x0000 or 0xB000 <= status <= 0xBFFF:
                self.received.append(event.dataset)
            return status

    def stop(self) -> None:
        self.server.shutdown()
