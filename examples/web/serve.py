"""Serve the TinyMusician browser demo: ``python examples/web/serve.py BUNDLE_DIR [--port 8000]``.

The page runs the exported ONNX bundle on the visitor's CPU with transformers.js (WebAssembly); nothing is
fetched from the internet. Routes: ``/`` the page, ``/config.json`` which bundle to load, ``/models/<name>/``
the bundle, ``/node_modules/`` transformers.js and onnxruntime-web (``npm ci`` in examples/web). Every response
carries COOP/COEP headers, so the page is cross-origin isolated and onnxruntime-web may use several threads.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

HERE = Path(__file__).resolve().parent
PAGE_FILES = ("index.html", "app.js", "worker.js")
MIME_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".onnx": "application/octet-stream",
    ".onnx_data": "application/octet-stream",
    ".map": "application/json",
}
INSTALL_HINT = f"cd {HERE} && ONNXRUNTIME_NODE_INSTALL=skip npm ci"


class SetupError(ValueError):
    """A missing bundle or node_modules directory (reported with the command that fixes it)."""


def check_bundle_dir(bundle: Path) -> Path:
    """The bundle directory, resolved, or a SetupError naming the path and how to make one."""
    bundle = bundle.expanduser().resolve()
    export = f"python -m tinymusician.export MODEL --out {bundle} --precision fp32 int8 int4"
    if not bundle.is_dir():
        raise SetupError(f"bundle directory {bundle} does not exist: export one with `{export}`")
    missing = [name for name in ("config.json", "tokenizer.json") if not (bundle / name).is_file()]
    if missing or not (bundle / "onnx").is_dir():
        what = ", ".join(missing + ([] if (bundle / "onnx").is_dir() else ["onnx/"]))
        raise SetupError(
            f"{bundle} is not an exported ONNX bundle (missing {what}): export one with `{export}`"
        )
    return bundle


def check_node_modules(node_modules: Path) -> Path:
    """The node_modules directory, resolved, or a SetupError with the npm command that installs it."""
    node_modules = node_modules.expanduser().resolve()
    for package in ("@huggingface/transformers", "onnxruntime-web"):
        if not (node_modules / package / "package.json").is_file():
            raise SetupError(
                f"{package} is not installed in {node_modules}: run `{INSTALL_HINT}` "
                "(or pass --node-modules DIR of an existing install)"
            )
    return node_modules


class DemoHandler(SimpleHTTPRequestHandler):
    """Maps the demo's URL prefixes onto three directories; anything else is 404 (no directory listings)."""

    def __init__(self, *args, bundle: Path, node_modules: Path, **kwargs) -> None:
        self.bundle = bundle
        self.node_modules = node_modules
        super().__init__(*args, directory=str(HERE), **kwargs)

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **MIME_TYPES}

    def end_headers(self) -> None:
        # Cross-origin isolation (SharedArrayBuffer -> multi-threaded WASM); no caching: a re-exported bundle
        # with the same name must not be served stale.
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        if not getattr(self.server, "quiet", False):
            super().log_message(format, *args)

    def served_file(self, url_path: str) -> Path | None:
        """URL path -> a file under one of the served roots, or None (not served: 404)."""
        parts = [p for p in unquote(urlsplit(url_path).path).split("/") if p]
        if any(p in (".", "..") or "\\" in p or "\0" in p for p in parts):
            return None
        if not parts:
            file = HERE / "index.html"
        elif len(parts) == 1 and parts[0] in PAGE_FILES:
            file = HERE / parts[0]
        elif parts[0] == "node_modules":
            file = self.node_modules.joinpath(*parts[1:])
        elif parts[:2] == ["models", self.bundle.name]:
            file = self.bundle.joinpath(*parts[2:])
        else:
            return None
        return file if file.is_file() else None  # directories too: no listings

    def translate_path(self, path: str) -> str:
        file = self.served_file(path)
        return str(file) if file is not None else ""

    def send_config(self, body: bool) -> None:
        data = json.dumps({"model": self.bundle.name, "modelPath": "/models/"}).encode()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/config.json":
            self.send_config(body=True)
        else:
            super().do_GET()

    def do_HEAD(self) -> None:
        if urlsplit(self.path).path == "/config.json":
            self.send_config(body=False)
        else:
            super().do_HEAD()

    def send_head(self):
        if self.served_file(self.path) is None:
            self.send_error(HTTPStatus.NOT_FOUND, "Not served by the TinyMusician demo")
            return None
        return super().send_head()


def make_server(
    bundle: Path, node_modules: Path, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False
) -> ThreadingHTTPServer:
    """A server for the demo (port 0: a free one, see ``server.server_address``); raises SetupError."""
    handler = partial(
        DemoHandler, bundle=check_bundle_dir(bundle), node_modules=check_node_modules(node_modules)
    )
    server = ThreadingHTTPServer((host, port), handler)
    server.quiet = quiet
    return server


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python examples/web/serve.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "bundle", type=Path, help="an exported bundle (python -m tinymusician.export ... --out DIR)"
    )
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default) serves this machine only")
    parser.add_argument(
        "--node-modules", type=Path, default=HERE / "node_modules", help="where transformers.js is installed"
    )
    parser.add_argument("--quiet", action="store_true", help="do not log every request")
    args = parser.parse_args(argv)
    try:
        server = make_server(args.bundle, args.node_modules, args.host, args.port, args.quiet)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot listen on {args.host}:{args.port}: {err} (try --port 0)", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"TinyMusician demo ({args.bundle.resolve().name}): http://{host}:{port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
