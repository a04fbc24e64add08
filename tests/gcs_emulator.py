"""A real GCS JSON API on loopback for tests: `gcp-storage-emulator` in its own process on
127.0.0.1, with one bucket, and the environment that points every client at it:

- gcsfs (etils.epath's gs:// backend) and google-cloud-storage (tensorboardX's gs:// writer)
  read STORAGE_EMULATOR_HOST;
- tensorstore, through which Orbax writes and reads array data, reads TENSORSTORE_GCS_HTTP_URL,
  and GOOGLE_AUTH_TOKEN_FOR_TESTING spares it the search for credentials;
- GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false keeps gcsfs from asking the (absent) storage-control
  API what kind of bucket this is.

One gap of the emulator is filled here: real GCS answers a media download with the object's
generation in an `x-goog-generation` header, which tensorstore reads (it fails with "Malformed
StorageGeneration" without it); the emulator sends it only in the JSON metadata. The server is
therefore started through this module (`python tests/gcs_emulator.py PORT BUCKET`), which adds the
header from the object's metadata before serving.
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
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port), bucket],
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


def _serve(port: int, bucket: str) -> None:
    import logging

    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects
    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:          # the original handler answers 404 itself
            obj = None
        if obj is not None:
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        return download(request, response, storage, *args, **kwargs)

    objects.download = download_with_generation   # before the server module binds its routes
    from gcp_storage_emulator.server import create_server
    logging.disable(logging.CRITICAL)
    create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2])
