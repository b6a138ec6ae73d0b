"""STOW-RS SCP (PS3.18 10.5) on the console's server: POST /dicom-web/studies[/{study}] stores each instance as a
C-STORE would (store_instance: same checks, spooled and fsync'd before we answer), audits per study, and marks the
request's series released so the same completeness rules close them.

Authentication is by the Authorization header only, never the console's cookie (no CSRF): HTTP basic with a console
user, or a bearer token from POST /dicom-web/token; the user needs the sender, operator or admin role.
Answers: 200 all stored (ReferencedSOPSequence), 202 some failed (FailedSOPSequence with each FailureReason),
409 none stored, 400 no instance or a study UID that is not one, 401 no or wrong credentials, 403 a role that may
not send, 415 not multipart/related of application/dicom, 429 locked out after failed attempts.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Sequence

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from itsdangerous import BadSignature, URLSafeTimedSerializer
from pydicom import Dataset
from pydicom.filereader import read_file_meta_info
from starlette.concurrency import run_in_threadpool

from dicom_node.console.app import Console
from dicom_node.console.auth import check_password
from dicom_node.metrics import INSTANCES
from dicom_node.multipart_in import DICOM, Part, PartsToFiles, UnsupportedMedia, boundary_of
from dicom_node.receivers import incoming_dir
from dicom_node.store_instance import Received, Sender, store_received
from dicom_node.validate import TOO_LARGE
from pacsai import audit, dimse
from pacsai.audit import EventOutcome
from pacsai.console_db import User
from pacsai.logs import key_of
from pacsai.storage import InvalidUid, check_uid, receiving_spool

log = logging.getLogger(__name__)
ROOT = "/dicom-web"
TOKEN_MAX_AGE_S = 12 * 3600
CHALLENGE = {"WWW-Authenticate": 'Basic realm="pacsai", Bearer realm="pacsai"'}
JSON = "application/dicom+json"


class Stow:
    """What the STOW-RS routes share: the console (users, limiter, settings), our spool, the token signer."""

    def __init__(self, console: Console) -> None:
        settings = console.settings
        self.console, self.settings = console, settings
        self.spool = receiving_spool(settings)
        self.tokens = URLSafeTimedSerializer(console.sessions.key, salt="pacsai-stow-token")
        self.incoming = incoming_dir(settings, 0)

    async def user(self, request: Request, *, bearer: bool = True) -> User | Response:
        """The authenticated user who may send, or the response refusing the request."""
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and bearer:
            try:
                user = self.console.tables.user(str(self.tokens.loads(value.strip(), max_age=TOKEN_MAX_AGE_S)))
            except BadSignature:
                user = None
        elif scheme.lower() == "basic":
            try:
                username, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return Response("malformed basic credentials", 401, headers=CHALLENGE)
            address = request.client.host if request.client else ""
            if self.console.limiter.locked(username, address):
                return Response("too many failed attempts: wait 5 minutes", 429)
            user = await run_in_threadpool(check_password, self.console.tables, username, password)
            if user is None:
                self.console.limiter.failed(username, address)
                self._audit_failure(request, username)
            else:
                self.console.limiter.succeeded(username, address)
        else:
            user = None
        if user is None:
            return Response("authentication required", 401, headers=CHALLENGE)
        if not user.may_send:
            return Response("this user may not send studies (role sender, operator or admin needed)", 403)
        return user

    def _audit_failure(self, request: Request, username: str) -> None:
        nobody = User(username[:64] or "?", "", "sender", False)
        description = "STOW-RS authentication failed"
        self.console.audit(
            request, nobody, audit.USER_AUTHENTICATION, "E", description, outcome=EventOutcome.MINOR_FAILURE
        )

    async def store(self, request: Request, study: str | None) -> Response:
        """Receive the body into files, store each instance, answer per PS3.18."""
        user = await self.user(request)
        if isinstance(user, Response):
            return user
        try:
            boundary = boundary_of(request.headers.get("content-type", ""))
            study = check_uid("StudyInstanceUID", study) if study is not None else None
        except UnsupportedMedia as exc:
            return Response(str(exc), 415)
        except InvalidUid:
            return Response("the study in the URL is not a valid UID", 400)
        limit, reserve = self.settings.node.max_instance_mb << 20, self.settings.storage.spool_reserve_bytes
        parts = PartsToFiles(self.incoming, boundary, limit, reserve)
        try:
            async for chunk in request.stream():
                parts.write(chunk)
            results = await run_in_threadpool(self._store_all, parts.parts, user.username, study)
        finally:
            parts.discard()  # what was not stored (stored files were moved into the spool)
        if not results:
            return Response("the request holds no instance", 400)
        self._record(request, user.username, results)
        code, answer = response_of(results)
        log.info("STOW-RS from %s: %d instance(s), HTTP %d", user.username, len(results), code)
        return JSONResponse(answer.to_json_dict(), code, media_type=JSON)

    def _store_all(self, parts: Sequence[Part], username: str, study: str | None) -> list[Received]:
        sender = Sender(username, self.settings.node.ae_title, {"store_priority": ""})
        results = [self._store_one(part, sender, study) for part in parts]
        self.console.state.mark_released(sorted({r.series_key for r in results if r.stored}))
        return results

    def _store_one(self, part: Part, sender: Sender, study: str | None) -> Received:
        if part.media_type != DICOM:
            log.warning("refused part from %s: media type is not %s", sender.calling, DICOM)
            return Received(dimse.CANNOT_UNDERSTAND)
        if part.no_room:
            log.warning("refused instance from %s: disk under the spool's reserve (0xA700)", sender.calling)
            return Received(dimse.OUT_OF_RESOURCES)
        if part.too_large:
            log.warning("refused instance from %s: over PACSAI_MAX_INSTANCE_MB (0x%04X)", sender.calling, TOO_LARGE)
            return Received(TOO_LARGE)
        try:
            syntax = str(read_file_meta_info(part.path).get("TransferSyntaxUID", ""))
        except Exception as exc:  # not a DICOM Part 10 file; pydicom texts may quote values: the type only
            log.warning("refused instance from %s: not a DICOM file (%s)", sender.calling, type(exc).__name__)
            return Received(dimse.CANNOT_UNDERSTAND)
        return store_received(
            self.spool, self.console.state, part.path, sender, transfer_syntax=syntax, study_uid=study
        )

    def _record(self, request: Request, username: str, results: Sequence[Received]) -> None:
        """Audit per study as an association's end does; count instances as the SCP does."""
        address = request.client.host if request.client else ""
        studies: dict[str, tuple[dict[str, int], list[int]]] = {}
        for result in results:
            INSTANCES.labels(outcome="success" if result.stored else f"0x{result.status:04X}").inc()
            study_key = key_of(self.settings.log_key, result.study_uid) if result.study_uid else ""
            stored, refused = studies.setdefault(study_key, ({}, [0]))
            if result.stored:
                stored[result.sop_class_uid] = stored.get(result.sop_class_uid, 0) + 1
            else:
                refused[0] += 1
        trail = audit.trail_for(self.settings)
        for study_key, (stored, refused) in studies.items():
            called = self.settings.node.ae_title
            trail.record(
                audit.instances_received(self.settings, username, address, called, study_key, stored, refused[0])
            )


