"""Serving reliability on SmolLM2-135M through ``deltatune serve``: what a long prefill, clients that
hang up and a drain that runs out do to everyone else.

Three parts, each run ``--runs`` times on fresh server processes (base model, no adapters):

* ``prefill``: 20 short completions (a few prompt tokens, ``--short-tokens`` new ones, sent
  together) while one ~``--long-tokens``-token prompt is prefilled in ``--prefill-chunk`` chunks,
  against the same 20 alone; p50/p99 latency, how many finished before the long prompt's first
  token, and the long prompt's time to first token alone and with them.
* ``disconnect``: 6 non-streaming clients ask for ``--hangup-tokens`` tokens and close their
  connections after 1 s; then the server's CPU use over a 5 s window (cores) and 10 short
  requests' latency, against the same before the hang-ups.
* ``drain``: 2 non-streaming requests and 2 streams that outlast ``--drain-timeout``; SIGTERM:
  each one's status and time to its answer, whether streams end with an error event and
  ``[DONE]``, the server's exit code and time, and the count its log gives.

Prints one JSON line; raw lines are appended to bench/results/serve_reliability.jsonl.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RunMeter, append_result, emit, log, median

BASE = "smollm2-135m"
ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca" / "alpaca_data_first200.json"
THREADS = [1]  # the server's torch threads (--server-threads)
SHORT_PROMPTS = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(20)]


class Server:
    """``deltatune serve`` in a child process (stderr to a file), ready once /v1/models answers."""

    def __init__(self, log_path: Path, *flags: str) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        command = [sys.executable, "-m", "deltatune", "serve", "--base", BASE, "--port", str(self.port), *flags]
        self.log_path = log_path
        env = os.environ | {"OMP_NUM_THREADS": str(THREADS[0])}
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log_path.open("w"), env=env)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"deltatune serve exited with {self.process.returncode}: {log_path.read_text()}")
            try:
                if self.request("GET", "/v1/models", None, timeout=5)[0] == 200:
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("the server did not come up within 600 s")

    def request(self, method: str, path: str, body: dict | None, timeout: float = 900) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body) if body is not None else None
            connection.request(method, path, data, {"Content-Type": "application/json"})
            answer = connection.getresponse()
            return answer.status, answer.read()
        finally:
            connection.close()

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server process so far (/proc/PID/stat, clock ticks)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(60)


def completion(prompt: str, tokens: int, stream: bool = False) -> dict[str, Any]:
    return {"model": BASE, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": stream}


def timed_short(server: Server, prompt: str, tokens: int) -> tuple[float, float]:
    """(seconds to the whole answer, the time it arrived)."""
    start = time.perf_counter()
    status, raw = server.request("POST", "/v1/completions", completion(prompt, tokens))
    if status != 200:
        raise RuntimeError(f"short request answered {status}: {raw[:300]!r}")
    return time.perf_counter() - start, time.perf_counter()


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50_s": round(median(ordered), 3), "p99_s": round(p99, 3), "max_s": round(ordered[-1], 3)}


def shorts_together(server: Server, tokens: int) -> list[tuple[float, float]]:
    with ThreadPoolExecutor(len(SHORT_PROMPTS)) as pool:
        return list(pool.map(lambda p: timed_short(server, p, tokens), SHORT_PROMPTS))


def long_first_token(server: Server, prompt: str, started: dict[str, float]) -> None:
    """Stream the long prompt (1 new token); record when its first event (its first token) arrives."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=900)
    started["sent"] = time.perf_counter()
    connection.request(
        "POST", "/v1/completions", json.dumps(completion(prompt, 1, True)), {"Content-Type": "application/json"}
    )
    answer = connection.getresponse()
    answer.readline()
    started["first_token"] = time.perf_counter()
    answer.read()
    connection.close()


