"""A static file server with single-range support (what GDAL's /vsicurl/ needs), in a thread or its own process.

``python tests/range_server.py DIR PORT_FILE REQUEST_LOG``: serves DIR on a free
loopback port, writes the port to PORT_FILE and appends one line per range
request to REQUEST_LOG (so a test can stop it with SIGSTOP mid-run).
"""

from __future__ import annotations

import functools
import http.server
import os
import sys


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    requests_seen: list = []
    request_log: str | None = None

    def log_message(self, *args):
        pass

    def send_head(self):
        header = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not header or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        start, _, end = header.removeprefix("bytes=").partition("-")
        start, end = int(start), min(int(end) if end else size - 1, size - 1)
        RangeHandler.requests_seen.append((start, end))
        if RangeHandler.request_log:
            with open(RangeHandler.request_log, "a") as log:
                log.write(f"{start}-{end}\n")
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "image/tiff")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._remaining = end - start + 1
        return f

    def copyfile(self, source, outputfile):
        remaining = getattr(self, "_remaining", None)
        if remaining is None:
            return super().copyfile(source, outputfile)
        outputfile.write(source.read(remaining))


def serve(directory: str) -> http.server.ThreadingHTTPServer:
    return http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=directory))


if __name__ == "__main__":
    directory, port_file, RangeHandler.request_log = sys.argv[1:4]
    server = serve(directory)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    os.replace(port_file + ".tmp", port_file)
    server.serve_forever()
