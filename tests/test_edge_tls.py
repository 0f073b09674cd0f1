"""The DICOM receiver (``imaging-tasks receive --tls-cert/--tls-key [--tls-ca]``) over real TLS on 127.0.0.1.

A throw-away PKI is drawn with ``cryptography`` (a CA, a server certificate for 127.0.0.1/localhost, a client
certificate, and a second CA with its own client certificate); the receiver runs as deployed, a subprocess of the
CLI (tests/test_edge_receiver.py's ``_start_cli``); pynetdicom sends with ``tls_args``.  Covered: a study sent
over TLS lands byte-identical; a client that does not trust the CA, a plain-TCP association and a TCP connection
that never starts the handshake get nothing stored and hold up nobody; mutual TLS admits the CA's client
certificate only; a missing or mismatched certificate/key stops the CLI at once with a message naming the option.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from test_edge_receiver import HOST, REPO, _body, _free_port, _landed, _start_cli, _uid_hash, _wait

TIMEOUT_S = 10  # pynetdicom's ACSE/DIMSE/network/connection timeouts here: a refusal is seen in well under that


# ---------------------------------------------------------------------------------------------- a throw-away PKI
def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer=None, *, ca: bool = False, usage=None, names=()):
    """A certificate of ``key``'s public key, signed by ``issuer`` = (certificate, key), or self-signed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    issuer_cert, issuer_key = issuer or (None, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject))
               .issuer_name(issuer_cert.subject if issuer_cert is not None else _name(subject))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                              critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """PEM files: ``ca``; ``server``/``server_key`` (127.0.0.1, localhost); ``client``/``client_key`` (the CA's);
    ``stranger``/``stranger_key`` (a client certificate of another CA, ``other_ca``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    folder = tmp_path_factory.mktemp("pki")
    out: dict[str, Path] = {}

    def save(stem: str, cert, key=None) -> None:
        out[stem] = folder / f"{stem}.pem"
        out[stem].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            out[f"{stem}_key"] = folder / f"{stem}.key"
            out[f"{stem}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))

    def new_key():
        return ec.generate_private_key(ec.SECP256R1())

    ca_key, other_key = new_key(), new_key()
    ca = _certificate("imaging edge test CA", ca_key, ca=True)
    other = _certificate("another test CA", other_key, ca=True)
    save("ca", ca)
    save("other_ca", other)
    key = new_key()
    save("server", _certificate("localhost", key, (ca, ca_key), usage=ExtendedKeyUsageOID.SERVER_AUTH,
                                names=(x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost"))), key)
    key = new_key()
    save("client", _certificate("MODALITY", key, (ca, ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH), key)
    key = new_key()
    save("stranger", _certificate("MODALITY", key, (other, other_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH), key)
    return out


def _client_context(pki, *, trust: bool = True, cert: str | None = None) -> ssl.SSLContext:
    """A client's context: trusting the test CA (or only the system CAs), presenting ``cert`` (or nothing)."""
    ctx = ssl.create_default_context(cafile=str(pki["ca"])) if trust else ssl.create_default_context()
    if cert:
        ctx.load_cert_chain(pki[cert], pki[f"{cert}_key"])
    return ctx


