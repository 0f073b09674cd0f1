"""The DICOM Storage SCP behind ``imaging-tasks receive``: accepts associations, answers C-ECHO and C-STORE, and
wires the spool, the uploader and the completion tracker together.

What a C-STORE is answered (PS3.4 B.2.3, PS3.7 C):

==========  ===========================================================================================
``0x0000``  stored: in the spool on disk (plain mode), or de-identified and in the spool (edge mode), or, in
            edge mode, refused by the de-identifier and held in the local quarantine (see below)
``0xC001``  "cannot understand": no routing rule matches (Modality / SOP class / calling AE); a permanent
            refusal - resending will not help until the routes change
``0xC210``  "cannot understand": the data set does not decode
``0xA900``  "data set does not match SOP class": it lacks its Study/Series/SOP Instance UID (plain mode)
``0xA700``  "out of resources": the spool (or the local quarantine) cannot be written, e.g. a full disk;
            the sender keeps the instance and retries later
==========  ===========================================================================================

Edge mode (``deidentify=True``): each instance is de-identified on receipt with the specialty's PS3.15 options
(the DAG's choice for that specialty), checked by the PHI audit against the raw instance's identifying values,
and only the result is spooled, under its pseudonymous UIDs.  An instance the de-identifier refuses (burned-in
annotation, missing required content, a garbled file...) or the audit catches goes, raw, to a *local* quarantine
with its reason, and the C-STORE is still answered success: the instance is safely held where a person can look
at it, and a failure status would only make the sender retry the same bytes forever (or give up and keep them
where nobody looks).  Raw bytes never leave the site in edge mode.

Association control: ``allow_ae`` (exact calling AE titles; others rejected "calling AE title not recognised"
by pynetdicom's ``require_calling_aet``), ``allow_hosts`` (IP networks; others rejected "no reason given"
before negotiation), TLS (``tls``; with a CA, clients must present a certificate it signed).

Log lines name AE titles, hosts, specialties, SOP classes, counts, reasons and hash prefixes, never a patient's
name, an ID or a UID.
"""
from __future__ import annotations

import collections
import hashlib
import ipaddress
import logging
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imaging_tasks import storage
from imaging_tasks.errors import BadInput, ConfigError

from .completion import AirflowTarget, AssetEvents, Completion
from .routing import RoutingTable, default_table
from .spool import Entry, Spool, entry_name, fsync_path, uid_hash
from .uploader import Uploader

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_NO_ROUTE = 0xC001
STATUS_UNDECODABLE = 0xC210
STATUS_INCOMPLETE = 0xA900
STATUS_OUT_OF_RESOURCES = 0xA700


def _storage_sop_classes() -> list[str]:
    """pynetdicom's storage SOP classes, plus those the specialties need named explicitly (so they stay accepted
    whatever pynetdicom's list holds)."""
    from pynetdicom import StoragePresentationContexts
    from pynetdicom import sop_class as sc

    needed = [sc.CTImageStorage, sc.EnhancedCTImageStorage, sc.MRImageStorage, sc.EnhancedMRImageStorage,
              sc.PositronEmissionTomographyImageStorage, sc.EnhancedPETImageStorage, sc.SecondaryCaptureImageStorage,
              sc.DigitalMammographyXRayImageStorageForPresentation, sc.DigitalMammographyXRayImageStorageForProcessing,
              sc.BreastTomosynthesisImageStorage, sc.VLWholeSlideMicroscopyImageStorage]
    return list(dict.fromkeys([*needed, *(cx.abstract_syntax for cx in StoragePresentationContexts)]))


def _transfer_syntaxes() -> list[str]:
    from pydicom import uid

    return [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian,
            uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1, uid.JPEGLSLossless,
            uid.JPEGLSNearLossless, uid.JPEG2000Lossless, uid.JPEG2000, uid.RLELossless]


