"""The PKCS#11 backend: KEKs are AES-256 objects on a token that never leave it.

Why it is long: a token's failure modes are handled here in full (session pool, login,
per-call timeouts, each CKR_* mapped to our errors), all under one session discipline.

Wrapping is AES-256-GCM in one ``C_Encrypt`` / ``C_Decrypt`` on the token,
laid out exactly like the software backend's blobs (``nonce || ciphertext ||
tag``, the same associated data), so a store can move between backends. No
unwrapped key ever becomes a token or session object: the DEK is the
plaintext of one decrypt, so there is nothing to destroy and nothing that can
leak on the token, on errors or cancellation alike.

Threads. python-pkcs11 calls ``C_Initialize(NULL)``, which tells the library
the application is single-threaded: SoftHSM2 then takes no locks and crashes
as soon as two threads call it. So this module initialises the library itself
(``CKF_OS_LOCKING_OK``) through ctypes, and a subclass stops python-pkcs11
from initialising it again. ``hsm.sessions`` worker threads each own one
session; calls are queued to them, bounded by ``hsm.timeout``, and their
results handed back to trio. python-pkcs11 releases the GIL during every C
call, so a worker stuck in a hung token never stops the event loop.

Failure. A call that times out, or a token/session/login that is gone, marks
the backend *down*: every call then fails at once with HsmUnavailableError
(wire error ``hsm-unavailable``), ``check()`` fails (status says degraded, the
watchdog withholds its pings), and every ``hsm.retry_interval`` one probe
re-opens the sessions and logs in again (re-initialising the library if the
token is still missing and no call is stuck in it). A refused PIN is never
retried: retrying would lock the token.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

import attrs
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11._pkcs11 import lib as _pkcs11_lib
from pkcs11.mechanisms import GCMParams
from pkcs11.util.ec import (
    decode_ec_private_key,
    decode_ec_public_key,
    encode_ec_public_key,
    encode_ecdsa_signature,
    encode_named_curve_parameters,
)

from kmipd.crypto._private_files import PrivateFileError, read_private_file
from kmipd.hsm._interface import (
    HsmError,
    HsmIntegrityError,
    HsmKeyNotFoundError,
    HsmUnavailableError,
)
from kmipd.hsm._signing import (
    DIGEST_INFO_PREFIX,
    RSA_KEY_TYPES,
    SIGNATURE_ALGORITHMS,
    SIGNING_CURVES,
    check_key_type,
    check_signature_request,
    curve_of,
    key_type_of,
    load_signing_key,
)

log = logging.getLogger("kmipd.hsm")

NONCE_SIZE = 12
TAG_SIZE = 16
KEK_BITS = 256
HANDLE_PREFIX = "p11-"
#: Handles of signing key pairs (the private and public objects share one CKA_ID).
SIGNING_PREFIX = "p11-sign-"
#: Calls a worker takes from the queue at once (one handoff back to trio for all).
BATCH_SIZE = 16

T = TypeVar("T")


# -- settings and the PIN ------------------------------------------------------------------


@attrs.frozen
class Pkcs11Settings:
    """The ``[hsm]`` settings of ``backend = "pkcs11"`` (see kmipd.daemon.config)."""

    library: Path
    token_label: str | None = None
    token_serial: str | None = None
    pin_file: Path | None = None
    pin_credential: str | None = None
    label_prefix: str = "kmipd/"
    sessions: int = 4
    timeout: float = 5.0
    retry_interval: float = 5.0

    @property
    def token(self) -> str:
        if self.token_label is not None:
            return f"token labelled {self.token_label!r}"
        return f"token with serial {self.token_serial!r}"


def pin_path(settings: Pkcs11Settings, environ: Mapping[str, str] | None = None) -> Path:
    """Where the PIN is read from: the PIN file, or the systemd credential."""
    if settings.pin_file is not None:
        return settings.pin_file
    env = os.environ if environ is None else environ
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise HsmError(
            f"hsm.pin_credential: $CREDENTIALS_DIRECTORY is not set (not running under "
            f"systemd with LoadCredential={settings.pin_credential}:...?)"
        )
    return Path(directory) / str(settings.pin_credential)


def read_pin(settings: Pkcs11Settings, environ: Mapping[str, str] | None = None) -> str:
    """The user PIN, refusing a file others could read. Never echoed anywhere."""
    key = "hsm.pin_file" if settings.pin_file is not None else "hsm.pin_credential"
    path = pin_path(settings, environ)
    try:
        data = read_private_file(path, "PIN file")
    except PrivateFileError as exc:
        raise HsmError(f"{key}: {exc}") from None
    try:
        pin = data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise HsmError(f"{key}: {path} is not UTF-8 text") from None
    if not pin:
        raise HsmError(f"{key}: {path} is empty")
    return pin


# -- the library, initialised with OS locking ---------------------------------------------

CKF_OS_LOCKING_OK = 0x2
CKU_USER = 1
CKR_OK = 0
CKR_USER_ALREADY_LOGGED_IN = 0x100
#: CKR_PIN_INCORRECT, _INVALID, _LEN_RANGE, _EXPIRED, _LOCKED: never retried.
_PIN_REFUSALS = {
    0xA0: "the token refused the PIN (incorrect)",
    0xA1: "the token refused the PIN (invalid)",
    0xA2: "the token refused the PIN (wrong length)",
    0xA3: "the token refused the PIN (expired)",
    0xA4: "the token's PIN is locked",
}


class _InitializeArgs(ctypes.Structure):
    _fields_ = (
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    )


_RV = ctypes.c_ulong
_InitFn = ctypes.CFUNCTYPE(_RV, ctypes.c_void_p)
_SessionFn = ctypes.CFUNCTYPE(_RV, ctypes.c_ulong)
_LoginFn = ctypes.CFUNCTYPE(_RV, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong)


class _FunctionList(ctypes.Structure):
    """The head of CK_FUNCTION_LIST, up to C_Login (PKCS#11 2.40 section 5.16 order)."""

    _fields_ = (
        ("major", ctypes.c_ubyte),
        ("minor", ctypes.c_ubyte),
        ("C_Initialize", _InitFn),
        ("C_Finalize", _InitFn),
        *((name, ctypes.c_void_p) for name in ("GetInfo", "GetFunctionList", "GetSlotList")),
        *((name, ctypes.c_void_p) for name in ("GetSlotInfo", "GetTokenInfo", "GetMechList")),
        *((name, ctypes.c_void_p) for name in ("GetMechInfo", "InitToken", "InitPIN", "SetPIN")),
        ("C_OpenSession", ctypes.c_void_p),
        ("C_CloseSession", _SessionFn),
        ("C_CloseAllSessions", ctypes.c_void_p),
        ("C_GetSessionInfo", ctypes.c_void_p),
        ("C_GetOperationState", ctypes.c_void_p),
        ("C_SetOperationState", ctypes.c_void_p),
        ("C_Login", _LoginFn),
    )


class _PreInitialisedLib(_pkcs11_lib):
    """python-pkcs11's library object, minus its ``C_Initialize(NULL)``.

    Relies on a python-pkcs11 internal (``lib.initialize`` is a cpdef method
    its constructor calls): that is why pyproject pins python-pkcs11 to 0.10.x.
    """

    def initialize(self) -> None:
        pass  # _Library already did, with CKF_OS_LOCKING_OK


class _Library:
    """One PKCS#11 module in this process, shared by every backend that uses it.

    Initialisation is process-wide in PKCS#11, so it is counted here: the last
    user to close finalises the library.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._dll = ctypes.CDLL(str(path))
            get_list = self._dll.C_GetFunctionList
        except (OSError, AttributeError) as exc:
            raise HsmError(f"hsm.library: cannot load {path}: {exc}") from None
        pointer = ctypes.POINTER(_FunctionList)()
        rv = get_list(ctypes.byref(pointer))
        if rv != CKR_OK:
            raise HsmError(f"hsm.library: {path}: C_GetFunctionList failed (0x{rv:x})")
        self._functions = pointer.contents
        self._initialize()
        try:
            self.lib = _PreInitialisedLib(str(path))
        except p11.PKCS11Error as exc:
            self._finalize()
            raise HsmError(f"hsm.library: {path}: {_describe(exc)}") from None
        self.users = 0

    def _initialize(self) -> None:
        args = _InitializeArgs(flags=CKF_OS_LOCKING_OK)
        rv = self._functions.C_Initialize(ctypes.addressof(args))
        if rv != CKR_OK:
            raise HsmError(f"hsm.library: {self.path}: C_Initialize failed (0x{rv:x})")

    def _finalize(self) -> None:
        self._functions.C_Finalize(None)

    def reinitialize(self) -> None:
        """Finalise and initialise again: how a library notices a token that came back."""
        self._finalize()
        self._initialize()

    def login(self, session_handle: int, pin: str) -> None:
        encoded = pin.encode("utf-8")
        rv = self._functions.C_Login(session_handle, CKU_USER, encoded, len(encoded))
        if rv in (CKR_OK, CKR_USER_ALREADY_LOGGED_IN):
            return
        if rv in _PIN_REFUSALS:
            raise _PinRefusedError(_PIN_REFUSALS[rv])
        raise _TokenGoneError(f"C_Login failed (0x{rv:x})")

    def close_session(self, session_handle: int) -> None:
        # Not python-pkcs11's Session.close(): its C_Logout would log out every
        # session of the process, another backend's on the same token included.
        self._functions.C_CloseSession(session_handle)


_LIBRARIES: dict[Path, _Library] = {}
_LIBRARIES_LOCK = threading.Lock()


def _acquire_library(path: Path) -> _Library:
    with _LIBRARIES_LOCK:
        library = _LIBRARIES.get(path)
        if library is None:
            library = _LIBRARIES[path] = _Library(path)
        library.users += 1
        return library


def _release_library(library: _Library, *, finalize: bool) -> None:
    with _LIBRARIES_LOCK:
        library.users -= 1
        if library.users == 0 and finalize:
            library._finalize()
            del _LIBRARIES[library.path]


# -- errors -------------------------------------------------------------------------------


class _TokenGoneError(HsmUnavailableError):
    """The token, the session or the login is gone: the backend goes down."""


class _PinRefusedError(HsmError):
    """The token refused the PIN: fatal, never retried."""


#: python-pkcs11 errors that mean the token (or our session on it) is gone.
_GONE = (
    p11.DeviceError,
    p11.DeviceMemory,
    p11.DeviceRemoved,
    p11.GeneralError,
    p11.FunctionFailed,
    p11.KeyHandleInvalid,
    p11.ObjectHandleInvalid,
    p11.SessionClosed,
    p11.SessionHandleInvalid,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
    p11.UserNotLoggedIn,
)


def _describe(exc: BaseException) -> str:
    """A PKCS#11 error as text: its CKR name; python-pkcs11 messages hold no data."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _signing_id(handle: str) -> bytes:
    return _id_of(handle, SIGNING_PREFIX, "signing key")


def _signing_templates(
    label: str, cka_id: bytes, curve: str
) -> tuple[dict[Attribute, Any], dict[Attribute, Any]]:
    """A signing key pair per the single-purpose rule: the private half signs, never
    decrypts, unwraps or derives, and never leaves the token (``curve``: a key type)."""
    key_type = KeyType.RSA if curve in RSA_KEY_TYPES else KeyType.EC
    public: dict[Attribute, Any] = {
        Attribute.CLASS: ObjectClass.PUBLIC_KEY,
        Attribute.KEY_TYPE: key_type,
        Attribute.LABEL: label,
        Attribute.ID: cka_id,
        Attribute.TOKEN: True,
        Attribute.VERIFY: True,
        Attribute.ENCRYPT: False,
        Attribute.WRAP: False,
        Attribute.DERIVE: False,
        Attribute.MODIFIABLE: False,
    }
    if key_type is KeyType.RSA:
        public[Attribute.MODULUS_BITS] = RSA_KEY_TYPES[curve]
        public[Attribute.PUBLIC_EXPONENT] = b"\x01\x00\x01"
    else:
        public[Attribute.EC_PARAMS] = encode_named_curve_parameters(SIGNING_CURVES[curve][2])
    private = {
        Attribute.CLASS: ObjectClass.PRIVATE_KEY,
        Attribute.KEY_TYPE: key_type,
        Attribute.LABEL: label,
        Attribute.ID: cka_id,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.MODIFIABLE: False,
        Attribute.SIGN: True,
        Attribute.DECRYPT: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
    }
    return public, private


def _handle_id(handle: str) -> bytes:
    return _id_of(handle, HANDLE_PREFIX, "KEK")


def _id_of(handle: str, prefix: str, what: str) -> bytes:
    """The CKA_ID a handle names (``PREFIX`` + hex)."""
    if not handle.startswith(prefix):
        raise HsmKeyNotFoundError(f"{handle!r} is not a PKCS#11 {what} handle")
    try:
        return bytes.fromhex(handle[len(prefix) :])
    except ValueError:
        raise HsmKeyNotFoundError(f"{handle!r} is not a PKCS#11 {what} handle") from None


def _kek_template(label: str, cka_id: bytes) -> dict[Attribute, Any]:
    """A KEK per the single-purpose rule: encrypt/decrypt only, never leaves the token."""
    return {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: KeyType.AES,
        Attribute.LABEL: label,
        Attribute.ID: cka_id,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.MODIFIABLE: False,
        Attribute.COPYABLE: False,
        Attribute.ENCRYPT: True,
        Attribute.DECRYPT: True,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
        Attribute.SIGN: False,
        Attribute.VERIFY: False,
        Attribute.DERIVE: False,
    }


#: What ``kmipd hsm list`` shows of each object (never its value).
LISTED_ATTRIBUTES = {
    "label": Attribute.LABEL,
    "id": Attribute.ID,
    "value_len": Attribute.VALUE_LEN,
    "private": Attribute.PRIVATE,
    "sensitive": Attribute.SENSITIVE,
    "always_sensitive": Attribute.ALWAYS_SENSITIVE,
    "extractable": Attribute.EXTRACTABLE,
    "never_extractable": Attribute.NEVER_EXTRACTABLE,
    "local": Attribute.LOCAL,
    "modifiable": Attribute.MODIFIABLE,
    "encrypt": Attribute.ENCRYPT,
    "decrypt": Attribute.DECRYPT,
    "wrap": Attribute.WRAP,
    "unwrap": Attribute.UNWRAP,
    "sign": Attribute.SIGN,
    "derive": Attribute.DERIVE,
}


# -- calls and workers ----------------------------------------------------------------------


@attrs.define
class _Worker:
    """One worker thread's view: its session and the KEK objects it looked up."""

    index: int
    session: Any = None
    generation: int = -1
    keys: dict[bytes, Any] = attrs.field(factory=dict)
    #: Signing key objects by (object class, CKA_ID): the private half signs, the
    #: public half is read for its point.
    signers: dict[tuple[ObjectClass, bytes], Any] = attrs.field(factory=dict)
    #: CKA_IDs of signing keys destroyed (by any worker): never served from the cache,
    #: whose object handle another worker's destroy made invalid.
    destroyed: set[bytes] = attrs.field(factory=set)

    def signing_key(self, object_class: ObjectClass, cka_id: bytes) -> Any:
        if cka_id in self.destroyed:
            self.signers.pop((object_class, cka_id), None)
        found = self.signers.get((object_class, cka_id))
        if found is None:
            self.session.token.slot.get_token()  # as in key(): is the token there?
            try:
                found = self.session.get_key(object_class=object_class, id=cka_id)
            except p11.NoSuchKey:
                raise HsmKeyNotFoundError(
                    f"no signing key with handle {SIGNING_PREFIX}{cka_id.hex()} on the token"
                ) from None
            self.signers[(object_class, cka_id)] = found
        return found

    def key(self, cka_id: bytes) -> Any:
        found = self.keys.get(cka_id)
        if found is None:
            # Is the token there? (This raises if not.) A search on a removed token
            # finds nothing, which is not "no such KEK"; and python-pkcs11 0.10 leaves
            # a search whose C_FindObjectsInit failed to be ended by the garbage
            # collector, which then reports an error nobody can catch.
            self.session.token.slot.get_token()
            try:
                found = self.session.get_key(object_class=ObjectClass.SECRET_KEY, id=cka_id)
            except p11.NoSuchKey:
                raise HsmKeyNotFoundError(
                    f"no KEK with handle {HANDLE_PREFIX}{cka_id.hex()} on the token"
                ) from None
            self.keys[cka_id] = found
        return found


_QUEUED, _RUNNING, _DONE, _ABANDONED = "queued", "running", "done", "abandoned"


class _Call(Generic[T]):
    """One call for a worker; exactly one of the worker and the caller decides its fate."""

    def __init__(
        self,
        run: Callable[[_Worker], T],
        cleanup: Callable[[_Worker, T], None] | None,
        generation: int,
    ) -> None:
        self.run = run
        self.cleanup = cleanup
        self.generation = generation
        self.done = trio.Event()
        self.state = _QUEUED
        self.result: T | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def claim(self) -> bool:
        """Worker: start it, unless its caller gave up while it was queued."""
        with self._lock:
            if self.state != _QUEUED:
                return False
            self.state = _RUNNING
            return True

    def finish(self, worker: _Worker, result: T | None, error: BaseException | None) -> None:
        with self._lock:
            abandoned = self.state == _ABANDONED
            self.state = _DONE
            self.result, self.error = result, error
        if abandoned and error is None and self.cleanup is not None:
            self.cleanup(worker, result)  # type: ignore[arg-type]  # set when error is None

    def abandon(self) -> str:
        """Caller: give up; returns the state it was in (queued: it will never run)."""
        with self._lock:
            state = self.state
            if state in (_QUEUED, _RUNNING):
                self.state = _ABANDONED
            return state


_STOP = object()


class _Handoff:
    """Between open() and its thread: a backend connected after open() gave up is closed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._delivered: Pkcs11Hsm | None = None
        self.taken = False

    def deliver(self, hsm: Pkcs11Hsm) -> Pkcs11Hsm:
        with self._lock:
            late = self._abandoned
            self._delivered = hsm
        if late:
            hsm.close()
        return hsm

    def give_up(self) -> None:
        with self._lock:
            if self.taken:
                return
            self._abandoned = True
            delivered = self._delivered
        if delivered is not None:  # connected, but its result arrived after the timeout
            delivered.close()


class _CheckRun:
    """One check of the token; every check() meanwhile waits for its outcome."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.problem: str | None = None


class Pkcs11Hsm:
    """KEKs on a PKCS#11 token, used through a fixed pool of worker sessions."""

    name = "pkcs11"

    def __init__(self, settings: Pkcs11Settings, pin: str) -> None:
        self.settings = settings
        self._pin = pin
        self._library = _acquire_library(settings.library)
        self._token: Any = None
        self._sessions: list[Any] = []
        self._generation = 0
        self._connect_lock = threading.Lock()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._trio_token: trio.lowlevel.TrioToken | None = None
        #: None while the token answers; otherwise why not.
        self.down_reason: str | None = None
        self._pin_refused: str | None = None
        self._recovery: trio.CancelScope | None = None
        self._up = trio.Event()
        self._up.set()
        self._check_run: _CheckRun | None = None
        self._closed = False
        #: Signing keys' public halves (SPKI DER) by handle.
        self._public_keys: dict[str, bytes] = {}
        #: Shared by the workers (see _Worker.destroyed); only ever grows, by CKA_ID.
        self._destroyed_signers: set[bytes] = set()

    def __repr__(self) -> str:
        state = "up" if self.down_reason is None else "down"
        return f"Pkcs11Hsm({self.settings.token}, sessions={self.settings.sessions}, {state})"

    @classmethod
    async def open(cls, settings: Pkcs11Settings, pin: str) -> Pkcs11Hsm:
        """Load the library, find the token, log in, start the workers; bounded by hsm.timeout."""
        handoff = _Handoff()

        def load_and_connect() -> Pkcs11Hsm:
            # Loading the library can hang on a hung token as well as logging in can.
            hsm = cls(settings, pin)
            try:
                hsm._connect()
            except BaseException:
                hsm.close()
                raise
            return handoff.deliver(hsm)

        try:
            with trio.move_on_after(settings.timeout):
                hsm = await trio.to_thread.run_sync(load_and_connect, abandon_on_cancel=True)
                handoff.taken = True
        finally:
            handoff.give_up()  # a backend connected after this is closed by its thread
        if not handoff.taken:
            raise HsmUnavailableError(
                f"the {settings.token} did not answer within hsm.timeout "
                f"({settings.timeout:g} s) while loading the library and logging in"
            )
        hsm._start_workers()
        return hsm

    # -- connecting (blocking: worker threads or the opening thread) ---------------------------

    def _find_token(self) -> Any:
        settings = self.settings
        kwargs = (
            {"token_label": settings.token_label}
            if settings.token_label is not None
            else {"token_serial": settings.token_serial}
        )
        try:
            return self._library.lib.get_token(**kwargs)
        except p11.NoSuchToken:
            seen = ", ".join(
                f"{t.label!r} (serial {t.serial!r})" for t in self._library.lib.get_tokens()
            )
            raise _TokenGoneError(
                f"no {settings.token} in {settings.library} (tokens present: {seen or 'none'})"
            ) from None
        except p11.MultipleTokensReturned:
            raise HsmError(
                f"several tokens match: {settings.token}; use hsm.token_serial"
            ) from None

    def _connect(self) -> None:
        """Open a fresh set of sessions and log in; then close the sessions of before.

        The new set replaces the old one in one assignment, so a worker never sees
        half of it; opening before closing keeps the login (it ends with the last session).
        """
        if self._pin_refused is not None:
            raise HsmUnavailableError(self._pin_refused)
        with self._connect_lock:
            sessions: list[Any] = []
            try:
                token = self._find_token()
                for _ in range(self.settings.sessions):
                    sessions.append(token.open(rw=True))
                self._library.login(sessions[0].handle, self._pin)
            except BaseException as exc:
                self._close_sessions(sessions)
                if isinstance(exc, _PinRefusedError):
                    self._pin_refused = (
                        f"{exc} for the {self.settings.token}; not retried (that would lock "
                        "the token): fix the PIN and restart kmipd"
                    )
                    raise HsmError(self._pin_refused) from None
                if isinstance(exc, _GONE):
                    raise _TokenGoneError(
                        f"cannot open a session on the {self.settings.token}: {_describe(exc)}"
                    ) from None
                if isinstance(exc, p11.PKCS11Error):
                    raise HsmError(f"{self.settings.token}: {_describe(exc)}") from None
                raise
            old, self._sessions = self._sessions, sessions
            self._token = token
            self._generation += 1
            self._close_sessions(old)

    def _close_sessions(self, sessions: list[Any]) -> None:
        for session in sessions:
            try:
                self._library.close_session(session.handle)
            except Exception:  # a gone session is already closed
                log.debug("closing a PKCS#11 session failed", exc_info=True)

    def _reconnect(self, worker: _Worker) -> None:
        """The probe: log in again; if the token is still missing, re-initialise the library."""
        try:
            self._connect()
        except _TokenGoneError:
            with self._busy_lock:
                alone = self._busy == 1  # only this probe is in the library
            with _LIBRARIES_LOCK:
                alone = alone and self._library.users == 1
            if not alone:
                raise
            log.info("PKCS#11: re-initialising %s to look for the token", self.settings.library)
            self._library.reinitialize()
            self._connect()
        self._use_session(worker)
        self._check(worker)

    def _use_session(self, worker: _Worker) -> None:
        if worker.generation != self._generation:
            worker.session = self._sessions[worker.index]
            worker.generation = self._generation
            worker.keys.clear()
            worker.signers.clear()

    # -- the workers -----------------------------------------------------------------------

    def _start_workers(self) -> None:
        self._trio_token = trio.lowlevel.current_trio_token()
        for index in range(self.settings.sessions):
            thread = threading.Thread(
                target=self._work,
                args=(_Worker(index, destroyed=self._destroyed_signers),),
                name=f"kmipd-pkcs11-{index}",
                daemon=True,  # one stuck in a hung token must not hold up the exit
            )
            thread.start()
            self._threads.append(thread)

    def _work(self, worker: _Worker) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < BATCH_SIZE:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    self._queue.put(_STOP)  # for this worker's next round
                    break
                batch.append(more)
            for call in batch:
                if call.claim():
                    self._run(worker, call)
            assert self._trio_token is not None
            try:
                self._trio_token.run_sync_soon(_deliver, batch)
            except trio.RunFinishedError:
                return

    def _run(self, worker: _Worker, call: _Call[Any]) -> None:
        with self._busy_lock:
            self._busy += 1
        result, error = None, None
        try:
            if call.run != self._reconnect:
                self._use_session(worker)
            result = call.run(worker)
        except HsmError as exc:
            error = exc
        except _GONE as exc:
            worker.keys.clear()  # handles may be stale after a reconnect
            worker.signers.clear()
            error = _TokenGoneError(f"the {self.settings.token} failed: {_describe(exc)}")
        except p11.PKCS11Error as exc:
            error = HsmError(f"the {self.settings.token} refused the call: {_describe(exc)}")
        except Exception as exc:
            log.exception("PKCS#11 worker: unexpected error")
            error = HsmError(f"unexpected PKCS#11 failure: {type(exc).__name__}")
        finally:
            with self._busy_lock:
                self._busy -= 1
        try:
            call.finish(worker, result, error)
        except Exception:
            log.exception("PKCS#11 worker: cleanup of an abandoned call failed")

    async def _call(
        self,
        what: str,
        run: Callable[[_Worker], T],
        cleanup: Callable[[_Worker, T], None] | None = None,
        *,
        probe: bool = False,
    ) -> T:
        """Run ``run`` on a worker, within hsm.timeout; fail at once while the token is down."""
        if self._closed:
            raise HsmUnavailableError("the PKCS#11 backend is closed")
        if self.down_reason is not None and not probe:
            raise HsmUnavailableError(
                f"the {self.settings.token} is unavailable ({self.down_reason}); "
                f"retrying every {self.settings.retry_interval:g} s"
            )
        call = _Call(run, cleanup, self._generation)
        self._queue.put(call)
        try:
            with trio.move_on_after(self.settings.timeout):
                await call.done.wait()
        except BaseException:
            if call.abandon() == _DONE and call.error is None and cleanup is not None:
                self._cleanup_later(call, cleanup)  # done, but the caller is gone
            raise
        if not call.done.is_set():
            state = call.abandon()
            if state != _DONE:
                reason = (
                    f"{what} got no answer within hsm.timeout ({self.settings.timeout:g} s)"
                    if state == _RUNNING
                    else f"{what} found no free session within hsm.timeout "
                    f"({self.settings.timeout:g} s)"
                )
                if not probe:
                    self._mark_down(reason)
                raise HsmUnavailableError(f"the {self.settings.token}: {reason}")
        # (A failure of a call on the sessions of before a reconnect is old news.)
        gone = isinstance(call.error, _TokenGoneError) and call.generation == self._generation
        if gone and not probe:
            self._mark_down(str(call.error))
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]  # set when error is None

    def _cleanup_later(self, call: _Call[T], cleanup: Callable[[_Worker, T], None]) -> None:
        result = call.result

        def run(worker: _Worker) -> None:
            cleanup(worker, result)  # type: ignore[arg-type]  # set when error is None

        self._queue.put(_Call(run, None, self._generation))

    # -- down and back up ------------------------------------------------------------------

    def _mark_down(self, reason: str) -> None:
        if self.down_reason is None:
            log.error(
                "HSM down: %s; answering hsm-unavailable, probing every %g s",
                reason,
                self.settings.retry_interval,
            )
        self.down_reason = reason
        if self._up.is_set():
            self._up = trio.Event()
        if self._recovery is None and not self._closed:
            self._recovery = trio.CancelScope()
            trio.lowlevel.spawn_system_task(self._recover, self._recovery)

    async def _recover(self, scope: trio.CancelScope) -> None:
        with scope:
            while self.down_reason is not None and self._pin_refused is None:
                await trio.sleep(self.settings.retry_interval)  # the probe's pace
                try:
                    await self._call("reconnect", self._reconnect, probe=True)
                except HsmError as exc:
                    log.debug("HSM probe failed: %s", exc)
                    self._note_pin_refusal()
                    continue
                log.info("HSM back: the %s answers again", self.settings.token)
                self.down_reason = None
                self._up.set()
        self._recovery = None

    def _note_pin_refusal(self) -> None:
        # A separate method: mypy cannot see that _reconnect (another thread) sets it.
        if self._pin_refused is not None:
            self.down_reason = self._pin_refused
            log.error("%s", self._pin_refused)

    async def wait_until_up(self) -> None:
        """Return once the token answers (at once, unless the backend is down)."""
        await self._up.wait()

    # -- the HsmBackend interface ----------------------------------------------------------------

    def _label(self, label: str) -> str:
        return f"{self.settings.label_prefix}{label}"

    async def generate_kek(self, label: str) -> str:
        full_label = self._label(label)

        def generate(worker: _Worker) -> str:
            cka_id = secrets.token_bytes(16)
            template = _kek_template(full_label, cka_id)
            worker.session.generate_key(
                KeyType.AES,
                KEK_BITS,
                id=cka_id,
                label=full_label,
                store=True,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                template=template,
            )
            return HANDLE_PREFIX + cka_id.hex()

        handle = await self._call("generate-kek", generate, self._destroy_orphan)
        log.info("PKCS#11: generated KEK object %r (%s)", full_label, handle)
        return handle

    def _destroy_orphan(self, worker: _Worker, handle: str) -> None:
        """A KEK generated after its caller gave up: nobody will ever use it."""
        worker.key(_handle_id(handle)).destroy()
        log.warning("PKCS#11: destroyed KEK object %s, generated after its caller gave up", handle)

    async def import_kek(self, label: str, material: bytes) -> str:
        full_label = self._label(label)

        def create(worker: _Worker) -> str:
            cka_id = secrets.token_bytes(16)
            template = _kek_template(full_label, cka_id)
            template[Attribute.VALUE] = material
            worker.session.create_object(template)
            return HANDLE_PREFIX + cka_id.hex()

        return await self._call("import-kek", create, self._destroy_orphan)

    async def wrap(self, handle: str, key: bytes, associated_data: bytes) -> bytes:
        cka_id = _handle_id(handle)

        def encrypt(worker: _Worker) -> bytes:
            nonce = os.urandom(NONCE_SIZE)
            sealed = worker.key(cka_id).encrypt(
                key, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, associated_data)
            )
            return nonce + bytes(sealed)

        return await self._call("wrap", encrypt)

    async def unwrap(self, handle: str, wrapped: bytes, associated_data: bytes) -> bytes:
        cka_id = _handle_id(handle)
        if len(wrapped) < NONCE_SIZE + TAG_SIZE:
            raise HsmIntegrityError("wrapped key is too short to be valid")

        def decrypt(worker: _Worker) -> bytes:
            kek = worker.key(cka_id)
            try:
                plain = kek.decrypt(
                    wrapped[NONCE_SIZE:],
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(wrapped[:NONCE_SIZE], associated_data),
                )
            # A failed GCM tag is CKR_ENCRYPTED_DATA_INVALID per the standard; SoftHSM2
            # says CKR_GENERAL_ERROR. A gone key or session fails with other codes.
            except (p11.EncryptedDataInvalid, p11.GeneralError, p11.EncryptedDataLenRange):
                raise HsmIntegrityError(
                    "wrapped key failed authentication (wrong KEK or metadata, or tampered)"
                ) from None
            return bytes(plain)

        return await self._call("unwrap", decrypt)

    def unwrap_now(self, handle: str, wrapped: bytes, associated_data: bytes) -> bytes | None:
        """Never inline: a foreign call must not block the event loop."""
        return None

    async def destroy_kek(self, handle: str) -> None:
        cka_id = _handle_id(handle)

        def destroy(worker: _Worker) -> None:
            worker.key(cka_id).destroy()
            worker.keys.pop(cka_id, None)

        await self._call("destroy-kek", destroy)
        log.info("PKCS#11: destroyed KEK object %s", handle)

    # -- signing keys (the online CA's) -----------------------------------------------------

    async def generate_signing_key(self, label: str, curve: str) -> str:
        check_key_type(curve)
        full_label = self._label(label)
        rsa_bits = RSA_KEY_TYPES.get(curve)

        def generate(worker: _Worker) -> str:
            cka_id = secrets.token_bytes(16)
            public, private = _signing_templates(full_label, cka_id, curve)
            worker.session.generate_keypair(
                KeyType.EC if rsa_bits is None else KeyType.RSA,
                rsa_bits,
                store=True,
                mechanism=(
                    Mechanism.EC_KEY_PAIR_GEN
                    if rsa_bits is None
                    else Mechanism.RSA_PKCS_KEY_PAIR_GEN
                ),
                public_template=public,
                private_template=private,
            )
            return SIGNING_PREFIX + cka_id.hex()

        handle = await self._call("generate-signing-key", generate, self._destroy_orphan_signer)
        log.info("PKCS#11: generated signing key pair %r (%s)", full_label, handle)
        return handle

    async def import_signing_key(self, label: str, private_key_der: bytes) -> str:
        key = load_signing_key(private_key_der)
        curve = curve_of(key)
        full_label = self._label(label)
        # python-pkcs11 reads the traditional (SEC 1) encoding, not PKCS#8.
        sec1 = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

        def create(worker: _Worker) -> str:
            cka_id = secrets.token_bytes(16)
            public, private = _signing_templates(full_label, cka_id, curve)
            private.update(decode_ec_private_key(sec1))
            private[Attribute.CLASS] = ObjectClass.PRIVATE_KEY
            public.update(decode_ec_public_key(spki))
            public[Attribute.CLASS] = ObjectClass.PUBLIC_KEY
            worker.session.create_object(private)
            worker.session.create_object(public)
            return SIGNING_PREFIX + cka_id.hex()

        return await self._call("import-signing-key", create, self._destroy_orphan_signer)

    def _destroy_orphan_signer(self, worker: _Worker, handle: str) -> None:
        cka_id = _signing_id(handle)
        for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            worker.signing_key(object_class, cka_id).destroy()
        log.warning("PKCS#11: destroyed signing key %s, made after its caller gave up", handle)

    async def signing_public_key(self, handle: str) -> bytes:
        cka_id = _signing_id(handle)
        known = self._public_keys.get(handle)
        if known is not None:
            return known

        def read(worker: _Worker) -> bytes:
            public = worker.signing_key(ObjectClass.PUBLIC_KEY, cka_id)
            if public.key_type == KeyType.RSA:
                numbers = rsa.RSAPublicNumbers(
                    int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
                    int.from_bytes(public[Attribute.MODULUS], "big"),
                )
                return numbers.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            return bytes(encode_ec_public_key(public))

        spki = await self._call("signing-public-key", read)
        # Public, and a key pair's public half never changes: asked once per handle.
        self._public_keys[handle] = spki
        return spki

    async def sign_digest(self, handle: str, digest: bytes, algorithm: str) -> bytes:
        """The signature on the token: CKM_ECDSA, CKM_RSA_PKCS_PSS (MGF1 with the digest's
        hash, salt its length), or CKM_RSA_PKCS over DigestInfo || digest."""
        cka_id = _signing_id(handle)
        public = serialization.load_der_public_key(await self.signing_public_key(handle))
        assert isinstance(public, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey))
        hash_ = check_signature_request(key_type_of(public), algorithm, digest)
        scheme = SIGNATURE_ALGORITHMS[algorithm][1]
        name = hash_.name.upper()
        mechanism, value = Mechanism.ECDSA, digest
        param: tuple[Any, ...] | None = None
        if scheme == "pss":
            mechanism = Mechanism.RSA_PKCS_PSS
            param = (getattr(Mechanism, name), getattr(MGF, name), hash_.digest_size)
        elif scheme == "pkcs1":
            mechanism, value = Mechanism.RSA_PKCS, DIGEST_INFO_PREFIX[name] + digest

        def sign(worker: _Worker) -> bytes:
            key = worker.signing_key(ObjectClass.PRIVATE_KEY, cka_id)
            return bytes(key.sign(value, mechanism=mechanism, mechanism_param=param))

        signature = await self._call("sign-digest", sign)
        return bytes(encode_ecdsa_signature(signature)) if scheme == "ecdsa" else signature

    async def destroy_signing_key(self, handle: str) -> None:
        cka_id = _signing_id(handle)

        def destroy(worker: _Worker) -> None:
            for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                worker.signing_key(object_class, cka_id).destroy()
            worker.destroyed.add(cka_id)

        await self._call("destroy-signing-key", destroy)
        self._public_keys.pop(handle, None)
        log.info("PKCS#11: destroyed signing key pair %s", handle)

    async def sign(self, handle: str, data: bytes) -> bytes:
        """The digest is computed here, the ECDSA signature on the token (CKM_ECDSA)."""
        cka_id = _signing_id(handle)
        public = serialization.load_der_public_key(await self.signing_public_key(handle))
        assert isinstance(public, ec.EllipticCurvePublicKey)
        digest = hashes.Hash(SIGNING_CURVES[curve_of(public)][1]())
        digest.update(data)
        value = digest.finalize()

        def sign(worker: _Worker) -> bytes:
            key = worker.signing_key(ObjectClass.PRIVATE_KEY, cka_id)
            return bytes(key.sign(value, mechanism=Mechanism.ECDSA))

        return bytes(encode_ecdsa_signature(await self._call("sign", sign)))

    def _check(self, worker: _Worker) -> None:
        # Token info and one object search: both read the token's state, so a
        # token that hangs or has gone fails here (python-pkcs11 runs them without the GIL).
        self._token.slot.get_token()
        # Closed here, not by the garbage collector: that would end the search
        # (C_FindObjectsFinal) later, perhaps on a session closed meanwhile.
        with contextlib.closing(
            worker.session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})
        ) as objects:
            next(objects, None)

    async def check(self) -> None:
        """One token call at a time, bounded by hsm.timeout, whoever stops waiting.

        Single-flight: while a check is with the token, later checks (the watchdog,
        status, metrics) wait for that one instead of each taking another session.
        It runs on its own, so a check that hangs still marks the backend down after
        hsm.timeout even if its callers stopped waiting long before.
        """
        if self._pin_refused is not None:
            raise HsmUnavailableError(self._pin_refused)
        run = self._check_run
        if run is None:
            run = self._check_run = _CheckRun()
            trio.lowlevel.spawn_system_task(self._run_check, run)
        await run.done.wait()
        if run.problem is not None:
            raise HsmUnavailableError(run.problem)

    async def _run_check(self, run: _CheckRun) -> None:
        try:
            await self._call("check", self._check)
        except HsmError as exc:
            run.problem = str(exc)
        except Exception as exc:  # a system task must not raise: report it as the check's
            run.problem = f"check failed: {exc!r}"
        finally:
            self._check_run = None
            run.done.set()

    async def list_objects(self) -> list[dict[str, Any]]:
        """kmipd's KEK objects on the token (labels under hsm.label_prefix), never values."""
        prefix = self.settings.label_prefix

        def objects(worker: _Worker) -> list[dict[str, Any]]:
            found = []
            for obj in worker.session.get_objects(
                {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TOKEN: True}
            ):
                if not str(obj[Attribute.LABEL]).startswith(prefix):
                    continue
                entry: dict[str, Any] = {"handle": HANDLE_PREFIX + bytes(obj[Attribute.ID]).hex()}
                for name, attribute in LISTED_ATTRIBUTES.items():
                    try:
                        value = obj[attribute]
                    except p11.PKCS11Error:
                        value = None
                    entry[name] = value.hex() if isinstance(value, bytes) else value
                found.append(entry)
            return sorted(found, key=lambda e: str(e["label"]))

        return await self._call("list-objects", objects)

    async def count_objects(self) -> tuple[int, int]:
        """(token objects, session objects) this process can see on the token."""

        def count(worker: _Worker) -> tuple[int, int]:
            token = sum(1 for _ in worker.session.get_objects({Attribute.TOKEN: True}))
            session = sum(1 for _ in worker.session.get_objects({Attribute.TOKEN: False}))
            return token, session

        return await self._call("count-objects", count)

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    def close(self) -> None:
        """Stop the workers, close the sessions; finalise the library if it is idle."""
        if self._closed:
            return
        self._closed = True
        if self._recovery is not None:
            self._recovery.cancel()
        for _ in self._threads:
            self._queue.put(_STOP)
        deadline = time.monotonic() + 2.0  # for all: a thread stuck in a hung token stays
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        stuck = any(thread.is_alive() for thread in self._threads)
        if not stuck:
            with self._connect_lock:
                self._close_sessions(self._sessions)
                self._sessions = []
        # A thread still stuck in the library: finalising under it could crash the process.
        _release_library(self._library, finalize=not stuck)


def _deliver(batch: list[_Call[Any]]) -> None:
    for call in batch:
        call.done.set()
