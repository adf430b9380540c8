"""Masking credentials before anything is printed, tagged or logged.

A tracking URI's `user:password@`, the values of config keys that look like secrets
(SECRET_WORDS) and MLFLOW_TRACKING_TOKEN can reach the terminal, MLflow params and
tags, a logged Hydra config and the comparison's reports; each of those masks through
these functions, so one list of secret words decides for all. Plain functions of
strings (and the environment) that import nothing of the runner's: run naming, store
errors, uploads and reports use them without importing one another or MLflow.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit, urlunsplit

SECRET_WORDS = ("password", "secret", "token", "apikey", "api_key", "credential")
_SECRET_KEY = rf"[\w.\-]*(?:{'|'.join(map(re.escape, SECRET_WORDS))})[\w.\-]*"
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@'\"]*@")
_SECRET_ASSIGN = re.compile(rf"(?P<key>{_SECRET_KEY}=)[^\s,'\"\]]+", re.IGNORECASE)
_SECRET_YAML = re.compile(rf"^(?P<key>[ \t-]*{_SECRET_KEY}:[ \t]+)\S.*$", re.I | re.M)


def mask_uri(uri: str) -> str:
    """Hide `user:password@` so a tracking URI can be printed or tagged."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


def mask_text(text: str) -> str:
    """Mask credentials in free text: `user:password@` in URIs, the values of secret-looking
    keys (`api_token=...`, `password: ...`) and the value of MLFLOW_TRACKING_TOKEN."""
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    text = _SECRET_ASSIGN.sub(r"\g<key>***", text)
    text = _SECRET_YAML.sub(r"\g<key>'***'", text)
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return text.replace(token, "***") if token else text


def is_secret_key(key: str) -> bool:
    lowered = key.lower().replace("-", "_")
    return any(word in lowered for word in SECRET_WORDS)
