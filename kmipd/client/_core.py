"""The client's sans-IO core: every operation written once, as steps both shells run.

Why it is long: it holds every client operation once; the two I/O shells stay short.

An operation is a generator. It builds its requests, checks the cache,
follows revocations, and ``yield``s a ``Send`` when it needs a daemon's
answer (or an ``Offload`` for blocking work on a stream); the shell does
that I/O and sends the answers back in, or throws the failure in, so the
operation's own ``try``/``except`` decides (the stale-cache fallback, for
one). What comes back is checked here: errors mapped to exceptions, sealed
keys opened, keys kept in protected memory and the cache (emptied when the
daemon refuses this client's certificate). ``Run`` is the drive loop both
shells share: they only perform each effect. ``Client``
(``_sync``) and ``AsyncClient`` (``_async``) only connect, pool, pipeline
and fail over, each with its own I/O: ``@operation`` turns the steps into a
blocking method on one and an ``async`` method on the other.

Why a core and not a blocking client generated from the async one
(``unasync``): the two shells' I/O is not the same program with the
``await``s removed. The blocking client borrows one connection per call from
a thread-safe pool, pipelines a batch in one write and checks idle sockets
with ``select``; the trio client shares connections between tasks that hand
responses to one another, and runs stream crypto on worker threads. A
generated file would either force one design on both or need per-flavour
exceptions in the source, and it would still be a second copy to review;
here what is not I/O exists once, and the shells are small enough to read.
"""

from __future__ import annotations

import inspect
import io
import logging
import ssl
import types
from collections.abc import Callable, Coroutine, Generator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, Self, TypeVar, overload

import attrs
import outcome
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from kmipd import crypto
from kmipd.client._cache import DekCache
from kmipd.client._certs import DEFAULT_RENEW_AT, IssuedCertificate, Renewal
from kmipd.client._common import DEFAULT_TIMEOUT, key_ref, make_endpoints, new_idempotency_key
from kmipd.client._common import unwrap_outcome as _unwrap_outcome
from kmipd.client._envelope import (
    EnvelopeError,
    new_header,
    open_body,
    read_header,
    seal_body,
    write_header,
)
from kmipd.client._errors import (
    CertificateRejectedError,
    DeadlineExceededError,
    KmipdError,
    NotAuthorizedError,
    UnavailableError,
)
from kmipd.client._failover import ServerSet
from kmipd.client._keys import DataKey, Dek, KeyKeeper, Secret
from kmipd.client._managed import CertificateBundle
from kmipd.client._transport import KeyDelivery, client_ca_certificates, verify_fetched
from kmipd.crypto import DEFAULT_CHUNK_SIZE as SEALED_CHUNK_SIZE
from kmipd.crypto import SealedEnvelopeError, TransportKey
from kmipd.crypto._chunked_aead import DEFAULT_CHUNK_SIZE, Readable, Writable
from kmipd.protocol import (
    Activate,
    CaCertificates,
    CertificatePolicy,
    ChangesResult,
    ChangesSince,
    CreateDek,
    CreateKek,
    CreateManagedCertificate,
    CreateSigningKey,
    DeleteManagedCertificate,
    DeleteSecret,
    Dependents,
    DependentsResult,
    Destroy,
    DestroySigningKey,
    GenerateDataKey,
    GetAttributes,
    GetCaCertificates,
    GetDek,
    GetJob,
    GetManagedCertificate,
    GetSecret,
    GetSigningKey,
    GetTransportCert,
    ImportManagedCertificate,
    IssueCertificate,
    IssuedCertificateInfo,
    JobInfo,
    KekInfo,
    KeyAttributes,
    ListCertificates,
    ListCertificatesResult,
    ListJobs,
    ListKeks,
    ListManagedCertificates,
    ListSecrets,
    ListSigningKeys,
    Locate,
    LocateResult,
    ManagedCertificateInfo,
    ManagedCertificateSummary,
    ManagedCertificateVersions,
    PurgeManagedCertificate,
    PurgeSecret,
    Recover,
    RecoverManagedCertificate,
    RecoverSecret,
    RecoverSigningKey,
    RegisterTransportCert,
    RenewCertificate,
    RenewManagedCertificate,
    Revoke,
    RevokeCertificate,
    RevokeManagedCertificate,
    RevokeSigningKey,
    RewrapBlob,
    RewrapBlobResult,
    RewrapDek,
    RotateKek,
    RotateSigningKey,
    SecretInfo,
    SecretSummary,
    SecretVersions,
    SetSecret,
    SignatureResult,
    SignDigest,
    SigningKeyInfo,
    StartRewrap,
    Status,
    StatusResult,
    TransportCertInfo,
    Unwrap,
    UpdateSecret,
    VerifyDigest,
    VerifyResult,
)

if TYPE_CHECKING:
    from kmipd.client._async import AsyncClient
    from kmipd.client._sync import Client

log = logging.getLogger("kmipd.client")

R = TypeVar("R")
P = ParamSpec("P")


@attrs.frozen
class Send:
    """Have a daemon answer these requests (pipelined, failing over as one call).

    The operation resumes with one (outcome, server address, request id) per
    request, or with the call's failure raised at its ``yield``.
    """

    requests: Sequence[Any]
    #: Called with the connection the requests go over (before they are sent).
    inspect: Callable[[Any], None] | None = None


@attrs.frozen
class Offload:
    """Run blocking work (crypto over a caller's stream); the trio shell uses a worker thread."""

    work: Callable[[], Any]


