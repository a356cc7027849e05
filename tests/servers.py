"""Loopback HTTP servers for the download tests (127.0.0.1 only, started by the tests).

* :class:`StaticServer` serves in-memory files (the release archives a test
  builds), like GitHub's release downloads behind ``SCALR_ZOO_RELEASES_URL``.
* :class:`HubEmulator` is a small Hugging Face Hub: repositories with
  commits, branches and tags; the ``resolve`` endpoint (``ETag``,
  ``X-Repo-Commit``, ``Content-Length``), the revision and tree APIs,
  ``X-Error-Code`` / ``X-Error-Message`` on errors, and the legacy upload
  protocol that ``push_to_hub`` uses without Xet (create repo, validate
  YAML, preupload, LFS batch + PUT, ndjson commit). It never announces Xet,
  so huggingface_hub downloads plain HTTP.

Both record every request as ``(method, path)`` so that tests can count
downloads or assert that none happened.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 (free port) in a daemon thread."""

    def __init__(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.0: one request per connection, so a stopped server answers nothing more.

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _dispatch(self) -> None:
                owner._record(self.command, self.path)
                owner.handle(self)

            do_GET = do_HEAD = do_POST = do_PUT = _dispatch

        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> "_Server":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "_Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def count(self, method: str | None = None, contains: str = "") -> int:
        """Requests seen so far, optionally of one method and with ``contains`` in the path."""
        with self._lock:
            return sum(1 for m, p in self.requests if (method is None or m == method) and contains in p)

    def handle(self, request: BaseHTTPRequestHandler) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    @staticmethod
    def reply(
        request: BaseHTTPRequestHandler, status: int, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> None:
        request.send_response(status)
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        if request.command != "HEAD" and body:
            request.wfile.write(body)

    @classmethod
    def reply_json(cls, request: BaseHTTPRequestHandler, data: Any, status: int = 200, headers: dict | None = None) -> None:
        cls.reply(request, status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    @staticmethod
    def body(request: BaseHTTPRequestHandler) -> bytes:
        if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(request.rfile.readline().strip().split(b";")[0], 16):
                chunks.append(request.rfile.read(size))
                request.rfile.readline()
            request.rfile.readline()
            return b"".join(chunks)
        length = int(request.headers.get("Content-Length") or 0)
        return request.rfile.read(length) if length else b""


class StaticServer(_Server):
    """Serves ``files`` (URL path -> bytes); ``delay`` seconds pass before each file body is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, bytes] = {}
        self.delay = 0.0

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        path = unquote(urlsplit(request.path).path)
        if request.command not in ("GET", "HEAD") or path not in self.files:
            self.reply(request, 404, b"not found")
            return
        if request.command == "GET" and self.delay:
            time.sleep(self.delay)
        self.reply(request, 200, self.files[path], {"Content-Type": "application/gzip"})


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str) -> bool:
    """Which files the emulated repositories keep in LFS (like a .gitattributes for binaries)."""
    return not path.endswith((".json", ".md", ".txt", ".gitattributes"))


@dataclass
class _Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: bytes}
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


class HubEmulator(_Server):
    """A tiny Hugging Face Hub (model repositories only)."""

    def __init__(self) -> None:
        super().__init__()
        self.repos: dict[str, _Repo] = {}
        self.corrupt: set[tuple[str, str]] = set()  # (repo_id, path) served with one byte flipped
        self._lfs_store: dict[str, bytes] = {}
        self._counter = 0

    # -- repository content --------------------------------------------------------------------

    def create_repo(self, repo_id: str) -> str:
        """A repository with an initial commit on ``main``; its sha."""
        self.repos[repo_id] = _Repo()
        return self.commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})

    def commit(
        self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", tag: str | None = None,
        deleted: tuple[str, ...] = (),
    ) -> str:
        """A new commit on ``branch`` adding/replacing ``files``; returns its 40-hex sha."""
        repo = self.repos[repo_id]
        parent = repo.refs.get(branch)
        content = dict(repo.commits[parent]) if parent else {}
        content.update(files)
        for path in deleted:
            content.pop(path, None)
        self._counter += 1
        sha = hashlib.sha1(f"{repo_id}:{self._counter}:{sorted(content)}".encode()).hexdigest()
        repo.commits[sha] = content
        repo.refs[branch] = sha
        if tag:
            repo.refs[tag] = sha
        return sha

    # -- request handling ----------------------------------------------------------------------

    def _error(self, request: BaseHTTPRequestHandler, status: int, code: str, message: str, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        if commit:
            headers["X-Repo-Commit"] = commit
        self.reply_json(request, {"error": message}, status, headers)

    def _find(self, request: BaseHTTPRequestHandler, repo_id: str, revision: str) -> tuple[_Repo, str] | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(request, 401, "RepoNotFound", "Repository not found")
            return None
        sha = repo.resolve(revision)
        if sha is None:
            self._error(request, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, sha

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        split = urlsplit(request.path)
        parts = split.path.strip("/").split("/")
        query = parse_qs(split.query)
        method = request.command
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(request, f"{parts[0]}/{parts[1]}", unquote(parts[3]), "/".join(map(unquote, parts[4:])))
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "revision" and method == "GET":
            return self._revision(request, f"{parts[2]}/{parts[3]}", unquote(parts[5]))
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree" and method == "GET":
            return self._tree(request, f"{parts[2]}/{parts[3]}", unquote(parts[5]), query)
        if parts == ["api", "repos", "create"] and method == "POST":
            return self._create(request)
        if parts == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml(request)
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "preupload" and method == "POST":
            return self._preupload(request, f"{parts[2]}/{parts[3]}")
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"] and method == "POST":
            return self._lfs_batch(request)
        if parts[0] == "lfs-upload" and method == "PUT":
            return self._lfs_put(request, parts[1])
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "commit" and method == "POST":
            return self._commit(request, f"{parts[2]}/{parts[3]}", unquote(parts[5]))
        self._error(request, 404, "NotFound", f"no route for {method} {split.path}")

    def _resolve(self, request: BaseHTTPRequestHandler, repo_id: str, revision: str, path: str) -> None:
        found = self._find(request, repo_id, revision)
        if found is None:
            return
        repo, sha = found
        if path not in repo.commits[sha]:
            return self._error(request, 404, "EntryNotFound", f"{path} does not exist on {revision}", commit=sha)
        data = repo.commits[sha][path]
        etag = hashlib.sha256(data).hexdigest() if is_lfs(path) else git_blob_sha1(data)
        if (repo_id, path) in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        self.reply(request, 200, data, {"ETag": f'"{etag}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes"})

    def _revision(self, request: BaseHTTPRequestHandler, repo_id: str, revision: str) -> None:
        found = self._find(request, repo_id, revision)
        if found is None:
            return
        repo, sha = found
        siblings = [{"rfilename": path} for path in sorted(repo.commits[sha])]
        self.reply_json(request, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False, "siblings": siblings})

    def _tree(self, request: BaseHTTPRequestHandler, repo_id: str, revision: str, query: dict) -> None:
        found = self._find(request, repo_id, revision)
        if found is None:
            return
        repo, sha = found
        entries = []
        for path, data in sorted(repo.commits[sha].items()):
            entry: dict[str, Any] = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
            if is_lfs(path):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self.reply_json(request, entries)

    # -- uploads (legacy protocol, no Xet) ------------------------------------------------------

    def _create(self, request: BaseHTTPRequestHandler) -> None:
        payload = json.loads(self.body(request))
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if repo_id in self.repos:
            return self._error(request, 409, "RepoExists", "You already created this model repo")
        self.create_repo(repo_id)
        self.reply_json(request, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self, request: BaseHTTPRequestHandler) -> None:
        content = json.loads(self.body(request))["content"]
        errors = []
        if not content.startswith("---\n") or "\n---\n" not in content[4:]:
            errors.append({"message": "README.md has no YAML metadata block"})
        else:
            try:
                metadata = yaml.safe_load(content[4:].split("\n---\n", 1)[0])
                if not isinstance(metadata, dict):
                    errors.append({"message": "metadata is not a mapping"})
            except yaml.YAMLError as exc:
                errors.append({"message": f"invalid YAML: {exc}"})
        self.reply_json(request, {"errors": errors, "warnings": []}, 400 if errors else 200)

    def _preupload(self, request: BaseHTTPRequestHandler, repo_id: str) -> None:
        if repo_id not in self.repos:
            return self._error(request, 401, "RepoNotFound", "Repository not found")
        files = json.loads(self.body(request))["files"]
        modes = [
            {"path": f["path"], "uploadMode": "lfs" if is_lfs(f["path"]) else "regular", "shouldIgnore": False}
            for f in files
        ]
        self.reply_json(request, {"files": modes})

    def _lfs_batch(self, request: BaseHTTPRequestHandler) -> None:
        payload = json.loads(self.body(request))
        objects = []
        for obj in payload["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self._lfs_store:
                item["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{obj['oid']}"}}
            objects.append(item)
        self.reply_json(request, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, request: BaseHTTPRequestHandler, oid: str) -> None:
        data = self.body(request)
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(request, 400, "BadRequest", "sha256 of the uploaded bytes does not match the oid")
        self._lfs_store[oid] = data
        self.reply(request, 200)

    def _commit(self, request: BaseHTTPRequestHandler, repo_id: str, revision: str) -> None:
        if repo_id not in self.repos:
            return self._error(request, 401, "RepoNotFound", "Repository not found")
        files: dict[str, bytes] = {}
        deleted = []
        for line in self.body(request).splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self._lfs_store:
                    return self._error(request, 400, "BadRequest", f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = self._lfs_store[value["oid"]]
            elif item["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
        sha = self.commit(repo_id, files, branch=revision, deleted=tuple(deleted))
        self.reply_json(request, {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})