# ---------------------------------------------------------------------------------------------- study, receivers
@pytest.fixture(autouse=True)
def _send_raw_datasets(monkeypatch):
    """Send each file's data set bytes as stored (no decode/re-encode), so byte identity is testable."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> list[Path]:
    """A small synthetic CT study (the built-in routes send it to cardiovascular)."""
    from imaging_tasks import specialties

    out = tmp_path_factory.mktemp("synth")
    specialties.synthesizer("cardiovascular")(out, 1, 21, rows=64, slices=6)
    files = sorted((out / "cardiovascular").rglob("*.dcm"))
    assert len(files) >= 5
    return files


class _CLI:
    """An ``imaging-tasks receive`` process (stopped with SIGTERM at the end) in its own folder."""

    def __init__(self, folder: Path, *tls: str):
        self.folder, self.port = folder, _free_port()
        self.landing = folder / "landing"
        self.process = _start_cli(folder, self.port, *tls)

    def log(self) -> str:
        return (self.folder / f"receiver-{self.port}.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                assert self.process.wait(timeout=20) == 0, self.log()
            finally:
                if self.process.poll() is None:
                    self.process.kill()


@pytest.fixture(scope="module")
def tls_receiver(pki, tmp_path_factory):
    cli = _CLI(tmp_path_factory.mktemp("tls"), "--tls-cert", str(pki["server"]), "--tls-key", str(pki["server_key"]))
    yield cli
    cli.stop()


@pytest.fixture(scope="module")
def mtls_receiver(pki, tmp_path_factory):
    cli = _CLI(tmp_path_factory.mktemp("mtls"), "--tls-cert", str(pki["server"]), "--tls-key",
               str(pki["server_key"]), "--tls-ca", str(pki["ca"]))
    yield cli
    cli.stop()


def _associate(port: int, files, context: ssl.SSLContext | None, hostname: str = HOST):
    """A pynetdicom association (TLS with ``context``; plain TCP with None) offering the files' contexts."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = TIMEOUT_S
    for sop_class, syntax in sorted({(str(m.file_meta.MediaStorageSOPClassUID), str(m.file_meta.TransferSyntaxUID))
                                     for m in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}):
        ae.add_requested_context(sop_class, syntax)
    ae.add_requested_context(Verification)
    return ae.associate(HOST, port, ae_title="IMAGING", tls_args=(context, hostname) if context else None)


def _store_all(port: int, files, context: ssl.SSLContext, hostname: str = HOST) -> list[int | None]:
    assoc = _associate(port, files, context, hostname)
    assert assoc.is_established, "TLS association not established"
    try:
        assert assoc.send_c_echo().Status == 0
        return [int(s.Status) if "Status" in s else None for s in (assoc.send_c_store(Path(f)) for f in files)]
    finally:
        assoc.release()


def _refused(port: int, files, context: ssl.SSLContext | None) -> bool:
    """True if no association is established (so no C-STORE can be sent), within the timeouts."""
    started = time.monotonic()
    assoc = _associate(port, files[:1], context)
    if assoc.is_established:
        assoc.release()
        return False
    assert time.monotonic() - started < TIMEOUT_S + 5
    return True