#: What an operation is: a generator of effects that returns the operation's result.
Steps = Generator[Send | Offload, Any, R]


class Run(Generic[R]):
    """Steps being driven: the shell performs ``effect`` and hands back its outcome.

    The one drive loop both shells share (``while run.effect: run.resume(...)``,
    the outcome captured by blocking or by awaiting); a failure is thrown
    back in at the step's ``yield``, cancellation too.
    """

    def __init__(self, steps: Steps[R]) -> None:
        self._steps = steps
        self.effect: Send | Offload | None = None
        self.result: R
        self.resume(outcome.Value(None))

    def resume(self, answer: outcome.Outcome[Any]) -> None:
        try:
            self.effect = answer.send(self._steps)
        except StopIteration as stop:
            self.effect = None
            self.result = stop.value


class operation(Generic[P, R]):  # noqa: N801 (used as a decorator, like property)
    """Make ``steps`` a method of each client, blocking on ``Client``, ``async`` on ``AsyncClient``.

    The shell's ``_method`` wraps the steps in a function that drives them
    with its own I/O; the wrapper carries the steps' name, docstring and
    signature (returning what the steps return), so ``help()`` reads as if
    the method were written in the shell.
    """

    def __init__(self, steps: Callable[Concatenate[Any, P], Steps[R]]) -> None:
        self.steps = steps
        self.__doc__ = steps.__doc__
        self.__name__ = steps.__name__
        self.__wrapped__ = steps
        signature = inspect.signature(steps)
        returns = signature.return_annotation  # "Steps[Dek]" (annotations are strings here)
        if isinstance(returns, str) and returns.startswith("Steps[") and returns.endswith("]"):
            returns = returns[len("Steps[") : -1]
        self.__signature__ = signature.replace(return_annotation=returns)
        self._methods: dict[type[Any], Callable[..., Any]] = {}

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self.__name__ = name

    @overload
    def __get__(self, shell: None, owner: type[Any] | None = None) -> Self: ...
    @overload
    def __get__(self, shell: Client, owner: type[Any] | None = None) -> Callable[P, R]: ...
    @overload
    def __get__(
        self, shell: AsyncClient, owner: type[Any] | None = None
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...
    def __get__(self, shell: Any, owner: type[Any] | None = None) -> Any:
        if shell is None:
            return self
        kind = type(shell)
        method = self._methods.get(kind)
        if method is None:
            method = self._methods[kind] = self._dress(kind._method(self.steps), kind)
        return types.MethodType(method, shell)

    def __call__(self, shell: Any, *args: Any, **kwargs: Any) -> Any:
        """``Client.get_dek(kms, dek_id)``, as with a plain method."""
        return self.__get__(shell)(*args, **kwargs)

    def _dress(self, method: Callable[..., Any], kind: type[Any]) -> Callable[..., Any]:
        method.__name__ = self.__name__
        method.__qualname__ = f"{kind.__qualname__}.{self.__name__}"
        method.__doc__ = self.__doc__
        method.__signature__ = self.__signature__  # type: ignore[attr-defined]
        method.__wrapped__ = self.steps  # type: ignore[attr-defined]
        return method


class ClientCore:
    """What Client and AsyncClient share: their state, and every operation's steps.

    A shell adds ``_method`` (how it drives steps), ``_clock`` and its pools.
    """

    @staticmethod
    def _method(steps: Callable[..., Steps[Any]]) -> Callable[..., Any]:
        """A method of this shell's kind that runs ``steps`` (see ``operation``)."""
        raise NotImplementedError

    def _clock(self) -> float:
        """The shell's clock: time.monotonic, or trio's."""
        raise NotImplementedError

    def _open_pools(self, size: int) -> None:
        raise NotImplementedError

    def __init_subclass__(cls, *, pool_size: int | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if pool_size is not None:
            # One constructor for both shells, with the shell's default pool
            # size (a trio connection pipelines many tasks, a blocking one
            # serves one thread at a time).
            init = ClientCore.__init__
            own = types.FunctionType(init.__code__, init.__globals__, "__init__", init.__defaults__)
            own.__kwdefaults__ = {**(init.__kwdefaults__ or {}), "pool_size": pool_size}
            own.__annotations__ = dict(init.__annotations__)
            own.__qualname__ = f"{cls.__qualname__}.__init__"
            own.__doc__ = init.__doc__
            cls.__init__ = own  # type: ignore[method-assign]

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        client_name: str = "kmipd-python",
        pool_size: int = 4,
        cache: DekCache | None = None,
        revocation_check: float = 5.0,
        backoff_base: float = 0.1,
        backoff_cap: float = 30.0,
        transport: TransportKey | None = None,
        renewal_dir: str | Path | None = None,
        renew_at: float = DEFAULT_RENEW_AT,
    ) -> None:
        """``transport``: this client's key-transport key; every DEK-returning call
        then asks for the key sealed to it (HPKE) and opens it here.

        ``renewal_dir``: renew this client's certificate from the daemon's online CA
        once ``renew_at`` of its lifetime has passed, keeping the new key and
        certificate there (``key.pem``, ``cert.pem``, mode 0600) and connecting with
        them from then on; at start, they are used instead of ``cert``/``key`` when
        they are the newer (see ``kmipd.client._certs``)."""
        if timeout <= 0 or pool_size < 1:
            raise KmipdError("timeout must be positive and pool_size at least 1")
        self._renewal: Renewal | None = None
        if renewal_dir is not None:
            self._renewal = Renewal(Path(renewal_dir), renew_at)
            found = self._renewal.load(cert, key)
            if found is not None:
                cert, key = found
        self._delivery = KeyDelivery(transport)
        endpoints = make_endpoints(
            address,
            ca=ca,
            cert=cert,
            key=key,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
            timeout=timeout,
            client_name=client_name,
            private_context=self._renewal is not None,
        )
        self._timeout = timeout
        self._servers = ServerSet(
            endpoints, backoff_base=backoff_base, backoff_cap=backoff_cap, clock=self._clock
        )
        self._keys = KeyKeeper(cache, revocation_check)
        self._context = endpoints[0].context
        self._open_pools(pool_size)

    @property
    def transport(self) -> TransportKey | None:
        return self._delivery.key

    @property
    def cache(self) -> DekCache | None:
        return self._keys.cache

    @property
    def addresses(self) -> list[str]:
        return [server.address for server in self._servers.servers]

    @property
    def address(self) -> str:
        return self.addresses[0]

    def _certificate_changed(self) -> None:
        """After a renewal: a shell that resumes TLS sessions drops those of the old one."""

    def _forget_keys(self) -> None:
        """On close: zero every cached key."""
        if self._keys.cache is not None:
            self._keys.cache.clear()

    # -- the steps every operation is made of -----------------------------------------------

    def _guarded(self, steps: Steps[R]) -> Steps[R]:
        """``steps``, emptying the cache when the daemon refuses this client's certificate.

        Refused, revoked (the connection cut with certificate-revoked) or
        expired: this identity may no longer hold keys. Shells run every
        operation through here.
        """
        if self._renewal is not None and self._renewal.due():
            yield from self._renew_own_certificate(self._renewal)
        try:
            return (yield from steps)
        except CertificateRejectedError:
            self._forget_keys()
            raise

    def _renew_own_certificate(self, renewal: Renewal, *, quiet: bool = True) -> Steps[None]:
        """Renew before the operation; when ``quiet``, a failure is logged (and retried
        later) and the operation goes ahead with the current certificate."""
        renewal.begin()
        try:
            # Key generation (RSA: ~a second) and the file writes are blocking work.
            key, csr = yield Offload(renewal.new_key)
            result = yield from self._result(RenewCertificate(csr=csr))
            issued = IssuedCertificate.from_result(result)
            yield Offload(lambda: renewal.finish(key, issued, self._context))
            self._certificate_changed()
        except (KmipdError, OSError, ssl.SSLError, ValueError) as exc:
            renewal.failed(exc)
            if not quiet:
                raise
        except BaseException as exc:  # cancelled: try again next time
            renewal.failed(KmipdError(f"interrupted ({type(exc).__name__})"))
            raise

    def _reach(self, inspect: Callable[[Any], None]) -> Steps[None]:
        """Connect to a daemon and show ``inspect`` the connection; send nothing."""
        yield Send((), inspect=inspect)

    def _ask(self, request: Any) -> Steps[tuple[Any, str, int]]:
        """One request's result (a wire error raised), the server and the request id."""
        ((outcome, server, request_id),) = yield Send((request,))
        return _unwrap_outcome(outcome, server=server, request_id=request_id), server, request_id

    def _result(self, request: Any) -> Steps[Any]:
        result, _, _ = yield from self._ask(request)
        return result

    def _follow_revocations(self) -> Steps[None]:
        """Before the cache serves anything: evict what the daemon revoked since last asked.

        At most every ``revocation_check`` seconds (5 by default): a revoked
        or destroyed key leaves the cache within that delay while a daemon
        answers. During an outage the cache keeps serving (see stale_grace).
        """
        keys = self._keys
        if not keys.changes_due(self._clock()):
            return
        try:
            seq = 2**62 if keys.changes_seq is None else keys.changes_seq
            result = yield from self._result(ChangesSince(seq=seq))
            while True:
                keys.apply_changes(result, self._clock())
                if len(result.changes) < 1000 or keys.changes_seq is None:
                    break
                result = yield from self._result(ChangesSince(seq=keys.changes_seq))
        except NotAuthorizedError:
            keys.disable_changes("this identity may not call changes-since")
        except (UnavailableError, DeadlineExceededError):
            keys.changes_checked_at = self._clock()  # try again after the interval

    def _get_deks_batch(self, dek_ids: Iterable[str]) -> Steps[list[Dek]]:
        """Many DEKs: cached ones at once, the others in one pipelined round trip.

        All or nothing: when no daemon answers, every missing one must be in
        the cache (stale allowed), or the call fails.
        """
        yield from self._follow_revocations()
        ids = list(dek_ids)
        found: dict[str, Dek] = {}
        for dek_id in set(ids):
            if (dek := self._keys.cached_dek(dek_id)) is not None:
                found[dek_id] = dek
        missing = [dek_id for dek_id in set(ids) if dek_id not in found]
        if missing:
            seal_to = self._delivery.seal_to
            try:
                answers = yield Send([GetDek(dek_id=dek_id, seal_to=seal_to) for dek_id in missing])
            except (UnavailableError, DeadlineExceededError):
                stale = self._keys.stale_deks(missing)
                if stale is None:
                    raise
                found.update(stale)
            else:
                # Every answer checked and opened before any key is kept.
                results = [
                    _unwrap_outcome(outcome, server=server, request_id=request_id)
                    for outcome, server, request_id in answers
                ]
                clear = [
                    self._delivery.dek(result, "get-dek", server=server, request_id=request_id)
                    for result, (_, server, request_id) in zip(results, answers, strict=True)
                ]
                found.update((r.dek_id, self._keys.keep_dek(r)) for r in clear)
        return self._keys.hand_out(ids, found)

    def _encrypt_stream(
        self,
        source: Readable,
        sink: Writable,
        kek: str,
        context: dict[str, str] | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> Steps[int]:
        """Envelope-encrypt a file of any size in constant memory; returns bytes read."""
        context = dict(context or {})
        with (yield from ClientCore.generate_data_key.steps(self, kek, context)) as data_key:
            header = new_header(
                data_key.kek, data_key.kek_version, data_key.blob, context, chunk_size
            )
            prologue = write_header(sink, header)
            read: int = seal_body(data_key.key, header, prologue, source, sink)
            return read

    def _decrypt_stream(self, source: Readable, sink: Writable) -> Steps[int]:
        """Open an envelope of any size in constant memory; returns bytes written.

        Each chunk is written once it authenticated; if this raises, discard
        what reached ``sink``.
        """
        header, prologue = read_header(source)
        with (yield from ClientCore.unwrap.steps(self, header.blob, header.context)) as data_key:
            written: int = open_body(data_key.key, header, prologue, source, sink)
            return written

    # -- operations ----------------------------------------------------------------

    @operation
    def create_dek(self, namespace: str, *, idempotency_key: bytes | None = None) -> Steps[Dek]:
        """Have the daemon generate, wrap and store a new 256-bit DEK; returns it and its id.

        The request carries an idempotency key (random unless given): if its
        answer is lost, retrying with the same key can never create a second DEK.
        """
        yield from self._follow_revocations()
        key = idempotency_key or new_idempotency_key()
        request = CreateDek(
            namespace=namespace, idempotency_key=key, seal_to=self._delivery.seal_to
        )
        result, server, request_id = yield from self._ask(request)
        clear = self._delivery.dek(result, "create-dek", server=server, request_id=request_id)
        return self._keys.keep_dek(clear)

    @operation
    def get_dek(self, dek_id: str) -> Steps[Dek]:
        """The DEK, from the cache when fresh there, else from a daemon."""
        yield from self._follow_revocations()
        if (cached := self._keys.cached_dek(dek_id)) is not None:
            return cached
        try:
            result, server, request_id = yield from self._ask(
                GetDek(dek_id=dek_id, seal_to=self._delivery.seal_to)
            )
        except (UnavailableError, DeadlineExceededError):
            stale = self._keys.stale_deks([dek_id])
            if stale is None:
                raise
            return stale[dek_id]
        clear = self._delivery.dek(result, "get-dek", server=server, request_id=request_id)
        return self._keys.keep_dek(clear)

    @operation
    def generate_data_key(self, kek: str, context: dict[str, str] | None = None) -> Steps[DataKey]:
        """A fresh key plus its wrapped blob, bound to ``context``; store the blob yourself."""
        yield from self._follow_revocations()
        context = dict(context or {})
        request = GenerateDataKey(kek=kek, context=context, seal_to=self._delivery.seal_to)
        result, server, request_id = yield from self._ask(request)
        made = self._delivery.data_key(result, server=server, request_id=request_id)
        return self._keys.keep_data_key(made.blob, context, made.kek, made.kek_version, made.key)

    @operation
    def unwrap(self, blob: bytes, context: dict[str, str] | None = None) -> Steps[DataKey]:
        """Recover a blob's key (cached by blob and context); the context must match."""
        yield from self._follow_revocations()
        blob, context = bytes(blob), dict(context or {})
        if (cached := self._keys.cached_data_key(blob, context)) is not None:
            return cached
        try:
            result, server, request_id = yield from self._ask(
                Unwrap(blob=blob, context=context, seal_to=self._delivery.seal_to)
            )
        except (UnavailableError, DeadlineExceededError):
            stale = self._keys.cached_data_key(blob, context, stale=True)
            if stale is None:
                raise
            log.warning("daemons unreachable: serving a stale cached data key")
            return stale
        opened = self._delivery.unwrapped(result, blob, server=server, request_id=request_id)
        return self._keys.keep_data_key(blob, context, opened.kek, opened.kek_version, opened.key)

    # -- certificates from the daemon's online CA ----------------------------------------

    @operation
    def issue_certificate(
        self, csr: bytes, *, profile: str = "client", validity: int | None = None
    ) -> Steps[IssuedCertificate]:
        """Have the online CA sign ``csr`` (DER, e.g. from ``make_csr``): ``client`` for
        our own SPIFFE ID, ``server`` for its DNS names; ``validity`` in seconds."""
        result = yield from self._result(
            IssueCertificate(csr=csr, profile=profile, validity=validity)
        )
        return IssuedCertificate.from_result(result)

    @operation
    def renew_certificate(
        self, csr: bytes, *, validity: int | None = None
    ) -> Steps[IssuedCertificate]:
        """A new certificate like the one we connect with, for ``csr``'s (new) key."""
        result = yield from self._result(RenewCertificate(csr=csr, validity=validity))
        return IssuedCertificate.from_result(result)

    @property
    def certificate(self) -> x509.Certificate | None:
        """The certificate new connections present (``renewal_dir`` clients), else None."""
        return None if self._renewal is None else self._renewal.certificate

    @property
    def renewal_due(self) -> bool:
        """Whether our certificate is past ``renew_at`` of its lifetime (``renewal_dir``)."""
        return self._renewal is not None and self._renewal.due()

    @operation
    def renew_now(self) -> Steps[x509.Certificate]:
        """Renew our own certificate now, whatever its age (``renewal_dir`` clients).

        Raises what the renewal met; the files and the connections' certificate
        change only once the new certificate is in hand.
        """
        if self._renewal is None:
            raise KmipdError("renew_now needs a client constructed with renewal_dir=")
        yield from self._renew_own_certificate(self._renewal, quiet=False)
        assert self._renewal.certificate is not None
        return self._renewal.certificate

    @operation
    def get_ca_certificates(self) -> Steps[CaCertificates]:
        """The online CA's certificate chain and its current CRL (DER)."""
        result: CaCertificates = yield from self._result(GetCaCertificates())
        return result

    @operation
    def revoke_certificate(
        self, serial: str, *, reason: str | None = None
    ) -> Steps[IssuedCertificateInfo]:
        """Put an issued certificate on the online CA's CRL (certificates-admin)."""
        result: IssuedCertificateInfo = yield from self._result(
            RevokeCertificate(serial=serial, reason=reason)
        )
        return result

    @operation
    def list_certificates(
        self, *, subject: str | None = None, after: str | None = None, limit: int | None = None
    ) -> Steps[ListCertificatesResult]:
        result: ListCertificatesResult = yield from self._result(
            ListCertificates(subject=subject, after=after, limit=limit)
        )
        return result

    # -- managed certificates (Key Vault style) -----------------------------------------

    @operation
    def create_managed_certificate(
        self, namespace: str, name: str, policy: CertificatePolicy
    ) -> Steps[ManagedCertificateInfo]:
        """The daemon makes the key and has its online CA sign version 1 as ``policy`` says
        (``load_certificate_policy`` reads one from a file)."""
        result: ManagedCertificateInfo = yield from self._result(
            CreateManagedCertificate(namespace=namespace, name=name, policy=policy)
        )
        return result

    @operation
    def import_managed_certificate(
        self,
        namespace: str,
        name: str,
        certificate: x509.Certificate,
        key: PrivateKeyTypes,
        *,
        chain: Sequence[x509.Certificate] = (),
        exportable: bool = False,
    ) -> Steps[ManagedCertificateInfo]:
        """An existing certificate and its key: a new managed certificate, or the next
        version of ``name``; ``chain``: its issuers, nearest first."""
        der = serialization.Encoding.DER
        result: ManagedCertificateInfo = yield from self._result(
            ImportManagedCertificate(
                namespace=namespace,
                name=name,
                certificate=certificate.public_bytes(der),
                key=key.private_bytes(
                    der, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                ),
                chain=tuple(c.public_bytes(der) for c in chain),
                exportable=exportable,
            )
        )
        return result

    @operation
    def get_managed_certificate(
        self, namespace: str, name: str, version: int | None = None, *, with_key: bool = False
    ) -> Steps[CertificateBundle]:
        """The newest version (or ``version``): certificate and chain, and with
        ``with_key`` its private key (exportable ones, with get-managed-certificate-key)."""
        result = yield from self._result(
            GetManagedCertificate(
                namespace=namespace, name=name, version=version, with_key=with_key or None
            )
        )
        return CertificateBundle.from_result(result)

    @operation
    def list_managed_certificates(
        self, namespace: str | None = None, *, deleted: bool = False
    ) -> Steps[list[ManagedCertificateSummary]]:
        """Every managed certificate the caller may list, with its newest version."""
        found: list[ManagedCertificateSummary] = []
        after: tuple[str, ...] | None = None
        while True:
            page = yield from self._result(
                ListManagedCertificates(namespace=namespace, deleted=deleted or None, after=after)
            )
            found.extend(page.certificates)
            if page.next is None:
                return found
            after = page.next

    @operation
    def managed_certificate_versions(
        self, namespace: str, name: str
    ) -> Steps[list[ManagedCertificateInfo]]:
        """Every version's metadata, oldest first."""
        result = yield from self._result(ManagedCertificateVersions(namespace=namespace, name=name))
        return list(result.versions)

    @operation
    def renew_managed_certificate(self, namespace: str, name: str) -> Steps[ManagedCertificateInfo]:
        """A new version now, with a new key, from the certificate's policy."""
        result: ManagedCertificateInfo = yield from self._result(
            RenewManagedCertificate(namespace=namespace, name=name)
        )
        return result

    @operation
    def revoke_managed_certificate(
        self,
        namespace: str,
        name: str,
        version: int | None = None,
        *,
        reason: str | None = None,
    ) -> Steps[ManagedCertificateInfo]:
        """Revoke a version (the newest unless ``version``); the online CA's go on its CRL."""
        result: ManagedCertificateInfo = yield from self._result(
            RevokeManagedCertificate(namespace=namespace, name=name, version=version, reason=reason)
        )
        return result

    @operation
    def delete_managed_certificate(
        self, namespace: str, name: str
    ) -> Steps[ManagedCertificateSummary]:
        """Soft delete: refused until recovered, purged at ``purge_at``."""
        result: ManagedCertificateSummary = yield from self._result(
            DeleteManagedCertificate(namespace=namespace, name=name)
        )
        return result

    @operation
    def recover_managed_certificate(
        self, namespace: str, name: str
    ) -> Steps[ManagedCertificateSummary]:
        result: ManagedCertificateSummary = yield from self._result(
            RecoverManagedCertificate(namespace=namespace, name=name)
        )
        return result

    @operation
    def purge_managed_certificate(
        self, namespace: str, name: str
    ) -> Steps[ManagedCertificateSummary]:
        """Erase a deleted certificate's every version and wrapped key now."""
        result: ManagedCertificateSummary = yield from self._result(
            PurgeManagedCertificate(namespace=namespace, name=name)
        )
        return result

    # -- key transport: the certificate directory, client-to-client sealing ----------------

    @operation
    def register_transport_certificate(
        self, certificate: x509.Certificate | None = None
    ) -> Steps[TransportCertInfo]:
        """Register our key-transport certificate (by default the ``transport`` key's)."""
        if certificate is None:
            certificate = self._delivery.require_key(
                "give a certificate or construct the client with transport="
            ).certificate
        der = certificate.public_bytes(serialization.Encoding.DER)
        result: TransportCertInfo = yield from self._result(RegisterTransportCert(certificate=der))
        return result

    @operation
    def get_transport_certificate(self, identity: str) -> Steps[x509.Certificate]:
        """``identity``'s current transport certificate, verified against our own CA."""
        info, server, _ = yield from self._ask(GetTransportCert(identity=identity))
        return verify_fetched(info, identity, client_ca_certificates(self._context), server=server)

    @operation
    def seal(
        self, data: bytes, recipient: str, *, chunk_size: int = SEALED_CHUNK_SIZE
    ) -> Steps[bytes]:
        """Seal ``data`` for ``recipient`` (a SPIFFE ID) in one self-describing envelope."""
        sink = io.BytesIO()
        yield from ClientCore.seal_stream.steps(
            self, io.BytesIO(data), sink, recipient, chunk_size=chunk_size
        )
        return sink.getvalue()

    @operation
    def seal_stream(
        self,
        source: Readable,
        sink: Writable,
        recipient: str,
        *,
        chunk_size: int = SEALED_CHUNK_SIZE,
    ) -> Steps[int]:
        """Seal a stream of any size in bounded memory; returns bytes read.

        (AsyncClient seals on a worker thread.)
        """
        certificate = yield from ClientCore.get_transport_certificate.steps(self, recipient)
        try:
            read: int = yield Offload(
                lambda: crypto.seal_stream(certificate, source, sink, chunk_size=chunk_size)
            )
        except SealedEnvelopeError as exc:
            raise EnvelopeError(str(exc)) from None
        return read

    @operation
    def open(self, envelope: bytes) -> Steps[bytes]:
        """Open an envelope sealed to this client's transport key (no daemon needed)."""
        sink = io.BytesIO()
        yield from ClientCore.open_stream.steps(self, io.BytesIO(envelope), sink)
        return sink.getvalue()

    @operation
    def open_stream(self, source: Readable, sink: Writable) -> Steps[int]:
        """Open a sealed stream; each chunk is written once it authenticated.

        If this raises, discard what reached ``sink``. (AsyncClient opens on
        a worker thread.)
        """
        key = self._delivery.require_key("opening needs the client's transport key (transport=)")
        try:
            written: int = yield Offload(lambda: crypto.open_stream(key, source, sink))
        except SealedEnvelopeError as exc:
            raise EnvelopeError(str(exc)) from None
        return written

    @operation
    def encrypt(
        self,
        data: bytes,
        kek: str,
        context: dict[str, str] | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> Steps[bytes]:
        """Envelope-encrypt ``data`` under a fresh data key from ``kek`` (see _envelope)."""
        sink = io.BytesIO()
        yield from self._encrypt_stream(io.BytesIO(data), sink, kek, context, chunk_size=chunk_size)
        return sink.getvalue()

    @operation
    def decrypt(self, envelope: bytes) -> Steps[bytes]:
        """Open an envelope: unwrap its data key (through the cache), then the body."""
        sink = io.BytesIO()
        yield from self._decrypt_stream(io.BytesIO(envelope), sink)
        return sink.getvalue()

    @operation
    def list_keks(self, prefix: str | None = None) -> Steps[list[KekInfo]]:
        result = yield from self._result(ListKeks(prefix=prefix))
        return list(result.keks)

    @operation
    def status(self) -> Steps[StatusResult]:
        result: StatusResult = yield from self._result(Status())
        return result

    # -- key lifecycle (administrators; see PROTOCOL.md 4.3) --------------------------------

    @operation
    def create_kek(
        self, name: str, *, usage: Sequence[str] | None = None, activation: int | None = None
    ) -> Steps[KekInfo]:
        """Create a namespace's KEK inside the HSM; a future ``activation`` makes it pre-active."""
        result: KekInfo = yield from self._result(
            CreateKek(
                name=name, usage=None if usage is None else tuple(usage), activation=activation
            )
        )
        return result

    @operation
    def rotate_kek(self, name: str) -> Steps[KeyAttributes]:
        """A new KEK version; new wraps use it, older versions still unwrap."""
        result: KeyAttributes = yield from self._result(RotateKek(name=name))
        return result

    @operation
    def activate(
        self, *, dek_id: str | None = None, kek: str | None = None, version: int | None = None
    ) -> Steps[KeyAttributes]:
        result: KeyAttributes = yield from self._result(Activate(key=key_ref(dek_id, kek, version)))
        return result

    @operation
    def revoke(
        self,
        reason: str,
        *,
        dek_id: str | None = None,
        kek: str | None = None,
        version: int | None = None,
        message: str | None = None,
    ) -> Steps[KeyAttributes]:
        """key-compromise makes the key compromised; other reasons deactivate it."""
        result: KeyAttributes = yield from self._result(
            Revoke(key=key_ref(dek_id, kek, version), reason=reason, message=message)
        )
        return result

    @operation
    def destroy(
        self,
        *,
        dek_id: str | None = None,
        kek: str | None = None,
        version: int | None = None,
        force: bool = False,
        purge_now: bool = False,
    ) -> Steps[KeyAttributes]:
        """Crypto-shredding, after the soft-delete window (or now, with ``purge_now``)."""
        result: KeyAttributes = yield from self._result(
            Destroy(key=key_ref(dek_id, kek, version), force=force, purge_now=purge_now)
        )
        return result

    @operation
    def recover(
        self, *, dek_id: str | None = None, kek: str | None = None, version: int | None = None
    ) -> Steps[KeyAttributes]:
        """Undo a destroy within the soft-delete window."""
        result: KeyAttributes = yield from self._result(Recover(key=key_ref(dek_id, kek, version)))
        return result

    @operation
    def get_attributes(
        self, *, dek_id: str | None = None, kek: str | None = None, version: int | None = None
    ) -> Steps[KeyAttributes]:
        result: KeyAttributes = yield from self._result(
            GetAttributes(key=key_ref(dek_id, kek, version))
        )
        return result

    @operation
    def locate(
        self,
        *,
        kind: str | None = None,
        namespace: str | None = None,
        state: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> Steps[LocateResult]:
        """Keys by kind, namespace (glob) and state; page on with ``after=result.next``."""
        result: LocateResult = yield from self._result(
            Locate(kind=kind, namespace=namespace, state=state, after=after, limit=limit)
        )
        return result

    @operation
    def dependents(
        self, kek: str, version: int, *, limit: int | None = None
    ) -> Steps[DependentsResult]:
        """Which DEKs still depend on a KEK version (rewrap them before destroying it)."""
        result: DependentsResult = yield from self._result(
            Dependents(kek=kek, version=version, limit=limit)
        )
        return result

    @operation
    def rewrap_dek(self, dek_id: str) -> Steps[KeyAttributes]:
        """Re-wrap a stored DEK under its KEK's newest version (the key stays inside)."""
        result: KeyAttributes = yield from self._result(RewrapDek(dek_id=dek_id))
        return result

    @operation
    def rewrap_blob(
        self, blob: bytes, context: dict[str, str] | None = None
    ) -> Steps[RewrapBlobResult]:
        result: RewrapBlobResult = yield from self._result(
            RewrapBlob(blob=bytes(blob), context=dict(context or {}))
        )
        return result

    @operation
    def start_rewrap(self, namespace: str) -> Steps[JobInfo]:
        """A background job rewrapping the namespace's DEKs in batches."""
        result: JobInfo = yield from self._result(StartRewrap(namespace=namespace))
        return result

    @operation
    def get_job(self, job_id: str) -> Steps[JobInfo]:
        result: JobInfo = yield from self._result(GetJob(job_id=job_id))
        return result

    @operation
    def list_jobs(self, state: str | None = None) -> Steps[list[JobInfo]]:
        result = yield from self._result(ListJobs(state=state))
        return list(result.jobs)

    @operation
    def changes_since(self, seq: int, *, limit: int | None = None) -> Steps[ChangesResult]:
        """State changes after ``seq``; the DEK cache uses this to evict revoked keys."""
        result: ChangesResult = yield from self._result(ChangesSince(seq=seq, limit=limit))
        return result

    # -- secrets: named, versioned values (PROTOCOL.md 4.7) --------------------------------

    @operation
    def set_secret(
        self,
        namespace: str,
        name: str,
        value: bytes | bytearray | memoryview,
        *,
        content_type: str | None = None,
        tags: Mapping[str, str] | None = None,
        enabled: bool | None = None,
        not_before: int | None = None,
        expires: int | None = None,
    ) -> Steps[SecretInfo]:
        """Add the secret's next version (version 1 makes the secret); returns its metadata.

        ``content_type`` defaults to the previous version's; dates are epoch
        seconds. A lost answer is never retried (that could add a second
        version): it raises OutcomeUnknownError; look with ``secret_versions``.
        """
        result: SecretInfo = yield from self._result(
            SetSecret(
                namespace=namespace,
                name=name,
                value=bytes(value),
                content_type=content_type,
                tags=None if tags is None else dict(tags),
                enabled=enabled,
                not_before=not_before,
                expires=expires,
            )
        )
        return result

    @operation
    def get_secret(self, namespace: str, name: str, version: int | None = None) -> Steps[Secret]:
        """The newest enabled version (or ``version``), its value in protected memory.

        Close it, or use it in a ``with`` block, to zero the value when done.
        """
        result = yield from self._result(GetSecret(namespace=namespace, name=name, version=version))
        return Secret(result)

    @operation
    def list_secrets(
        self, namespace: str | None = None, *, deleted: bool = False
    ) -> Steps[list[SecretSummary]]:
        """Every secret the caller may list (metadata, never values), in pages of 1,000.

        ``namespace``: a name or glob; ``deleted``: the soft-deleted ones instead.
        """
        found: list[SecretSummary] = []
        after: tuple[str, ...] | None = None
        while True:
            page = yield from self._result(
                ListSecrets(namespace=namespace, deleted=deleted or None, after=after)
            )
            found.extend(page.secrets)
            if page.next is None:
                return found
            after = page.next

    @operation
    def secret_versions(self, namespace: str, name: str) -> Steps[list[SecretInfo]]:
        """Every version's metadata, oldest first."""
        result = yield from self._result(SecretVersions(namespace=namespace, name=name))
        return list(result.versions)

    @operation
    def update_secret(
        self,
        namespace: str,
        name: str,
        *,
        version: int | None = None,
        enabled: bool | None = None,
        not_before: int | None = None,
        expires: int | None = None,
        tags: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> Steps[SecretInfo]:
        """Change a version's attributes (the newest unless ``version``); a date of 0 clears it."""
        result: SecretInfo = yield from self._result(
            UpdateSecret(
                namespace=namespace,
                name=name,
                version=version,
                enabled=enabled,
                not_before=not_before,
                expires=expires,
                tags=None if tags is None else dict(tags),
                content_type=content_type,
            )
        )
        return result

    @operation
    def delete_secret(self, namespace: str, name: str) -> Steps[SecretSummary]:
        """Soft delete: every version refused until recovered, purged at ``purge_at``."""
        result: SecretSummary = yield from self._result(
            DeleteSecret(namespace=namespace, name=name)
        )
        return result

    @operation
    def recover_secret(self, namespace: str, name: str) -> Steps[SecretSummary]:
        """Undo a delete within the soft-delete window."""
        result: SecretSummary = yield from self._result(
            RecoverSecret(namespace=namespace, name=name)
        )
        return result

    @operation
    def purge_secret(self, namespace: str, name: str) -> Steps[SecretSummary]:
        """Erase a deleted secret's every version now, beyond recovery."""
        result: SecretSummary = yield from self._result(PurgeSecret(namespace=namespace, name=name))
        return result

    # -- managed signing keys ------------------------------------------------------------

    @operation
    def create_signing_key(
        self, namespace: str, name: str, key_type: str = "p256", *, activation: int | None = None
    ) -> Steps[SigningKeyInfo]:
        """A key pair in the daemon's HSM (p256, p384, rsa3072, rsa4096); its public half."""
        result: SigningKeyInfo = yield from self._result(
            CreateSigningKey(
                namespace=namespace, name=name, key_type=key_type, activation=activation
            )
        )
        return result

    @operation
    def get_signing_key(
        self, namespace: str, name: str, version: int | None = None
    ) -> Steps[SigningKeyInfo]:
        """A version's public key (SPKI DER) and lifecycle; the current one by default."""
        result: SigningKeyInfo = yield from self._result(
            GetSigningKey(namespace=namespace, name=name, version=version)
        )
        return result

    @operation
    def list_signing_keys(self, namespace: str | None = None) -> Steps[list[SigningKeyInfo]]:
        """Every signing key the caller may list (its current version); ``namespace``: a glob."""
        result = yield from self._result(ListSigningKeys(namespace=namespace))
        return list(result.keys)

    @operation
    def rotate_signing_key(self, namespace: str, name: str) -> Steps[SigningKeyInfo]:
        """A new version (a new key pair) that signs from now on; older ones still verify."""
        result: SigningKeyInfo = yield from self._result(
            RotateSigningKey(namespace=namespace, name=name)
        )
        return result

    @operation
    def sign_digest(
        self, namespace: str, name: str, digest: bytes, algorithm: str = "ES256"
    ) -> Steps[SignatureResult]:
        """The current version's signature of ``digest`` (which we hashed ourselves)."""
        result: SignatureResult = yield from self._result(
            SignDigest(namespace=namespace, name=name, algorithm=algorithm, digest=bytes(digest))
        )
        return result

    @operation
    def verify_digest(
        self,
        namespace: str,
        name: str,
        digest: bytes,
        signature: bytes,
        algorithm: str = "ES256",
        *,
        version: int | None = None,
    ) -> Steps[VerifyResult]:
        """Whether ``signature`` verifies (with ``version``, or any version still verifying)."""
        result: VerifyResult = yield from self._result(
            VerifyDigest(
                namespace=namespace,
                name=name,
                algorithm=algorithm,
                digest=bytes(digest),
                signature=bytes(signature),
                version=version,
            )
        )
        return result

    @operation
    def revoke_signing_key(
        self,
        namespace: str,
        name: str,
        reason: str,
        *,
        version: int | None = None,
        message: str | None = None,
    ) -> Steps[SigningKeyInfo]:
        """Deactivate (or mark compromised) a version, the current one by default."""
        result: SigningKeyInfo = yield from self._result(
            RevokeSigningKey(
                namespace=namespace, name=name, reason=reason, version=version, message=message
            )
        )
        return result

    @operation
    def destroy_signing_key(
        self, namespace: str, name: str, *, version: int | None = None, purge_now: bool = False
    ) -> Steps[SigningKeyInfo]:
        """Erase a revoked version's key pair after the soft-delete window (or now)."""
        result: SigningKeyInfo = yield from self._result(
            DestroySigningKey(
                namespace=namespace, name=name, version=version, purge_now=purge_now or None
            )
        )
        return result

    @operation
    def recover_signing_key(
        self, namespace: str, name: str, *, version: int | None = None
    ) -> Steps[SigningKeyInfo]:
        """Cancel a pending destroy within the soft-delete window."""
        result: SigningKeyInfo = yield from self._result(
            RecoverSigningKey(namespace=namespace, name=name, version=version)
        )
        return result
