"""Proof of delivery after a delivery: the first request per the destination's profile (`verify`); the node follows
up (dicom_node/verify_results.py). A failure here never undoes the delivery: the job stays delivered."""

from __future__ import annotations

import logging

from dicom_node import verify_results
from pacsai.profiles import Verify
from pacsai.settings import Peer, Settings
from pacsai.state import State
from pacsai.storage import Spool

log = logging.getLogger(__name__)


def after_delivery(settings: Settings, state: State, spool: Spool, job_id: str, peer: object) -> None:
    """Ask the destination to confirm the job's delivered results, when its profile says so (a DIMSE peer: a
    DICOMweb one is not asked)."""
    if not isinstance(peer, Peer):
        return
    method = settings.delivery.profile_for(peer.ae_title).verify
    job = state.job(job_id)
    if method is Verify.NONE or job is None:
        return
    try:
        verify_results.begin(settings, state, spool, job, peer, method)
    except Exception as exc:  # the results are delivered; only their proof is missing
        reason = f"not verified: the {method.value} request could not be made ({type(exc).__name__})"
        log.error("ALERT: results of job %s at %s: %s", job_id[:8], peer.ae_title, reason)
        state.close_verification(job_id, reason)
