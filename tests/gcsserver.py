"""A throwaway Google Cloud Storage server (`gcp-storage-emulator`, in memory) on loopback, for tests.

    with gcs_server() as gcs:
        fs = gcs.filesystem()           # a gcsfs filesystem that reaches the server
        fs.put("clip.mp4", f"{gcs.bucket}/videos/clip.mp4")
        ... gcs.storage ...             # vidlens' `storage` config that reaches it

The emulator lacks one call gcsfs makes: `moveTo`, the atomic rename of an object within a
bucket (gcsfs falls back to copy and delete only after its retries, 34 s a move). The server
here adds it as a copy then a delete, which is what gcsfs's fallback does. Its log goes to a
file: a pipe nobody read filled up after a few commands and stopped the server. gcsfs's
default filesystem (2026.10) would ask for each bucket's layout over gRPC, which the emulator
does not answer: vidlens gives a gs:// store reached through an endpoint gcsfs's plain
filesystem (`workers.storage.url_to_fs`), as `filesystem()` here does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tests.s3server import start_on_a_free_port

_SERVER = r'''
import sys
from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.server import POST, create_server


def move(request, response, storage, *args, **kwargs):
    request.params["dest_bucket_name"] = request.params["bucket_name"]
    objects.copy(request, response, storage)
    if response.status < 300:
        objects._delete(storage, request.params["bucket_name"], request.params["object_id"])


server.HANDLERS = ((r"^(?:/storage/v1)?/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
                    r"/moveTo/o/(?P<dest_object_id>.*[^/]+)$", {POST: move}),) + tuple(server.HANDLERS)
create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket=sys.argv[2]).run()
'''


@dataclass(frozen=True)
class GCSServer:
    """A running server and one bucket in it."""

    endpoint_url: str
    bucket: str

    @property
    def storage(self) -> dict[str, Any]:
        """vidlens' `storage` settings that reach this server (anonymous: it checks no token)."""
        return {"endpoint_url": self.endpoint_url, "anon": True}

    def filesystem(self):
        import gcsfs.core

        return gcsfs.core.GCSFileSystem(token="anon", endpoint_url=self.endpoint_url, skip_instance_cache=True)


@contextmanager
def gcs_server(bucket: str = "vidlens") -> Iterator[GCSServer]:
    """Start the emulator with `bucket` in it; stop it (and forget its data) at the end."""
    with tempfile.TemporaryDirectory(prefix="vidlens-gcs-") as folder:
        log_path = os.path.join(folder, "emulator.log")

        def start(port: int) -> subprocess.Popen:
            with open(log_path, "wb") as log:
                return subprocess.Popen([sys.executable, "-c", _SERVER, str(port), bucket],
                                        stdout=log, stderr=subprocess.STDOUT)

        process, port = start_on_a_free_port(start, _stop, log_path, 30, "the GCS emulator")
        try:
            yield GCSServer(f"http://127.0.0.1:{port}", bucket)
        finally:
            _stop(process)


def _stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()
