"""serving/server.py: free loopback port, readiness, fail-fast, memory, process-group cleanup.

The fast tests run plain Python HTTP servers through the same machinery (no vLLM). The
``slow`` test serves the default bf16 model with vLLM when it has been prepared
(``bash serving/setup.sh``), else it is skipped.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from serving import paths
from serving.server import ServerError, VllmServer, free_port, session_pids

HTTP = [sys.executable, "-m", "http.server", "{port}", "--bind", "{host}"]

# An HTTP server that first starts a child (which also ignores SIGTERM) and a grandchild
# in another process group, to check that stop() leaves no process of its session behind.
SPAWNER = textwrap.dedent("""
    import http.server, os, signal, subprocess, sys, time
    port = int(sys.argv[1])
    ignore = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "time.sleep(600)")
    subprocess.Popen([sys.executable, "-c", ignore])
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                     process_group=0)   # leaves the process group, stays in the session
    if os.environ.get("IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    http.server.ThreadingHTTPServer(("127.0.0.1", port),
                                    http.server.SimpleHTTPRequestHandler).serve_forever()
""")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_paths_cache_dir_and_stale_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("QE_CACHE_DIR", str(tmp_path / "c"))
    assert paths.default_model_dir() == tmp_path / "c" / "models" / paths.DEFAULT_MODEL_NAME
    assert paths.ckpt_dir("x") == tmp_path / "c" / "ckpt" / "x"
    monkeypatch.delenv("QE_CACHE_DIR")
    assert paths.cache_dir() == paths.REPO_ROOT / ".cache"
    out = tmp_path / "model"
    dead = tmp_path / ".model.tmp-999999999"  # no such pid
    mine = paths.tmp_sibling(out)              # this process: alive, kept
    dead.mkdir()
    mine.mkdir()
    assert paths.remove_stale_tmp(out) == [dead]
    assert mine.is_dir() and not dead.exists()
    assert not paths.model_is_complete(out)
    assert not paths.quantease_ckpt_is_complete(out)
    out.mkdir()
    (out / "config.json").write_text('{"quantization_config": {"quant_method": "quantease"}}')
    assert paths.quantease_ckpt_is_complete(out)


def test_free_port_is_bindable_on_loopback():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_http_server_lifecycle(tmp_path):
    srv = VllmServer(command=HTTP, health_path="/", models_path=None, startup_timeout=30,
                     log_path=tmp_path / "http.log", quiet=True)
    with srv:
        assert srv.alive()
        assert srv.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(srv.url + "/", timeout=5) as r:
            assert r.status == 200
        pids = srv.pids()
        assert srv.proc.pid in pids and os.getpgid(srv.proc.pid) == srv.proc.pid
        assert srv.rss_bytes() > 5 * 2**20  # a Python interpreter
        assert "total RSS" in srv.memory_report()
        assert srv.argv[0] == "timeout"  # bounded lifetime
    assert not srv.alive()
    assert all(not _alive(p) for p in pids)
    assert (tmp_path / "http.log").read_text().startswith("$ timeout")
    srv.stop()  # idempotent


@pytest.mark.parametrize("ignore_term", [False, True])
def test_stop_kills_whole_session(tmp_path, ignore_term):
    script = tmp_path / "spawner.py"
    script.write_text(SPAWNER)
    srv = VllmServer(command=[sys.executable, str(script), "{port}"], health_path="/",
                     models_path=None, startup_timeout=30, stop_timeout=2, quiet=True,
                     env={"IGNORE_TERM": "1"} if ignore_term else {},
                     log_path=tmp_path / "s.log")
    srv.start()
    deadline = time.monotonic() + 10
    while len(srv.pids()) < 4 and time.monotonic() < deadline:  # timeout, server, 2 children
        time.sleep(0.1)
    pids = srv.pids()
    assert len(pids) >= 4, pids
    sid = srv.proc.pid
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 20
    assert session_pids(sid) == []
    assert all(not _alive(p) for p in pids)


def test_fail_fast_with_log_tail(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('boom: no such model'); sys.exit(3)"]
    srv = VllmServer(command=cmd, models_path=None, startup_timeout=60, quiet=True,
                     log_path=tmp_path / "f.log")
    t0 = time.monotonic()
    with pytest.raises(ServerError) as ei:
        srv.start()
    assert time.monotonic() - t0 < 15
    assert "boom: no such model" in ei.value.log_tail
    assert "status 3" in str(ei.value)
    assert not srv.alive()


def test_startup_timeout_cleans_up(tmp_path):
    cmd = [sys.executable, "-c", "import time; time.sleep(600)"]  # never listens
    srv = VllmServer(command=cmd, models_path=None, startup_timeout=2, stop_timeout=5,
                     quiet=True, log_path=tmp_path / "t.log")
    with pytest.raises(ServerError, match="not ready after"):
        srv.start()
    assert srv.proc is None


def test_max_lifetime_bounds_the_process(tmp_path):
    srv = VllmServer(command=HTTP, health_path="/", models_path=None, max_lifetime=3,
                     quiet=True, log_path=tmp_path / "l.log")
    srv.start()
    sid = srv.proc.pid
    deadline = time.monotonic() + 20
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert session_pids(sid) == []
    srv.stop()


def test_env_and_argv_for_vllm(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    srv = VllmServer("/some/model", "--quantization", "quantease", tensor_parallel_size=2,
                     env={"FOO": "1"})
    env = srv.build_env()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_NO_USAGE_STATS"] == "1" and env["FOO"] == "1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    argv = srv.build_argv(12345)
    assert "/some/model" in argv and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "12345"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--quantization") + 1] == "quantease"
    assert VllmServer("/m", "-tp", "2").tp == 2
    assert "VLLM_CPU_OMP_THREADS_BIND" not in VllmServer("/m").build_env()
    assert VllmServer("/m", "--served-model-name", "x").model_name == "x"


@pytest.mark.slow
def test_vllm_serves_default_model():
    model = paths.default_model_dir()
    if not paths.model_is_complete(model):
        pytest.fail(f"default model not prepared ({model}); run `bash serving/setup.sh` first")
    pytest.importorskip("vllm")
    with VllmServer(model, "--max-model-len", "512", "--enforce-eager",
                    startup_timeout=300) as srv:
        assert srv.rss_bytes() > 2**30
        out = srv.post_json("/v1/completions", {"model": srv.model_name, "max_tokens": 8,
                                                "prompt": "The capital of France is",
                                                "temperature": 0})
        assert "Paris" in out["choices"][0]["text"]
        chat = srv.post_json("/v1/chat/completions", {
            "model": srv.model_name, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert "Paris" in chat["choices"][0]["message"]["content"]
        pids = srv.pids()
    assert all(not _alive(p) for p in pids)
