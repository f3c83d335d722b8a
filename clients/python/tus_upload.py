#!/usr/bin/env python3
"""Upload one file with the official tus Python client (tuspy).

Usage:
  tus_upload.py --endpoint URL --file PATH [--token TOKEN] [--session ID]
                [--sha256] [--chunk-size BYTES] [--stop-after BYTES]
                [--resume-url URL]

Output (stdout, one JSON line), identical to clients/node/tus_upload.mjs:
  {"url": "...", "bytes": N, "complete": true}        upload finished
  {"url": "...", "bytes": ACKED, "complete": false}   stopped by --stop-after (exit 0)
On error: message on stderr (with HTTP status and body when available), exit 1.

Retries mirror tus-js-client's (delays 0 s, 0.5 s, 1 s; no retry on 4xx except
409/423): tuspy's own retry knob only supports one fixed delay, so tuspy's
retries are disabled and each step is retried here instead.
"""

import argparse
import hashlib
import json
import os
import sys
import time

from tusclient import client
from tusclient.exceptions import TusCommunicationError

RETRY_DELAYS = (0.0, 0.5, 1.0)


def positive_int(text):
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def parse_args(argv):
    p = argparse.ArgumentParser(description="Upload one file with tuspy (tus 1.0).")
    p.add_argument("--endpoint", help="creation URL, e.g. http://127.0.0.1:8080/files")
    p.add_argument("--file", required=True)
    p.add_argument("--token", help="send 'Authorization: Bearer TOKEN' on every request")
    p.add_argument("--session", help="Upload-Metadata key 'session'")
    p.add_argument("--sha256", action="store_true",
                   help="send the file's SHA-256 (lowercase hex) as Upload-Metadata key 'sha256'")
    p.add_argument("--chunk-size", type=positive_int, help="bytes per PATCH (default: whole file)")
    p.add_argument("--stop-after", type=positive_int,
                   help="stop once at least this many bytes were acknowledged")
    p.add_argument("--resume-url", help="resume the existing upload at this URL")
    args = p.parse_args(argv)
    if not args.endpoint and not args.resume_url:
        p.error("--endpoint (or --resume-url) is required")
    return args


def sha256_hex(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe(err):
    msg = str(err) or type(err).__name__
    status = getattr(err, "status_code", None)
    if status is not None:
        body = getattr(err, "response_content", None)
        if isinstance(body, bytes):
            body = body.decode("utf-8", "replace")
        msg += f"\nHTTP status {status}; response body: {json.dumps(body or '')}"
    return msg


def should_retry(err):
    # Same rule as tus-js-client's defaultOnShouldRetry.
    status = getattr(err, "status_code", None)
    if status is None:
        return True
    return not (400 <= status < 500) or status in (409, 423)


def with_retries(step, before_retry=None):
    attempt = 0
    while True:
        try:
            if attempt > 0 and before_retry is not None:
                before_retry()
            return step()
        except (TusCommunicationError, OSError) as err:
            if attempt >= len(RETRY_DELAYS) or not should_retry(err):
                raise
            time.sleep(RETRY_DELAYS[attempt])
            attempt += 1


def report(url, nbytes, complete):
    sys.stdout.write(json.dumps({"url": url, "bytes": nbytes, "complete": complete}) + "\n")
    sys.stdout.flush()


def main(argv):
    args = parse_args(argv)
    path = args.file
    if not os.path.isfile(path):
        print(f"cannot read {path}: no such file", file=sys.stderr)
        return 1
    size = os.path.getsize(path)

    # tuspy metadata values must be str.
    metadata = {"filename": os.path.basename(path)}
    if args.session is not None:
        metadata["session"] = args.session
    if args.sha256:
        metadata["sha256"] = sha256_hex(path)

    headers = {}
    if args.token is not None:
        headers["Authorization"] = f"Bearer {args.token}"

    # With --resume-url only that upload is used (never a new one is created).
    my_client = client.TusClient(args.endpoint or args.resume_url, headers=headers)
    kwargs = dict(file_path=path, metadata=metadata, url=args.resume_url,
                  retries=0, store_url=False)
    if args.chunk_size is not None:
        kwargs["chunk_size"] = args.chunk_size

    try:
        # With url=..., the constructor sends HEAD to learn the current offset.
        uploader = with_retries(lambda: my_client.uploader(**kwargs))

        if not uploader.url:
            uploader.set_url(with_retries(uploader.create_url))
            uploader.offset = 0

        def resync():
            uploader.offset = uploader.get_offset()

        while uploader.offset < size:
            if args.stop_after is not None and uploader.offset >= args.stop_after:
                report(uploader.url, uploader.offset, False)
                return 0
            with_retries(uploader.upload_chunk, before_retry=resync)
    except (TusCommunicationError, OSError, ValueError, TypeError) as err:
        print(describe(err), file=sys.stderr)
        return 1

    report(uploader.url, size, True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
