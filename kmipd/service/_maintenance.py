"""Maintenance: purging destroyed keys, recording date transitions, automatic KEK rotation;
the daemon's maintenance task calls ``maintain`` on a timer.
"""

from __future__ import annotations

import logging

import attrs

from kmipd.hsm import HsmError, HsmKeyNotFoundError
from kmipd.lifecycle import Event
from kmipd.service._core import _kek_what
from kmipd.service._keks import KekOperations, _rotation_due

log = logging.getLogger("kmipd.service")


class MaintenanceOperations(KekOperations):
    """The passes nobody requests: dates that passed, rotations due, material to erase."""

    async def purge_due(self) -> int:
        """Erase the material of destroyed keys whose soft-delete window ended."""
        now = self._now()
        deks, versions = await self.store.due_for_purge(now)
        for record in deks:
            await self.store.purge_dek(record, record.lifecycle.apply(Event.DESTROY, now))
            log.info("destroyed DEK %s: its wrapped material is erased", record.dek_id)
        purged = 0
        for version in versions:
            if version.hsm_handle:
                try:
                    await self.hsm.destroy_kek(version.hsm_handle)
                except HsmKeyNotFoundError:
                    pass  # already gone from the HSM: the row goes too
                except HsmError as exc:
                    # Keep the row (and its handle): dropping it would leave the KEK in
                    # the HSM with nothing pointing at it. The next pass retries.
                    log.error(
                        "cannot purge %s from the HSM yet (%s); retrying at the next "
                        "maintenance pass",
                        _kek_what(version),
                        exc,
                    )
                    continue
            purged += 1
            orphans = await self.store.purge_kek_version(
                version, version.lifecycle.apply(Event.DESTROY, now)
            )
            log.warning(
                "purged %s from the HSM; %d DEK(s) only it wrapped are gone",
                _kek_what(version),
                len(orphans),
            )
        if deks or purged:
            await self.store.checkpoint()
        return len(deks) + purged

    async def maintain(self) -> None:
        """One maintenance pass: record date transitions, rotate due KEKs, purge."""
        now = self._now()
        for kek in self.store.list_keks():
            for version in kek.versions:
                effective = version.lifecycle.effective(now)
                if effective is not version.lifecycle.state:
                    changed = attrs.evolve(version.lifecycle, state=effective)
                    await self.store.set_kek_version_lifecycle(version, changed)
                    log.info("%s is now %s (its date passed)", _kek_what(version), effective.value)
            fresh = self.store.get_kek(kek.name)
            if fresh is not None and self.lifecycle.auto_rotate and _rotation_due(fresh, now):
                await self.rotate(kek.name, "automatic: protect-stop reached")
        await self.purge_due()
        pruned = await self.store.prune_changes(self.lifecycle.change_feed_seconds)
        if pruned:
            log.info("pruned %d change-feed entries older than the feed's retention", pruned)
