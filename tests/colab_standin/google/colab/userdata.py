import json
import os

from ._log import record


class SecretNotFoundError(KeyError):
    pass


def get(key):
    secrets = json.loads(os.environ.get("STANDIN_SECRETS", "{}"))
    record(f"userdata.get {key}")
    if key not in secrets:
        raise SecretNotFoundError(key)
    return secrets[key]
