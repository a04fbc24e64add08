"""A real GCS JSON API on loopback for tests: `gcp-storage-emulator` in its own process on
127.0.0.1, with one bucket, and the environment that points every client at it:

- gcsfs (etils.epath's gs:// backend) and google-cloud-storage (tensorboardX's gs:// writer)
  read STORAGE_EMULATOR_HOST;
- tensorstore, through which Orbax writes and reads array data, reads TENSORSTORE_GCS_HTTP_URL,
  and GOOGLE_AUTH_TOKEN_FOR_TESTING spares it the search for credentials;
- GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false keeps gcsfs from asking the (absent) storage-control
  API what kind of bucket this is.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request

BUCKET = "bucket"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_emulator(bucket: str = BUCKET):
    """Starts the emulator, sets the environment of this process (and of its children) to use it,
    yields that environment; stops it and restores the environment afterwards."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host",
                             "127.0.0.1", "--port", str(port), "--in-memory", "--default-bucket",
                             bucket, "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = dict(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
               GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator", GOOGLE_CLOUD_PROJECT="test",
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    saved = {k: os.environ.get(k) for k in env}
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=1)
                break
            except urllib.error.HTTPError:
                break              # it answers
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the GCS emulator did not start") from None
                time.sleep(0.2)
        os.environ.update(env)
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.kill()
        proc.wait()
