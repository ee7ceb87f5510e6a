"""TLS for the node's port: the server context built from `[node] tls_cert`, `tls_key`, `tls_client_ca`.

A context is built whole from the files each time (at start and on SIGHUP), so a
reload takes a renewed certificate, a new key and a changed client CA alike, and a
bad file leaves the running context in place.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from node.errors import OperationFailed


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """A TLS 1.2+ server context; with client_ca, clients must present a certificate it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise OperationFailed(f"[node] tls_cert/tls_key: no such file {exc.filename}; "
                              "run `infernode tls selfsigned` or point them at your PEM files") from None
    except (ssl.SSLError, OSError) as exc:
        raise OperationFailed(f"[node] tls_cert/tls_key: cannot load {cert} and {key} ({exc}); "
                              "they must be a PEM certificate chain and its unencrypted PEM key") from None
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(client_ca))
        except FileNotFoundError:
            raise OperationFailed(f"[node] tls_client_ca: no such file {client_ca}") from None
        except (ssl.SSLError, OSError) as exc:
            raise OperationFailed(f"[node] tls_client_ca: cannot load {client_ca} ({exc}); it must hold PEM "
                                  "CA certificates") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
