"""Reachability of a Hub endpoint, checked in seconds before anything waits on it."""

import os
import socket
import urllib.parse

from rehead.errors import ReheadError

TIMEOUT_S = 3.0


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def check_reachable(endpoint: str, needed_for: str, advice: str, timeout: float = TIMEOUT_S) -> None:
    """Raises a ReheadError naming what needed ``endpoint`` when no TCP connection opens within ``timeout``."""
    url = urllib.parse.urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise ReheadError(f"{needed_for}, and {endpoint} cannot be reached ({e}). {advice}") from None