def part_prefill(server: Server, long_prompt: str, tokens: int, alone_first: bool) -> dict[str, Any]:
    def alone() -> list[float]:
        return [t for t, _ in shorts_together(server, tokens)]

    def during() -> tuple[list[tuple[float, float]], dict[str, float]]:
        marks: dict[str, float] = {}
        thread = threading.Thread(target=long_first_token, args=(server, long_prompt, marks))
        thread.start()
        time.sleep(1.0)  # the long prompt is being prefilled
        results = shorts_together(server, tokens)
        thread.join()
        return results, marks

    timeline: dict[str, Any] = {}
    if alone_first:
        timeline["alone"] = alone()
    results, marks = during()
    if not alone_first:
        timeline["alone"] = alone()
    solo: dict[str, float] = {}
    long_first_token(server, long_prompt, solo)
    before_long = sum(1 for _, arrived in results if arrived < marks["first_token"])
    return {
        "short_alone": percentiles(timeline["alone"]),
        "short_during_long_prefill": percentiles([t for t, _ in results]),
        "short_finished_before_long_first_token": before_long,
        "long_ttft_alone_s": round(solo["first_token"] - solo["sent"], 2),
        "long_ttft_with_shorts_s": round(marks["first_token"] - marks["sent"], 2),
    }


