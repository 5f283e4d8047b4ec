"""Test harness: a vLLM OpenAI server on loopback, started and stopped by tests and the ``reliability`` command;
a search process killed after its first committed step."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "vllm_indexcache.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``vllm-indexcache serve`` subprocess on 127.0.0.1 (own process group, stopped on exit); ``launcher``
    replaces ``vllm-indexcache serve`` (e.g. ``[".venv/bin/vllm", "serve"]``)."""

    def __init__(self, model: str, log: Path, args: list[str], startup_timeout: float = 600.0,
                 launcher: list[str] | None = None):
        self.model, self.log, self.port = model, Path(log), free_port()
        self.cmd = [*(launcher or [*CLI, "serve"]), model, "--port", str(self.port), *args]
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.startup_s = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        import requests

        self.log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(self.log, "w") as fh:
            fh.write("$ " + " ".join(self.cmd) + "\n")
            fh.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
        while True:
            try:
                if requests.get(f"{self.base_url}/v1/models", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.time() - t0 > self.startup_timeout:
                self.stop()
                raise RuntimeError(f"server did not start (see {self.log}):\n" + self.log.read_text()[-3000:])
            time.sleep(1)
        self.startup_s = round(time.time() - t0, 1)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)

    def healthy(self) -> bool:
        import requests

        try:
            return requests.get(f"{self.base_url}/health", timeout=10).ok
        except requests.RequestException:
            return False

    def metrics(self) -> dict[str, float]:
        """Sums of the ``vllm:*`` counters on ``/metrics`` that this check reads."""
        import requests

        text = requests.get(f"{self.base_url}/metrics", timeout=30).text
        out = {"num_preemptions": 0.0, "finished": 0.0}
        for line in text.splitlines():
            if line.startswith("vllm:num_preemptions_total"):
                out["num_preemptions"] += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:request_success_total"):  # finished requests (aborted ones not counted)
                out["finished"] += float(line.rsplit(" ", 1)[1])
        return out

    def aborted_requests(self) -> int:
        """Request ids in vLLM's ``Aborted request(s) …`` log lines (needs ``--enable-log-requests``)."""
        return sum(len(m.split(",")) for m in re.findall(r"Aborted request\(s\) (\S+?)\.?$", self.log.read_text(),
                                                       re.M))

    def kv_cache_tokens(self) -> int | None:
        m = re.search(r"KV cache size: ([\d,]+) tokens", self.log.read_text())
        return int(m.group(1).replace(",", "")) if m else None


def server_args(pattern: str, max_model_len: int, kv_bytes: int, dtype: str) -> list[str]:
    return ["--hf-overrides", json.dumps({"index_topk_pattern": pattern}), "--max-model-len", str(max_model_len),
            "--kv-cache-memory-bytes", str(kv_bytes), "--dtype", dtype, "--no-enable-prefix-caching",
            "--enforce-eager", "--enable-log-requests"]


# ----------------------------------------------------------------------------------------------------- requests
def sigkill_after_first_step(proc: subprocess.Popen, state_file: Path, timeout: float) -> int | None:
    """SIGKILL a running ``vllm-indexcache search`` as soon as its state file holds a committed step.

    Returns the number of committed steps at the kill, or None if the search ended (or ``timeout`` seconds passed)
    first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            n = len(json.loads(Path(state_file).read_text())["steps"])
        except (OSError, ValueError, KeyError):
            n = 0
        if n >= 1:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return n
        time.sleep(0.02)
    return None


