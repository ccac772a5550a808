"""Start, probe, measure and stop a ``vllm serve`` process (or any HTTP server) safely.

vLLM runs as a *subprocess*; this module never imports vLLM, so callers need no
``if __name__ == "__main__":`` guard of their own and can use it from pytest.

::

    from serving.server import VllmServer

    with VllmServer(model_dir, "--quantization", "quantease", "--max-model-len", "1024",
                    "--enforce-eager") as srv:
        print(srv.base_url, srv.rss_bytes() / 2**30, "GiB")
        client = srv.openai_client()
        client.completions.create(model=srv.model_name, prompt="Hi", max_tokens=8)

What it does:

* picks a free port on 127.0.0.1 (the server is only ever bound to loopback; if the port
  was grabbed in between, it retries with a new one);
* runs ``vllm serve MODEL --host 127.0.0.1 --port P [args]`` (falls back to
  ``python -m vllm.entrypoints.openai.api_server --model MODEL`` when the ``vllm``
  console script is unusable, i.e. without the dist-info shim from ``setup.sh``) in its
  own session / process group (``start_new_session=True``), under ``timeout`` (bounded
  lifetime, ``max_lifetime``), with ``PR_SET_PDEATHSIG`` so it dies with the calling
  thread, stdout+stderr to a log file;
* environment: ``VLLM_CPU_KVCACHE_SPACE=1``, ``HF_HUB_OFFLINE=1``, ``VLLM_NO_USAGE_STATS=1``
  (and ``VLLM_CPU_OMP_THREADS_BIND="0|1"`` for ``--tensor-parallel-size 2``), unless
  already set in ``os.environ``; the ``env=`` argument overrides both;
* waits until ``/health`` answers 200 and ``/v1/models`` lists the model, failing fast
  (with the log tail) if the process exits, or after ``startup_timeout`` seconds;
* reports resident memory summed over every process of its session (``/proc``);
* stops it: SIGTERM to the process group, wait, SIGKILL fallback, and makes sure no
  process of the session survives (also ones that left the process group).

A custom ``command`` (``{port}`` / ``{host}`` placeholders) with ``models_path=None``
runs any other HTTP server through the same machinery (used by the tests).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

HOST = "127.0.0.1"
DEFAULT_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "PYTHONUNBUFFERED": "1",
}
_PAGE = os.sysconf("SC_PAGE_SIZE")
_PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """The server process exited or never became ready; ``log_tail`` holds its last lines."""

    def __init__(self, msg: str, log_tail: str = ""):
        super().__init__(f"{msg}\n--- server log tail ---\n{log_tail}" if log_tail else msg)
        self.log_tail = log_tail


# --------------------------------------------------------------------------- helpers
def free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 = state)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def session_pids(sid: int, include_zombies: bool = False) -> list[int]:
    """PIDs whose session id is ``sid`` (a session started with start_new_session has
    sid == pid of its leader). Zombies are left out unless asked for."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        f = _stat_fields(int(entry))
        # fields: state(0) ppid(1) pgrp(2) session(3) ... rss(21)
        if f and int(f[3]) == sid and (include_zombies or f[0] not in ("Z", "X")):
            pids.append(int(entry))
    return sorted(pids)


def process_info(pid: int) -> dict | None:
    """pid, ppid, pgid, state, name, rss_bytes (from /proc/PID/stat) and pss_bytes."""
    f = _stat_fields(pid)
    if f is None:
        return None
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        comm = "?"
    info = {"pid": pid, "ppid": int(f[1]), "pgid": int(f[2]), "state": f[0], "name": comm,
            "rss_bytes": int(f[21]) * _PAGE, "pss_bytes": None}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                info["pss_bytes"] = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    return info


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:  # noqa: BLE001 - best effort (non-Linux)
        pass


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _opt_value(args: Sequence[str], *names: str) -> str | None:
    """Value of the last ``--name V`` / ``--name=V`` in ``args``."""
    val = None
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                val = args[i + 1]
            elif a.startswith(n + "="):
                val = a.split("=", 1)[1]
    return val


