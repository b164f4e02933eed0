"""Why a connection to the broker failed, in words school IT can act on.

paho-mqtt retries a failed connect in its network thread and swallows the exception, so a
command that gives up saw only "no connection". The transport keeps the last exception and
the last CONNACK refusal, and these functions turn each into its own message: TLS
verification (unknown CA, hostname mismatch, expired certificate), nothing listening,
unknown host, a port that is not a (TLS) MQTT listener, and bad credentials or no
authorisation. A few of them cannot heal by retrying (a wrong CA stays wrong): `is_permanent`
lets `MqttTransport.start` give up at once instead of waiting out its deadline.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

# OpenSSL X509_V_ERR_* codes that ssl.SSLCertVerificationError carries in verify_code.
_UNKNOWN_CA_CODES = {2, 7, 18, 19, 20, 21}
"""Issuer not found, or (7) a trusted CA of the same name did not sign it: another CA."""
_EXPIRED_CODE = 10
_NOT_YET_VALID_CODE = 9
_HOSTNAME_MISMATCH_CODE = 62


@dataclass(frozen=True)
class ConnectFailure:
    """One diagnosed failure: the message to show and whether a retry could cure it."""

    message: str
    permanent: bool


def _endpoint(host: str, port: int) -> str:
    return f"{host}:{port}"


def _tls_verification(error: ssl.SSLCertVerificationError, host: str) -> str:
    code = getattr(error, "verify_code", None)
    detail = getattr(error, "verify_message", None) or str(error)
    if code in _UNKNOWN_CA_CODES:
        cause = (
            "unknown CA: the broker's certificate is not signed by a CA this device trusts; "
            "point [broker] ca_file at the CA that signed it (schoolfl agent init --ca-file)"
        )
    elif code == _HOSTNAME_MISMATCH_CODE:
        cause = (
            f"hostname mismatch: the broker's certificate is not issued for {host!r}; use the "
            "name the certificate was issued for in the broker URL"
        )
    elif code == _EXPIRED_CODE:
        cause = "the broker's certificate has expired (or this device's clock is wrong)"
    elif code == _NOT_YET_VALID_CODE:
        cause = "the broker's certificate is not valid yet (check this device's clock)"
    else:
        cause = "the broker's certificate was rejected"
    return f"TLS verification failed: {cause} ({detail})"


def describe_socket_error(
    error: BaseException, host: str, port: int, tls: bool, timeout_seconds: float
) -> ConnectFailure:
    """The cause of an exception raised while opening the socket (and TLS handshake)."""
    where = _endpoint(host, port)
    if isinstance(error, ssl.SSLCertVerificationError):
        return ConnectFailure(f"cannot connect to {where}: {_tls_verification(error, host)}", True)
    if isinstance(error, (ssl.SSLError, ssl.SSLEOFError)) or (
        tls and isinstance(error, (ConnectionResetError, BrokenPipeError))
    ):
        return ConnectFailure(
            f"cannot connect to {where}: the TLS handshake failed ({error}); the port does not "
            "speak TLS: a plaintext MQTT port (usually 1883) needs mqtt://, a TLS port "
            "(usually 8883) mqtts://",
            True,
        )
    if isinstance(error, socket.gaierror):
        return ConnectFailure(
            f"cannot connect to {where}: unknown host {host!r} (DNS cannot resolve it: "
            f"{error.strerror or error}); check the broker URL",
            True,
        )
    if isinstance(error, ConnectionRefusedError):
        return ConnectFailure(
            f"cannot connect to {where}: connection refused, nothing is listening on port "
            f"{port} (is the broker running, and is the port right?)",
            False,
        )
    if isinstance(error, (TimeoutError, socket.timeout)):
        return ConnectFailure(
            f"cannot connect to {where}: no answer within {timeout_seconds:.0f} s (a firewall "
            "dropping packets, the wrong port, or a server that is not an MQTT broker)",
            False,
        )
    return ConnectFailure(f"cannot connect to {where}: {error}", False)


def describe_closed_before_connack(host: str, port: int, tls: bool) -> ConnectFailure:
    """The socket opened but the server hung up without answering MQTT CONNECT."""
    hint = (
        "it is not an MQTT broker"
        if tls
        else "it is a TLS listener (use mqtts://) or not an MQTT broker"
    )
    return ConnectFailure(
        f"cannot connect to {_endpoint(host, port)}: the server closed the connection without "
        f"answering MQTT CONNECT; wrong port: {hint}",
        True,
    )


def describe_no_connack(host: str, port: int, timeout_seconds: float) -> ConnectFailure:
    return ConnectFailure(
        f"cannot connect to {_endpoint(host, port)}: the port accepted the connection but no "
        f"MQTT answer came within {timeout_seconds:.0f} s (wrong port, or not an MQTT broker)",
        False,
    )


def describe_refusal(reason: str, host: str, port: int, client_id: str) -> ConnectFailure:
    """A CONNACK with a failure reason code (paho's ReasonCode as text)."""
    lowered = reason.lower()
    if "user name or password" in lowered or "bad authentication" in lowered:
        cause = "bad credentials: check [broker] username and the password in password_file"
    elif "not authori" in lowered:
        # Mosquitto answers a wrong password with this code too (MQTT 3.1.1 code 5).
        cause = (
            "not authorised: a wrong username or password, or a user the broker does not let "
            "connect; check [broker] username, password_file and the broker's password file"
        )
    elif "identifier" in lowered:
        cause = "the broker rejected the client id"
    else:
        cause = "check username, password and ACL"
    return ConnectFailure(
        f"broker {_endpoint(host, port)} refused {client_id}: {reason} ({cause})", True
    )
