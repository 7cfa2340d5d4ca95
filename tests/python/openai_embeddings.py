#!/usr/bin/env python3
"""Embeddings from a running gateway through the official OpenAI Python client.

Usage: openai_embeddings.py BASE_URL MODEL TEXT...

BASE_URL is the gateway's OpenAI root (`http://127.0.0.1:PORT/v1`). Three
calls of `client.embeddings.create(model=MODEL, input=[TEXT...])`:

- `default`: no `encoding_format`. The client then asks for `base64` itself
  (openai >= 1.x; older releases only when numpy is installed) and decodes
  the strings to floats (with numpy when present, else `array`), so this is
  the path most users take without knowing it;
- `float`: `encoding_format="float"`, lists of floats on the wire;
- `base64`: `encoding_format="base64"`. Asked for explicitly, the client
  hands back the base64 strings untouched; they are decoded here as
  little-endian float32.

Prints one JSON object on stdout: `{"default": [[...]], "float": [[...]],
"base64": [[...]], "sent_encoding_format": {"default": ..., "float": ...,
"base64": ...}, "model": ..., "usage": {...}, "openai_version": ...}`,
where `sent_encoding_format` is what the client put in each request body
(read from the request it sent).
"""

import base64
import json
import struct
import sys

import openai


def sent_format(raw):
    """The `encoding_format` of the request body the client sent (None: left out)."""
    body = json.loads(raw.http_request.content)
    return body.get("encoding_format")


def vectors(resp):
    return [list(map(float, d.embedding)) for d in sorted(resp.data, key=lambda d: d.index)]


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    base_url, model, texts = sys.argv[1], sys.argv[2], sys.argv[3:]
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    out = {"openai_version": openai.__version__, "sent_encoding_format": {}}
    for mode in ("default", "float", "base64"):
        kwargs = {} if mode == "default" else {"encoding_format": mode}
        raw = client.embeddings.with_raw_response.create(model=model, input=texts, **kwargs)
        resp = raw.parse()
        out["sent_encoding_format"][mode] = sent_format(raw)
        if mode == "base64":
            got = []
            for d in sorted(resp.data, key=lambda d: d.index):
                if not isinstance(d.embedding, str):
                    sys.exit(f"encoding_format=base64: expected a base64 string, got {type(d.embedding).__name__}")
                b = base64.b64decode(d.embedding)
                got.append(list(struct.unpack(f"<{len(b) // 4}f", b)))
            out[mode] = got
        else:
            out[mode] = vectors(resp)
        out["model"] = resp.model
        out["usage"] = resp.usage.model_dump()
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
