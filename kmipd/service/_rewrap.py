"""Rewrap: rewrap-dek and rewrap-blob (one key under the KEK's current version), and rewrap
jobs (start-rewrap, get-job, list-jobs, and the batches the job runner drives).
"""

from __future__ import annotations

import logging
import secrets

import attrs

from kmipd.lifecycle import Usage
from kmipd.protocol import (
    DataKeyBlob,
    ErrorCode,
    GetJob,
    JobInfo,
    KeyAttributes,
    KeyRef,
    ListJobs,
    ListJobsResult,
    ProtocolError,
    RewrapBlob,
    RewrapBlobResult,
    RewrapDek,
    StartRewrap,
    decode_item,
    parse_struct,
)
from kmipd.service._core import (
    ServiceError,
    _Call,
    _dek_attributes,
    _kek_what,
    _lifecycle_errors,
    _record_associated_data,
    _stored_dek_what,
    _unwrap_errors,
    dek_associated_data,
    handles,
)
from kmipd.service._delivery import DeliveryOperations
from kmipd.store import DekRecord, KekVersion, RewrapJob

log = logging.getLogger("kmipd.service")


class RewrapOperations(DeliveryOperations):
    """Moving keys to a KEK's newest version without the key leaving the daemon.

    Data-key blobs are opened and made by DeliveryOperations.
    """

    async def rewrap_record(self, record: DekRecord, target: KekVersion) -> bool:
        """Re-wrap one stored DEK under ``target`` without the key leaving the daemon."""
        wrapped = await self._rewrapped(record, target)
        return await self.store.rewrap_dek(record, target.version, wrapped)

    async def _rewrapped(self, record: DekRecord, target: KekVersion) -> bytes:
        """The DEK's wrapping under ``target`` (unwrapped and re-wrapped inside the HSM path)."""
        old = self._kek_version(record.namespace, record.kek_version)
        with _lifecycle_errors():
            old.lifecycle.check_recovery(Usage.UNWRAP, self._clock(), _kek_what(old))
        with _unwrap_errors(old, _stored_dek_what(record)):
            key = await self.hsm.unwrap(
                old.hsm_handle, record.wrapped, _record_associated_data(record)
            )
        wrapped = await self.hsm.wrap(
            target.hsm_handle,
            key,
            dek_associated_data(record.dek_id, record.namespace, target.version),
        )
        del key
        return wrapped

    @handles(RewrapDek, changes_state=True)
    async def _rewrap_dek(self, call: _Call, request: RewrapDek) -> KeyAttributes:
        record = await self._resolve(call, "rewrap", KeyRef(dek_id=request.dek_id))
        assert isinstance(record, DekRecord)
        kek = self.store.get_kek(record.namespace)
        assert kek is not None
        target = await self._version_for_protection(call, kek)
        if record.kek_version != target.version:
            await self.rewrap_record(record, target)
        updated = await self.store.get_dek(record.dek_id)
        assert updated is not None
        return _dek_attributes(updated, self._clock())

    @handles(RewrapBlob)
    async def _rewrap_blob(self, call: _Call, request: RewrapBlob) -> RewrapBlobResult:
        blob_bytes = request.blob
        blob_kek = _blob_kek(blob_bytes)
        recovery = blob_kek is not None and self._may(call, "recovery", blob_kek)
        key, old = await self._open_blob(
            call, "rewrap", blob_bytes, request.context, recovery=recovery
        )
        kek = self.store.get_kek(old.kek)
        assert kek is not None
        target = await self._version_for_protection(call, kek)
        blob = await self._wrap_blob(target, key, request.context)
        del key
        return RewrapBlobResult(blob=blob, kek=target.kek, kek_version=target.version)

    @handles(StartRewrap, changes_state=True)
    async def _start_rewrap(self, call: _Call, request: StartRewrap) -> JobInfo:
        self._authorize(call, "start-rewrap", request.namespace)
        kek = self.store.get_kek(request.namespace)
        if kek is None:
            raise ServiceError(ErrorCode.NOT_FOUND, f"no KEK named {request.namespace!r}")
        target = await self._version_for_protection(call, kek)
        now = self._now()
        job = RewrapJob(
            job_id="job_" + secrets.token_hex(8),
            namespace=request.namespace,
            target=target.version,
            cursor="",
            rewrapped=0,
            skipped=0,
            remaining=await self.store.count_to_rewrap(request.namespace, target.version),
            state="running",
            created_at=now,
            updated_at=now,
            created_by=call.caller.identity,
        )
        await self.store.create_job(job)
        call.detail = f"job {job.job_id}"
        self.jobs_waiting.set()
        log.info(
            "rewrap job %s started: %s to version %d (%d DEKs)",
            job.job_id,
            job.namespace,
            job.target,
            job.remaining,
        )
        return _job_info(job)

    @handles(GetJob)
    async def _get_job(self, call: _Call, request: GetJob) -> JobInfo:
        job = await self.store.get_job(request.job_id)
        if job is None:
            raise ServiceError(ErrorCode.NOT_FOUND, f"no job {request.job_id}")
        self._authorize(call, "get-job", job.namespace)
        return _job_info(job)

    @handles(ListJobs)
    async def _list_jobs(self, call: _Call, request: ListJobs) -> ListJobsResult:
        self._require_some_grant(call, "list-jobs")
        jobs = await self.store.list_jobs(request.state)
        return ListJobsResult(
            jobs=tuple(_job_info(j) for j in jobs if self._may(call, "list-jobs", j.namespace))
        )

    async def run_rewrap_batch(self, job: RewrapJob, batch_size: int) -> RewrapJob:
        """Advance a job by one batch.

        The batch's new wrappings and the job's progress are committed in one
        transaction, and each row is only replaced if it is still under the
        version that was read: after a crash the job resumes at its last
        commit, and no DEK is lost, skipped or counted twice.
        """
        records = await self.store.deks_to_rewrap(job.namespace, job.target, job.cursor, batch_size)
        target = self._kek_version(job.namespace, job.target)
        updates: list[tuple[DekRecord, bytes]] = []
        skipped = 0
        for record in records:
            try:
                updates.append((record, await self._rewrapped(record, target)))
            except ServiceError as exc:
                log.warning("rewrap job %s: skipping %s: %s", job.job_id, record.dek_id, exc)
                skipped += 1
        done = len(records) < batch_size
        job = attrs.evolve(
            job,
            cursor=records[-1].dek_id if records else job.cursor,
            skipped=job.skipped + skipped,
            state="done" if done else "running",
            updated_at=self._now(),
        )
        job = await self.store.commit_rewrap_batch(job, updates)
        if done:
            log.info(
                "rewrap job %s done: %d rewrapped, %d skipped",
                job.job_id,
                job.rewrapped,
                job.skipped,
            )
        return job


def _blob_kek(blob_bytes: bytes) -> str | None:
    try:
        return parse_struct(DataKeyBlob, decode_item(blob_bytes), "blob").kek
    except ProtocolError:
        return None


def _job_info(job: RewrapJob) -> JobInfo:
    return JobInfo(
        job_id=job.job_id,
        namespace=job.namespace,
        target_version=job.target,
        state=job.state,
        rewrapped=job.rewrapped,
        skipped=job.skipped,
        remaining=job.remaining,
        created=job.created_at,
        updated=job.updated_at,
    )