def vllm_launcher() -> list[str]:
    """``[<venv>/bin/vllm, "serve"]`` when the console script works (needs distribution
    metadata named ``vllm``, e.g. the shim from setup.sh), else the API-server module."""
    exe = Path(sys.executable).parent / "vllm"
    try:
        from importlib.metadata import PackageNotFoundError, version
        version("vllm")
        ok = exe.is_file()
    except PackageNotFoundError:
        ok = False
    if ok:
        return [str(exe), "serve"]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


# --------------------------------------------------------------------------- server
class VllmServer:
    """Context manager around one server process. See the module docstring.

    model:            model directory/name; also the default served model name.
    *args:            extra ``vllm serve`` arguments (e.g. "--quantization", "quantease").
    tensor_parallel_size: adds ``--tensor-parallel-size N`` (and the OMP bind for CPU);
                      if the option is already in ``args`` its value is used.
    env:              extra environment (overrides the defaults and os.environ).
    startup_timeout:  seconds to wait for readiness.
    max_lifetime:     hard limit for the whole process (``timeout``); None = no limit.
    log_path:         log file (default: <cache>/logs/vllm-<time>-<port>.log).
    command:          custom argv instead of vLLM; ``{port}``/``{host}`` are substituted.
    health_path / models_path: readiness probes; models_path=None skips the model check.
    die_with_parent:  PR_SET_PDEATHSIG(SIGTERM): the server is terminated when the *thread*
                      that started it exits (start it from the main thread, or pass False).
    """

    def __init__(self, model: str | os.PathLike | None = None, *args: str,
                 tensor_parallel_size: int | None = None, env: Mapping[str, str] | None = None,
                 startup_timeout: float = 600.0, max_lifetime: float | None = 3600.0,
                 stop_timeout: float = 30.0, log_path: str | os.PathLike | None = None,
                 command: Sequence[str] | None = None, health_path: str = "/health",
                 models_path: str | None = "/v1/models", port: int | None = None,
                 port_retries: int = 3, poll_interval: float = 0.5, quiet: bool = False,
                 die_with_parent: bool = True):
        if model is None and command is None:
            raise ValueError("need a model (vLLM) or a custom command")
        self.model = str(model) if model is not None else None
        self.args = [str(a) for a in args]
        self.command = list(command) if command is not None else None
        tp_arg = _opt_value(self.args, "--tensor-parallel-size", "-tp")
        if tensor_parallel_size and tp_arg is None and self.command is None:
            self.args += ["--tensor-parallel-size", str(tensor_parallel_size)]
        self.tp = int(tp_arg) if tp_arg else int(tensor_parallel_size or 1)
        self.model_name = _opt_value(self.args, "--served-model-name") or self.model
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.max_lifetime = max_lifetime
        self.stop_timeout = stop_timeout
        self.log_path = Path(log_path) if log_path else None
        self.health_path, self.models_path = health_path, models_path
        self.port = port
        self.port_retries = 0 if port else port_retries
        self.poll_interval = poll_interval
        self.quiet = quiet
        self.die_with_parent = die_with_parent
        self._log_offset = 0
        self.proc: subprocess.Popen | None = None
        self.argv: list[str] = []
        self.startup_seconds: float | None = None
        self.peak_rss_bytes = 0
        self._log = None

    # ---- derived
    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI-compatible base URL (``.../v1``)."""
        return f"{self.url}/v1"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(f"[server] {msg}", flush=True)

    def build_env(self) -> dict[str, str]:
        env = dict(os.environ)
        for k, v in DEFAULT_ENV.items():
            env.setdefault(k, v)
        if self.tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
            # the default "auto" fails for TP>1 on one NUMA node; one core per rank
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(self.tp))
        env.update(self.extra_env)
        return env

    def build_argv(self, port: int) -> list[str]:
        if self.command is not None:
            argv = [a.replace("{port}", str(port)).replace("{host}", HOST) for a in self.command]
        else:
            launcher = vllm_launcher()
            model_part = [self.model] if launcher[-1] == "serve" else ["--model", self.model]
            argv = [*launcher, *model_part, "--host", HOST, "--port", str(port), *self.args]
        if self.max_lifetime and shutil.which("timeout"):
            # bounded lifetime even if this Python process is killed with SIGKILL
            argv = ["timeout", "--kill-after=15", f"{int(self.max_lifetime)}", *argv]
        return argv

    def log_tail(self, n: int = 60) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(self._log_offset, f.tell() - 64 * 1024))
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-n:])

    # ---- lifecycle
    def start(self) -> "VllmServer":
        if self.proc is not None:
            raise RuntimeError("already started")
        for attempt in range(self.port_retries + 1):
            try:
                self._start_once()
                return self
            except ServerError as e:
                if attempt < self.port_retries and "address already in use" in e.log_tail.lower():
                    self._say(f"port {self.port} was taken, retrying with another one")
                    self.port = None
                    continue
                raise
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        self.port = self.port or free_port()
        if self.log_path is None:
            try:
                from serving.paths import logs_dir
                d = logs_dir()
            except ImportError:
                d = Path.cwd()
            d.mkdir(parents=True, exist_ok=True)
            self.log_path = d / f"{'vllm' if self.command is None else 'server'}-" \
                                f"{time.strftime('%Y%m%d-%H%M%S')}-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.argv = self.build_argv(self.port)
        self._log = open(self.log_path, "ab")
        self._log_offset = self._log.tell()  # log_tail() shows this attempt only
        self._log.write(f"$ {' '.join(self.argv)}\n".encode())
        self._log.flush()
        self._say(f"starting: {' '.join(self.argv)}")
        self._say(f"log: {self.log_path}")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=self.build_env(), start_new_session=True, close_fds=True,
            preexec_fn=_set_pdeathsig if self.die_with_parent else None)
        try:
            self._wait_ready(t0)
        except BaseException as e:
            tail = self.log_tail()
            self.stop()
            self.proc = None
            if isinstance(e, ServerError):
                raise ServerError(str(e).split("\n--- server log tail")[0], tail) from None
            raise
        self.startup_seconds = time.monotonic() - t0
        self._say(f"ready at {self.base_url} after {self.startup_seconds:.1f} s; "
                  f"RSS {self.rss_bytes() / 2**30:.2f} GiB over {len(self.pids())} processes")

    def _wait_ready(self, t0: float) -> None:
        deadline = t0 + self.startup_timeout
        healthy = False
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise ServerError(f"server exited with status {rc} during start-up",
                                  self.log_tail())
            if time.monotonic() > deadline:
                raise ServerError(f"server not ready after {self.startup_timeout:.0f} s",
                                  self.log_tail())
            self.rss_bytes()  # track the peak during start-up too
            try:
                if not healthy:
                    code, _ = _http_get(self.url + self.health_path)
                    healthy = code == 200
                if healthy:
                    if self.models_path is None:
                        return
                    code, body = _http_get(self.url + self.models_path)
                    if code == 200:
                        ids = [m.get("id") for m in json.loads(body).get("data", [])]
                        if self.model_name in ids:
                            return
            except (OSError, ValueError):
                pass  # not listening yet / connection reset / partial JSON
            time.sleep(self.poll_interval)

    def pids(self) -> list[int]:
        """Live processes of the server's session (leader included)."""
        return session_pids(self.proc.pid) if self.proc else []

    def processes(self) -> list[dict]:
        return [i for i in (process_info(p) for p in self.pids()) if i]

    def rss_bytes(self) -> int:
        """Sum of RSS over the session's processes (shared pages counted once per process)."""
        total = sum(i["rss_bytes"] for i in self.processes())
        self.peak_rss_bytes = max(self.peak_rss_bytes, total)
        return total

    def pss_bytes(self) -> int:
        """Sum of PSS (shared pages split between processes): a non-double-counting total."""
        return sum(i["pss_bytes"] or 0 for i in self.processes())

    def memory_report(self) -> str:
        procs = self.processes()
        lines = [f"  pid {i['pid']:>7} {i['name'][:15]:<15} RSS {i['rss_bytes'] / 2**30:6.2f} GiB"
                 for i in procs]
        tot = sum(i["rss_bytes"] for i in procs)
        pss = sum(i["pss_bytes"] or 0 for i in procs)
        lines.append(f"  total RSS {tot / 2**30:.2f} GiB (PSS {pss / 2**30:.2f} GiB) "
                     f"over {len(procs)} processes")
        return "\n".join(lines)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM the process group, wait ``stop_timeout``, then SIGKILL the group and any
        session member left; reap the leader. Idempotent. Returns the exit status."""
        if self.proc is None:
            return None
        sid = self.proc.pid
        t0 = time.monotonic()
        if self.session_alive():
            self._signal_all(signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout
            while time.monotonic() < deadline and self.session_alive():
                time.sleep(0.2)
            if self.session_alive():
                self._say(f"still running after {self.stop_timeout:.0f} s: SIGKILL")
                self._signal_all(signal.SIGKILL)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and self.session_alive():
                    time.sleep(0.1)
        try:
            rc = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            rc = None
        left = session_pids(sid)
        if self._log:
            self._log.close()
            self._log = None
        if left:
            raise RuntimeError(f"processes of server session {sid} survived: {left}")
        self._say(f"stopped (status {rc}) in {time.monotonic() - t0:.1f} s")
        return rc

    def session_alive(self) -> bool:
        if self.proc is None:
            return False
        self.proc.poll()  # reap the leader if it has exited
        return bool(session_pids(self.proc.pid))

    def _signal_all(self, sig: int) -> None:
        sid = self.proc.pid
        try:
            os.killpg(sid, sig)  # process group == session id (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in session_pids(sid):  # members that moved to another process group
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- clients
    def openai_client(self, **kw):
        """An ``openai.OpenAI`` client for this server (imports openai lazily)."""
        import openai
        kw.setdefault("timeout", 600.0)
        kw.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.base_url, api_key="EMPTY", **kw)

    def post_json(self, path: str, payload: dict, timeout: float = 600.0) -> dict:
        """POST JSON to ``path`` (e.g. "/v1/completions") with the standard library."""
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m serving.server",
        description="Start `vllm serve MODEL [vllm args...]` on a free loopback port; with "
                    "--prompt send one greedy completion and stop, else serve until Ctrl-C. "
                    "Our options must come before MODEL.")
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--max-lifetime", type=float, default=3600.0)
    ap.add_argument("--prompt", default=None, help="send one greedy completion, print it, stop")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("model")
    ap.add_argument("vllm_args", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    srv = VllmServer(a.model, *a.vllm_args, startup_timeout=a.startup_timeout,
                     max_lifetime=a.max_lifetime)
    with srv:
        print(srv.memory_report(), flush=True)
        if a.prompt is not None:
            t0 = time.monotonic()
            out = srv.post_json("/v1/completions", {"model": srv.model_name, "prompt": a.prompt,
                                                    "max_tokens": a.max_tokens, "temperature": 0})
            print(f"{a.prompt!r} -> {out['choices'][0]['text']!r} "
                  f"({time.monotonic() - t0:.2f} s)", flush=True)
            return 0
        print(f"serving {srv.model_name} at {srv.base_url}; Ctrl-C to stop", flush=True)
        try:
            while srv.alive():
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        if not srv.alive():
            print(f"server exited:\n{srv.log_tail()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