class _ServerContext(ssl.SSLContext):
    """The receiver's TLS context.  pynetdicom wraps each accepted socket in its accept loop, where by default the
    handshake runs: a single connection that never completes it (a port scanner, a stalled client, a plain-TCP
    sender that opens and waits) would stop every other association from being accepted.  Here the handshake is
    left to the association's own thread (OpenSSL does it on the first read, once the client has sent something;
    one that sends nothing is dropped by the ACSE timer), each read or write bounded by ``io_timeout_s``; a failed
    handshake closes that connection only."""

    io_timeout_s = 60.0

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, *args, **kwargs):
        if server_side:
            sock.settimeout(self.io_timeout_s)
            do_handshake_on_connect = False
        return super().wrap_socket(sock, server_side, do_handshake_on_connect, *args, **kwargs)


@dataclass(frozen=True)
class TLSFiles:
    cert: str
    key: str
    ca: str | None = None

    def context(self) -> ssl.SSLContext:
        for name, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-ca", self.ca)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{name} {path} is not a readable file")
        ctx = _ServerContext(ssl.PROTOCOL_TLS_SERVER)  # what create_default_context(Purpose.CLIENT_AUTH) makes
        try:
            ctx.load_cert_chain(self.cert, self.key)
            if self.ca:
                ctx.load_verify_locations(cafile=self.ca)
                ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: only clients with a certificate the CA signed
        except ssl.SSLError as exc:
            raise ConfigError(f"the TLS files do not load ({exc.reason or exc}): --tls-cert must be a PEM certificate "
                              "(chain), --tls-key its private key, --tls-ca a PEM CA bundle") from None
        except OSError as exc:  # e.g. a key only root may read
            raise ConfigError(f"the TLS files cannot be read ({exc.strerror or exc}): check that the user the "
                              "receiver runs as may read --tls-cert, --tls-key and --tls-ca") from None
        return ctx