def _assert_landed_byte_identical(landing: Path, files) -> None:
    _wait(lambda: len(_landed(landing)) == len(files), f"{len(files)} instance(s) in {landing}", timeout=30)
    landed = _landed(landing)
    by_sop = {_uid_hash(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    assert sorted(key.rsplit("/", 1)[1][:-4] for key in landed) == sorted(by_sop)
    for key, blob in landed.items():
        assert key.startswith("cardiovascular/")
        assert _body(blob) == _body(by_sop[key.rsplit("/", 1)[1][:-4]].read_bytes())


# ---------------------------------------------------------------------------------------------- TLS
def test_a_study_sent_over_tls_lands_byte_identical(tls_receiver, pki, study):
    assert "with TLS" in tls_receiver.log()
    half = len(study) // 2
    assert _store_all(tls_receiver.port, study[:half], _client_context(pki)) == [0] * half
    # the certificate names localhost too (a client that checks the DNS name), and resends are idempotent
    assert _store_all(tls_receiver.port, study, _client_context(pki), "localhost") == [0] * len(study)
    _assert_landed_byte_identical(tls_receiver.landing, study)


def test_untrusting_clients_plain_tcp_and_stalled_handshakes_get_nothing_stored(tls_receiver, pki, study):
    # a client that trusts only the system CAs: its own handshake fails on the server's certificate
    with socket.create_connection((HOST, tls_receiver.port), timeout=TIMEOUT_S) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ssl.create_default_context().wrap_socket(raw, server_hostname=HOST)
    assert _refused(tls_receiver.port, study, _client_context(pki, trust=False))
    # the name must match: a certificate for 127.0.0.1/localhost is not good for another name
    with socket.create_connection((HOST, tls_receiver.port), timeout=TIMEOUT_S) as raw:
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            _client_context(pki).wrap_socket(raw, server_hostname="pacs.example.org")

    # plain DICOM over TCP to the TLS port: no association, so no C-STORE
    assert _refused(tls_receiver.port, study, None)

    # a TCP connection that never says a word (a port scanner, a stalled client) holds up no other sender
    with socket.create_connection((HOST, tls_receiver.port), timeout=TIMEOUT_S):
        time.sleep(0.3)
        started = time.monotonic()
        assert _store_all(tls_receiver.port, study[:1], _client_context(pki)) == [0]
        assert time.monotonic() - started < 5

    assert tls_receiver.process.poll() is None, tls_receiver.log()


# ---------------------------------------------------------------------------------------------- mutual TLS
def test_mutual_tls_admits_only_client_certificates_the_ca_signed(mtls_receiver, pki, study):
    assert "with TLS" in mtls_receiver.log()
    assert _refused(mtls_receiver.port, study, _client_context(pki))  # no client certificate
    assert _refused(mtls_receiver.port, study, _client_context(pki, cert="stranger"))  # another CA's
    assert _refused(mtls_receiver.port, study, None)  # plain TCP
    time.sleep(1.0)
    assert not _landed(mtls_receiver.landing)

    assert _store_all(mtls_receiver.port, study, _client_context(pki, cert="client")) == [0] * len(study)
    _assert_landed_byte_identical(mtls_receiver.landing, study)
    assert mtls_receiver.process.poll() is None, mtls_receiver.log()


# ---------------------------------------------------------------------------------------------- bad TLS files
def test_missing_or_mismatched_tls_files_stop_the_cli_at_once_naming_the_option(pki, tmp_path):
    port = _free_port()

    def receive(*tls: str) -> tuple[int, str]:
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "imaging_tasks.cli", "receive", "--landing", "landing", "--spool", "spool",
             "--host", HOST, "--port", str(port), *tls],
            cwd=tmp_path, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert time.monotonic() - started < 30
        out = done.stdout + done.stderr
        assert "Traceback" not in out and "listening on" not in out, out
        return done.returncode, done.stderr

    missing = str(tmp_path / "missing.pem")
    cert, key = str(pki["server"]), str(pki["server_key"])
    for args, option in (((missing, key, None), "--tls-cert"), ((cert, missing, None), "--tls-key"),
                         ((cert, key, missing), "--tls-ca")):
        tls = ["--tls-cert", args[0], "--tls-key", args[1], *(["--tls-ca", args[2]] if args[2] else [])]
        code, err = receive(*tls)
        assert code == 2 and f"{option} {missing} is not a readable file" in err, err

    code, err = receive("--tls-cert", cert, "--tls-key", str(pki["client_key"]))  # another certificate's key
    assert code == 2 and "KEY_VALUES_MISMATCH" in err and "--tls-key its private key" in err, err
    code, err = receive("--tls-cert", cert)
    assert code == 2 and "--tls-cert and --tls-key go together" in err, err


def test_tls_files_the_receiver_may_not_read_are_a_config_error(pki, monkeypatch):
    """A key only root may read (this test runs as root, so the refusal is simulated where the file is opened)."""
    from imaging_tasks.edge.scp import TLSFiles
    from imaging_tasks.errors import ConfigError

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    files = TLSFiles(str(pki["server"]), str(pki["server_key"]), str(pki["ca"]))
    assert files.context().verify_mode == ssl.CERT_REQUIRED  # with a CA: mutual TLS
    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", denied)
    with pytest.raises(ConfigError, match=r"cannot be read \(Permission denied\).*--tls-key"):
        files.context()
