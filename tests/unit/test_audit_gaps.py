"""Issue 9 item 5 on both databases: instances recorded since the last start and not in the trail are audited once."""

from __future__ import annotations

import time
from pathlib import Path

from dicom_node.audit_gaps import audit_unrecorded, audited_since_start
from pacsai import audit
from pacsai.settings import Settings
from pacsai.state import State
from pacsai.storage import SpooledInstance

CT = "1.2.840.10008.5.1.4.1.1.2"


def _record(state: State, study: str, series: str, count: int) -> None:
    for index in range(count):
        state.record_instance(
            SpooledInstance(study, series, f"{series}-{index}", f"{study}/{series}/{index}.dcm"),
            calling_ae="MODALITY",
            called_ae="PACSAI",
            header={"Modality": "CT", "SOPClassUID": CT},
        )


def test_only_what_the_trail_lacks_is_audited_and_only_once(tmp_path: Path, database: str) -> None:
    settings = Settings.from_env({"PACSAI_DATA_DIR": str(tmp_path / "data")})  # the trail's place; `database` below
    state, trail = State(database), audit.trail_for(settings)
    _record(state, "old-study", "s0", 2)  # before the previous start: not this comparison's business
    assert audit_unrecorded(state, settings, trail) == 0  # no start in the trail yet: nothing to compare with
    time.sleep(0.01)  # the trail's times have millisecond precision
    trail.record(audit.application(settings, started=True))
    _record(state, "study-a", "s1", 5)  # its association ended: audited as usual
    trail.record(audit.instances_received(settings, "MODALITY", "127.0.0.1", "PACSAI", "study-a", {CT: 5}, 0))
    _record(state, "study-b", "s2", 7)  # the node died with this association open
    _record(state, "study-a", "s3", 3)  # a second series of study-a, also cut off
    assert audit_unrecorded(state, settings, trail) == 10
    since = audited_since_start(settings.audit_path)
    assert since is not None and dict(since[1]) == {("study-a", CT): 8, ("study-b", CT): 7}
    trail.record(audit.application(settings, started=True))  # the restarted node
    assert audit_unrecorded(state, settings, trail) == 0  # a second restart adds nothing
    state.close()