@dataclass
class ReceiverSettings:
    landing: Any  # URI, path or UPath of the landing bucket/folder
    spool: str | Path
    ae_title: str = "IMAGING"
    host: str = "0.0.0.0"
    port: int = 11112
    allow_ae: tuple[str, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    tls: TLSFiles | None = None
    routes: RoutingTable | None = None  # None: the built-in table
    deidentify: bool = False
    key: bytes | None = None  # the de-identification key (edge mode)
    demo: bool = False
    quarantine: str | Path | None = None  # edge mode; default <spool>/quarantine; must be local
    quiet_seconds: float = 30.0
    airflow: AirflowTarget | None = None
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    shutdown_grace_s: float = 5.0  # open associations get this long to finish on stop
    drain_s: float = 5.0  # the uploader keeps going this long on stop


class Receiver:
    """``start()`` / ``stop()`` (or a ``with`` block).  :attr:`port` is the port listened on (``port=0``: a free
    one)."""

    def __init__(self, settings: ReceiverSettings):
        self.settings = s = settings
        if s.deidentify and not s.key:
            raise ConfigError("edge mode (--deidentify) needs the de-identification key: set IMAGING_DEID_KEY "
                              "(or IMAGING_DEID_DEMO=1 / --demo-key for synthetic data)")
        self.routes = s.routes or default_table()
        self.networks = tuple(_network(text) for text in s.allow_hosts)
        self.spool = Spool(s.spool)
        self.landing = storage.as_path(s.landing)
        self.quarantine_root = None
        if s.deidentify:
            q = storage.as_path(s.quarantine if s.quarantine is not None else self.spool.root / "quarantine")
            if not storage.is_local(q):
                raise ConfigError(f"--quarantine {storage.where(q)}... is not a local folder: in edge mode refused "
                                  "instances are raw, and raw bytes must not leave the site; give a local path")
            self.quarantine_root = q
        events = AssetEvents(s.airflow, initial_backoff_s=s.initial_backoff_s, max_backoff_s=s.max_backoff_s) \
            if s.airflow is not None else None
        self.completion = Completion(self.spool.state, self.landing, quiet_s=s.quiet_seconds, receiver_ae=s.ae_title,
                                     events=events, initial_backoff_s=s.initial_backoff_s,
                                     max_backoff_s=s.max_backoff_s)
        self.uploader = Uploader(self.spool, self.landing, before_remove=self.completion.uploaded,
                                 initial_backoff_s=s.initial_backoff_s, max_backoff_s=s.max_backoff_s)
        self.stats: collections.Counter = collections.Counter()
        self._stats_lock = threading.Lock()
        self._deid_options: dict[str, Any] = {}
        self.ae = self._application_entity()
        self.server = None

    # ------------------------------------------------------------------ set-up
    def _application_entity(self):
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        try:
            ae = AE(ae_title=self.settings.ae_title)
            if self.settings.allow_ae:
                ae.require_calling_aet = list(self.settings.allow_ae)
        except ValueError as exc:
            raise ConfigError(f"invalid AE title ({exc}); AE titles are 1-16 characters without backslashes or "
                              "control characters") from None
        ae.add_supported_context(Verification)
        syntaxes = _transfer_syntaxes()
        for uid in _storage_sop_classes():
            ae.add_supported_context(uid, syntaxes)
        return ae

    def start(self) -> "Receiver":
        from pynetdicom import evt

        s = self.settings
        recovered = self.spool.open()
        try:
            restored = self.completion.load(self.spool.pending())
            self._probe_landing()
            ctx = s.tls.context() if s.tls else None
            handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_CONN_CLOSE, self._on_close),
                        (evt.EVT_REQUESTED, self._on_requested), (evt.EVT_REJECTED, self._on_rejected)]
            try:
                self.server = self.ae.start_server((s.host, s.port), block=False, evt_handlers=handlers,
                                                   ssl_context=ctx)
            except OSError as exc:
                raise ConfigError(f"cannot listen on {s.host}:{s.port} ({exc.strerror or exc}): another program "
                                  "uses the port, or the address is not this host's; choose --port/--host") from None
        except BaseException:
            self.spool.close()
            raise
        self.uploader.start()
        self.completion.start()
        log.info("receiver AE %s listening on %s:%d%s (%s mode); landing %s; spool %s: %d instance(s) to upload, "
                 "%d unacknowledged dropped; %d open stud(ies), %d unposted event(s); routes: %s", s.ae_title, s.host,
                 self.port, " with TLS" if ctx else "", "edge (de-identifying)" if s.deidentify else "plain",
                 storage.where(self.landing), self.spool.root, recovered["pending"], recovered["unacknowledged"],
                 restored["studies_open"], restored["events_unposted"], self.routes.source)
        return self

    def _probe_landing(self) -> None:
        """Fail at start on a landing bucket that does not exist (a typo); an unreachable one is not an error:
        instances are held in the spool until it is back."""
        try:
            storage.list_objects(storage.join(self.landing, "_receiver-probe"))
        except ConfigError as exc:
            raise ConfigError(f"--landing: {exc}") from None
        except PermissionError:
            raise ConfigError(f"--landing {storage.where(self.landing)}: access denied; check the credentials "
                              "the receiver runs with (they need to list and write)") from None
        except Exception as exc:  # noqa: BLE001 - unreachable now: the spool holds instances until it is back
            log.warning("landing %s is not reachable at start (%s); receiving anyway, instances are held in the "
                        "spool until it is", storage.where(self.landing), type(exc).__name__)

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server is not None else self.settings.port

    def stop(self) -> None:
        """Stop accepting, give open associations ``shutdown_grace_s`` to finish (then abort them: what they had
        not been told was stored, the sender still has), let the uploader drain for ``drain_s``, stop."""
        if self.server is None:
            return
        server, self.server = self.server, None
        active = server.active_associations
        server.shutdown()
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while any(a.is_alive() for a in active) and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in active:
            if assoc.is_alive():
                assoc.abort()
        self.uploader.stop(drain_s=self.settings.drain_s)
        self.completion.stop()
        self.spool.close()
        log.info("receiver AE %s stopped: %s; %d instance(s) left in the spool for the next start",
                 self.settings.ae_title, self.summary(), self.spool.count())

    def __enter__(self) -> "Receiver":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def summary(self) -> str:
        with self._stats_lock:
            counts = dict(self.stats)
        counts["uploaded"] = self.uploader.uploaded
        counts["studies_completed"] = self.completion.completed
        return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing received"

    def _count(self, what: str) -> None:
        with self._stats_lock:
            self.stats[what] += 1

    # ------------------------------------------------------------------ association control
    def _on_requested(self, event) -> None:
        if not self.networks:
            return
        address = event.assoc.requestor.address
        if _host_allowed(address, self.networks):
            return
        calling = _text(getattr(event.assoc.requestor.primitive, "calling_ae_title", ""))
        log.warning("association from host %s (calling AE %s) rejected: the host is not in --allow-host", address,
                    calling)
        self._count("associations_rejected")
        event.assoc.acse.send_reject(0x01, 0x01, 0x01)  # rejected (permanent), by the service user, no reason given
        event.assoc.kill()

    def _on_rejected(self, event) -> None:
        primitive = event.assoc.requestor.primitive
        if getattr(self.ae, "require_calling_aet", None) and primitive is not None and \
                _text(primitive.calling_ae_title) not in self.settings.allow_ae:
            log.warning("association from host %s rejected: calling AE %s is not in --allow-ae",
                        event.assoc.requestor.address, _text(primitive.calling_ae_title))
            self._count("associations_rejected")

    def _on_close(self, event) -> None:
        self.completion.association_closed(id(event.assoc))

    # ------------------------------------------------------------------ C-STORE
    def _on_store(self, event) -> int:
        calling_ae = _text(event.assoc.requestor.ae_title)
        sop_class = str(event.request.AffectedSOPClassUID or "")
        try:
            data = event.encoded_dataset()
            ds = event.dataset
            modality = str(ds.get("Modality", "") or "")
            uids = (str(ds.get("StudyInstanceUID", "") or ""), str(ds.get("SeriesInstanceUID", "") or ""),
                    str(event.request.AffectedSOPInstanceUID or ds.get("SOPInstanceUID", "") or ""))
        except Exception as exc:  # noqa: BLE001 - whatever pydicom raises on a garbled data set
            log.warning("refused an instance of SOP class %s from AE %s: its data set does not decode (%s)",
                        sop_class, calling_ae, type(exc).__name__)
            self._count("refused_undecodable")
            return STATUS_UNDECODABLE
        specialty = self.routes.route(modality, sop_class, calling_ae)
        if specialty is None:
            log.warning("refused an instance of SOP class %s (modality %s) from AE %s: no routing rule matches (%s); "
                        "add a rule with --routes if this specialty should take it", sop_class, modality or "none",
                        calling_ae, self.routes.source)
            self._count("refused_no_route")
            return STATUS_NO_ROUTE
        if self.settings.deidentify:
            return self._store_deidentified(data, specialty, calling_ae, id(event.assoc))
        if not all(uids):
            log.warning("refused a %s instance of SOP class %s from AE %s: it lacks its Study, Series or SOP "
                        "Instance UID", specialty, sop_class, calling_ae)
            self._count("refused_incomplete")
            return STATUS_INCOMPLETE
        study, series, sop = uids
        sha = hashlib.sha256(data).hexdigest()
        entry = Entry(name=entry_name(sop, sha), specialty=specialty, study_folder=uid_hash(study),
                      series_folder=uid_hash(series), object_name=f"{uid_hash(sop)}.dcm", received_at=time.time(),
                      calling_ae=calling_ae, sha256=sha, size=len(data))
        return self._spool_entry(entry, data, id(event.assoc))

    def _spool_entry(self, entry: Entry, data: bytes, association: int) -> int:
        try:
            self.spool.put(entry, data, on_stored=lambda e: self.completion.received(e, association))
        except OSError as exc:
            log.error("could not store a %s instance from AE %s in the spool %s (%s); answered 'out of resources' "
                      "so the sender retries: free disk space or fix the spool's permissions", entry.specialty,
                      entry.calling_ae, self.spool.root, exc.strerror or type(exc).__name__)
            self._count("refused_spool_full")
            return STATUS_OUT_OF_RESOURCES
        self.uploader.wake()
        self._count("stored")
        log.debug("stored a %s instance from AE %s as spool entry %s (%d bytes)", entry.specialty, entry.calling_ae,
                  entry.name[:12], entry.size)
        return STATUS_SUCCESS

    def _options(self, specialty: str):
        if specialty not in self._deid_options:
            from imaging_tasks import specialties
            from imaging_tasks.deid.dicom import DeidOptions

            self._deid_options[specialty] = DeidOptions(**specialties.get(specialty).options_for({}, "deidentify"))
        return self._deid_options[specialty]

    def _store_deidentified(self, data: bytes, specialty: str, calling_ae: str, association: int) -> int:
        from imaging_tasks.deid.dicom import deidentify_bytes, reading_source
        from imaging_tasks.phi_audit import IdentifyingValues, PHILeak, assert_no_leaks, retained_by

        options = self._options(specialty)
        reader = IdentifyingValues(retained_by(options))
        try:
            with reading_source(reader.source):
                out, info = deidentify_bytes(data, self.settings.key, options, demo=self.settings.demo)
            assert_no_leaks(reader.values, out, f"{specialty} instance from AE {calling_ae}")
        except BadInput as exc:
            return self._quarantine(data, specialty, exc.reason, str(exc), calling_ae)
        except PHILeak as exc:
            return self._quarantine(data, specialty, "phi_leak", str(exc), calling_ae)
        sha = hashlib.sha256(out).hexdigest()
        entry = Entry(name=entry_name(info["sop_uid"], sha), specialty=specialty, study_folder=info["study_uid"],
                      series_folder=info["series_uid"], object_name=f"{info['sop_uid']}.dcm", received_at=time.time(),
                      calling_ae=calling_ae, sha256=sha, size=len(out), deidentified=True)
        return self._spool_entry(entry, out, association)

    def _quarantine(self, data: bytes, specialty: str, reason: str, message: str, calling_ae: str) -> int:
        try:
            row = storage.quarantine(data, self.quarantine_root, specialty=specialty, reason=reason, message=message,
                                     stage="edge_deidentify", source_uri=f"dicom://{calling_ae}", suffix=".dcm")
            _fsync_tree(Path(storage.as_path(row["quarantine_uri"]).path))
        except OSError as exc:
            log.error("could not hold a refused %s instance from AE %s in the local quarantine (%s); answered 'out "
                      "of resources' so the sender keeps it", specialty, calling_ae, exc.strerror or type(exc).__name__)
            self._count("refused_quarantine_full")
            return STATUS_OUT_OF_RESOURCES
        log.warning("a %s instance from AE %s was refused by the de-identifier (%s) and is held in the local "
                    "quarantine (sha256 %s); answered success: nothing of it left the site", specialty, calling_ae,
                    reason, row["input_sha256"][:16])
        self._count("quarantined")
        return STATUS_SUCCESS


# ---------------------------------------------------------------------------------------------- helpers
def _text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip()


def _network(text: str):
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ConfigError(f"--allow-host {text!r} is not an IP address or network (e.g. 10.1.2.3 or "
                          "10.1.0.0/16)") from None


def _host_allowed(address: str, networks) -> bool:
    try:
        ip = ipaddress.ip_address(str(address).split("%", 1)[0])
    except ValueError:
        return False
    if getattr(ip, "ipv4_mapped", None) is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


def _fsync_tree(folder: Path) -> None:
    """Make a quarantine folder durable before the instance is acknowledged (storage writes do not fsync)."""
    for path in [p for p in folder.iterdir() if p.is_file()] + [folder, folder.parent]:
        fsync_path(path)