def response_of(results: Sequence[Received]) -> tuple[int, Dataset]:
    """The HTTP status and the STOW-RS response data set (PS3.18 10.5.3)."""
    answer = Dataset()
    stored = [r for r in results if r.stored]
    failed = [r for r in results if not r.stored]
    if stored:
        answer.ReferencedSOPSequence = [_item(r) for r in stored]
    if failed:
        answer.FailedSOPSequence = [_item(r) for r in failed]
        for item, result in zip(answer.FailedSOPSequence, failed, strict=True):
            item.FailureReason = result.status
    return (200 if not failed else 202 if stored else 409), answer


def _item(result: Received) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = result.sop_class_uid
    item.ReferencedSOPInstanceUID = result.sop_instance_uid
    return item


def add_stow(app: FastAPI, console: Console) -> None:
    """The STOW-RS routes and the token route."""
    stow = Stow(console)

    @app.post(f"{ROOT}/token")
    async def token(request: Request) -> Response:
        """A bearer token for STOW-RS, valid 12 hours, for a user who authenticates with HTTP basic."""
        user = await stow.user(request, bearer=False)
        if isinstance(user, Response):
            return user
        body = {"access_token": stow.tokens.dumps(user.username), "token_type": "Bearer", "expires_in": TOKEN_MAX_AGE_S}
        return JSONResponse(body)

    @app.post(f"{ROOT}/studies")
    async def store_studies(request: Request) -> Response:
        return await stow.store(request, None)

    @app.post(ROOT + "/studies/{study}")
    async def store_study(request: Request, study: str) -> Response:
        return await stow.store(request, study)