def hang_up(server: Server, tokens: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request(
        "POST",
        "/v1/completions",
        json.dumps(completion("Count to a thousand:", tokens)),
        {"Content-Type": "application/json"},
    )
    time.sleep(1.0)
    connection.close()


def part_disconnect(server: Server, hangup_tokens: int, tokens: int) -> dict[str, Any]:
    def window() -> dict[str, Any]:
        cpu, wall = server.cpu_seconds(), time.perf_counter()
        time.sleep(5.0)
        cores = (server.cpu_seconds() - cpu) / (time.perf_counter() - wall)
        latencies = [timed_short(server, SHORT_PROMPTS[i], tokens)[0] for i in range(10)]
        return {"server_cores_idle_window": round(cores, 3), "short_sequential": percentiles(latencies)}

    before = window()
    threads = [threading.Thread(target=hang_up, args=(server, hangup_tokens)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    time.sleep(1.0)
    after = window()
    gone = server.log_path.read_text().count("a client went away")
    return {"before": before, "after_6_hangups": after, "hangups_seen_in_log": gone}


def stream_events(server: Server, body: dict, out: dict[str, Any], key: str, ready: threading.Event) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=900)
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    answer = connection.getresponse()
    answer.readline()
    ready.set()
    lines = []
    try:
        lines = [line for line in answer.read().decode().splitlines() if line.startswith("data: ")]
    except http.client.IncompleteRead as err:  # a stream cut short
        lines = [line for line in err.partial.decode().splitlines() if line.startswith("data: ")]
    out[key] = {"status": answer.status, "at": time.perf_counter(), "tail": lines[-2:]}


def whole_answer(server: Server, body: dict, out: dict[str, Any], key: str) -> None:
    try:
        status, raw = server.request("POST", "/v1/completions", body)
    except (http.client.HTTPException, OSError) as err:
        status, raw = None, repr(err).encode()
    out[key] = {"status": status, "at": time.perf_counter(), "body": raw[:300].decode(errors="replace")}


def part_drain(log_path: Path, drain_timeout: float, tokens: int) -> dict[str, Any]:
    server = Server(log_path, "--drain-timeout", str(drain_timeout), "--max-tokens-limit", str(tokens))
    out: dict[str, Any] = {}
    body = completion("Count to ten thousand:", tokens)
    threads, readies = [], []
    for i in range(2):
        threads.append(threading.Thread(target=whole_answer, args=(server, body, out, f"whole{i}")))
        ready = threading.Event()
        readies.append(ready)
        threads.append(
            threading.Thread(target=stream_events, args=(server, body | {"stream": True}, out, f"stream{i}", ready))
        )
    for thread in threads:
        thread.start()
    for ready in readies:
        ready.wait(600)
    time.sleep(1.0)
    signalled = time.perf_counter()
    server.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(600)
    code = server.process.wait(600)
    exited = time.perf_counter()
    lines = [line for line in log_path.read_text().splitlines() if "drain timeout" in line]
    answers = {}
    for key, value in sorted(out.items()):
        entry = {"status": value["status"], "after_sigterm_s": round(value["at"] - signalled, 2)}
        if key.startswith("stream"):
            tail = value["tail"]
            entry["error_event_then_done"] = len(tail) == 2 and '"error"' in tail[0] and tail[1] == "data: [DONE]"
            entry["error_code"] = json.loads(tail[0][6:])["error"]["code"] if entry["error_event_then_done"] else None
        else:
            try:
                entry["error_code"] = json.loads(value["body"])["error"]["code"]
            except (ValueError, KeyError, TypeError):
                entry["error_code"] = None
                entry["body"] = value["body"][:120]
        answers[key] = entry
    return {
        "drain_timeout_s": drain_timeout,
        "answers": answers,
        "exit_code": code,
        "exit_after_sigterm_s": round(exited - signalled, 2),
        "log": lines[-1].split("drain timeout", 1)[1].strip(": ") if lines else None,
    }


def long_prompt(length: int) -> str:
    from deltatune.loading.tasks import load_tokenizer

    tokenizer = load_tokenizer(BASE)
    texts = [f"{r['instruction']} {r['input']} {r['output']}" for r in json.loads(ALPACA.read_text())]
    prompt, i = "", 0
    while len(tokenizer(prompt)["input_ids"]) < length:
        prompt += texts[i % len(texts)] + "\n"
        i += 1
    ids = tokenizer(prompt)["input_ids"][:length]
    return tokenizer.decode(ids)


def one_run(index: int, args: argparse.Namespace, prompt: str, directory: Path) -> dict[str, Any]:
    server = Server(directory / f"serve{index}.log", "--prefill-chunk", str(args.prefill_chunk))
    try:
        log(f"run {index}: prefill")
        prefill = part_prefill(server, prompt, args.short_tokens, alone_first=(index + args.run_offset) % 2 == 0)
        log(f"run {index}: disconnect")
        disconnect = part_disconnect(server, args.hangup_tokens, args.short_tokens)
    finally:
        server.stop()
    log(f"run {index}: drain")
    drain = part_drain(directory / f"drain{index}.log", args.drain_timeout, args.drain_tokens)
    return {"prefill": prefill, "disconnect": disconnect, "drain": drain}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def spread(values: list[float]) -> dict[str, float]:
        return {"median": round(median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}

    pick = {
        "short_alone_p50_s": lambda r: r["prefill"]["short_alone"]["p50_s"],
        "short_alone_p99_s": lambda r: r["prefill"]["short_alone"]["p99_s"],
        "short_during_prefill_p50_s": lambda r: r["prefill"]["short_during_long_prefill"]["p50_s"],
        "short_during_prefill_p99_s": lambda r: r["prefill"]["short_during_long_prefill"]["p99_s"],
        "short_finished_before_long_first_token": lambda r: r["prefill"]["short_finished_before_long_first_token"],
        "long_ttft_alone_s": lambda r: r["prefill"]["long_ttft_alone_s"],
        "long_ttft_with_shorts_s": lambda r: r["prefill"]["long_ttft_with_shorts_s"],
        "cores_before_hangups": lambda r: r["disconnect"]["before"]["server_cores_idle_window"],
        "cores_after_6_hangups": lambda r: r["disconnect"]["after_6_hangups"]["server_cores_idle_window"],
        "short_p50_before_hangups_s": lambda r: r["disconnect"]["before"]["short_sequential"]["p50_s"],
        "short_p50_after_6_hangups_s": lambda r: r["disconnect"]["after_6_hangups"]["short_sequential"]["p50_s"],
        "drain_exit_after_sigterm_s": lambda r: r["drain"]["exit_after_sigterm_s"],
    }
    return {name: spread([fn(r) for r in runs]) for name, fn in pick.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--run-offset", type=int, default=0, help="alternates which half goes first across calls")
    parser.add_argument(
        "--server-threads",
        type=int,
        default=1,
        help="the server's torch threads (1: steady on a shared machine, where spinning threads stall)",
    )
    parser.add_argument("--long-tokens", type=int, default=4000)
    parser.add_argument("--prefill-chunk", type=int, default=256)
    parser.add_argument("--short-tokens", type=int, default=4)
    parser.add_argument("--hangup-tokens", type=int, default=1024)
    parser.add_argument("--drain-timeout", type=float, default=5.0)
    parser.add_argument("--drain-tokens", type=int, default=4000)
    args = parser.parse_args()
    THREADS[0] = args.server_threads
    meter = RunMeter()
    prompt = long_prompt(args.long_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [one_run(i, args, prompt, Path(tmp)) for i in range(args.runs)]
    figures = {"summary": summarize(runs), "runs": runs}
    emit(append_result("serve_reliability", figures, meter, settings=vars(args), base=BASE))


if __name__ == "__main__":
    main()
