"""The fuzz runner: fork servers (fresh Pythons that import torch and ckptviz once, then fork one child per
case), a per-case wall timeout and address-space limit, and the classification of each case.

Classes: ok, checkpoint_error (fine); raw_exception, crash, hang, memory, model_changed, value_mismatch,
accepted_but_reference_rejects (defects); reference_crash, reference_hang (the reference reader itself
died on the file: not ckptviz's defect, reported apart)."""

from __future__ import annotations

import json
import os
import random
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

DEFECTS = ("crash", "hang", "memory", "raw_exception", "model_changed", "value_mismatch",
           "accepted_but_reference_rejects")
FINE = ("ok", "checkpoint_error", "reference_crash", "reference_hang", "reference_only")
RANK = {c: i for i, c in enumerate(("ok", "checkpoint_error", "reference_only", "reference_crash", "reference_hang",
                                    "accepted_but_reference_rejects", "value_mismatch", "model_changed",
                                    "raw_exception", "memory", "hang", "crash"))}
REFERENCE = {"zip.pt": "torch", "legacy.pt": "torch", "train.ckpt": "torch", "model.safetensors": "safetensors",
             "script.pt": "jit", "hub_st": "hub_st", "hub_bin": "hub_bin", "dcp": None, "deepspeed": None}
# torch.jit.load compiles code/ and reads constants.pkl, neither of which holds weights ckptviz reads; it also
# looks each object attribute of data.pkl up in the class types compiled from code/ ("Argument passed to at()
# was not in the map" for an attribute the class does not declare), a schema ckptviz does not compile; errors of
# its compiler (jit/frontend, or a source range "... here:" above a File line, as repr() writes it) come from
# damaged code/ entries
JIT_CODE_ERRORS = ("code/", "constants.pkl", "Unknown type name", "Unexpected token", "expected a valid token",
                   "Argument passed to at() was not in the map", "jit/frontend/", r" here:\n  File ")
REPO = Path(__file__).resolve().parents[2]
DEFAULT_TIMEOUT = 10.0
DEFAULT_HEADROOM = 2 << 30  # bytes of address space a child may add to what the warm server maps


# ---- the server (runs in its own Python) ---------------------------------------------------------
def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


class Server:
    def __init__(self, seeds_dir: Path, headroom: int):
        import warnings

        import torch

        warnings.simplefilter("ignore")
        torch.set_num_threads(1)
        from . import verbs  # imports ckptviz

        self.verbs = verbs
        self.seeds = {name: seeds_dir / name for name in REFERENCE if (seeds_dir / name).exists()}
        self.work = Path(tempfile.mkdtemp(prefix="ckptviz-fuzz-"))
        # Warm up: every verb once on every seed in this process, so lazy imports and caches are paid here,
        # not per child. A seed the reference reader refuses is not reference-checked.
        self.refs: dict[str, str | None] = {}
        for name, p in self.seeds.items():
            ref = REFERENCE[name]
            try:
                verbs.reference_read(str(p), ref) if ref else None
            except Exception:
                ref = None
            self.refs[name] = ref
            verbs.exercise(str(p), str(p), None, lambda e: None)
        self.limit = _vm_size() + headroom

    # one case in a child -------------------------------------------------------------------------
    def run_child(self, target, timeout: float) -> dict:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            try:
                os.close(r)
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                resource.setrlimit(resource.RLIMIT_AS, (self.limit, self.limit))
                out = os.fdopen(w, "w", buffering=1)

                def emit(ev: dict) -> None:
                    out.write(json.dumps(ev) + "\n")

                outcomes = target(emit)
                emit({"ev": "done", "outcomes": outcomes})
                out.flush()
            except BaseException as e:  # noqa: BLE001
                try:
                    cls = "memory" if isinstance(e, MemoryError) else "raw_exception"
                    emit({"ev": "done", "outcomes": [{"verb": "harness", "cls": cls,
                                                      "type": type(e).__name__, "msg": str(e)[:300]}]})
                    out.flush()
                except BaseException:  # noqa: BLE001
                    pass
            os._exit(0)
        os.close(w)
        deadline, buf, killed = time.monotonic() + timeout, b"", False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
            ready, _, _ = select.select([r], [], [], left)
            if ready:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                buf += chunk
        os.close(r)
        _, status = os.waitpid(pid, 0)
        events = [json.loads(x) for x in buf.decode(errors="replace").splitlines() if x.strip().startswith("{")]
        last = next((e["verb"] for e in reversed(events) if e.get("ev") == "verb"), None)
        done = next((e for e in events if e.get("ev") == "done"), None)
        if killed:
            cls, outcomes = "hang", [{"verb": last, "cls": "hang", "msg": f"no result after {timeout:.0f} s"}]
        elif os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            cls = "memory" if sig == signal.SIGKILL else "crash"
            outcomes = [{"verb": last, "cls": cls, "msg": f"killed by {signal.Signals(sig).name}"}]
        elif done is None:
            cls, outcomes = "crash", [{"verb": last, "cls": "crash", "msg": f"exited {os.WEXITSTATUS(status)}"
                                       " without a result"}]
        else:
            outcomes = done["outcomes"]
            cls = max((o["cls"] for o in outcomes), key=RANK.__getitem__, default="ok")
        if cls in ("crash", "hang") and last == "reference":
            cls = f"reference_{cls}"
        return {"cls": cls, "verb": last, "outcomes": outcomes}

    # cases ---------------------------------------------------------------------------------------
    def make_case(self, seed: int, i: int) -> tuple[Path, str, list[str]]:
        """Write case ``i`` of ``seed`` under the work folder: (path, seed name, mutation descriptions)."""
        from .mutators import kind_of, mutate_file

        rng = random.Random(f"{seed}:{i}")
        name = rng.choice(sorted(self.seeds))
        src = self.seeds[name]
        case = self.work / f"case{i}"
        shutil.rmtree(case, ignore_errors=True)
        case.mkdir()
        dst = case / name
        if src.is_dir():
            shutil.copytree(src, dst)
            files = sorted(p for p in dst.rglob("*") if p.is_file() and p.suffix != ".py")
            target = rng.choice(files)
            rel = str(target.relative_to(dst))
        else:
            shutil.copyfile(src, dst)
            target, rel = dst, name
        data = target.read_bytes()
        new, descs = mutate_file(rng, data, kind_of(target.name, data))
        target.write_bytes(new)
        return dst, name, [f"{rel}: {d}" for d in descs]

    def fuzz(self, seed: int, start: int, stop: int, timeout: float, out: str | None) -> Iterator[dict]:
        for i in range(start, stop):
            path, name, descs = self.make_case(seed, i)
            ref = self.refs[name]
            res = self.run_child(lambda emit, p=str(path), s=str(self.seeds[name]), ref=ref, full=i % 3 == 0:
                                 self.verbs.exercise(p, s, ref, emit, full), timeout)
            res.update(i=i, seed_name=name, mutations=descs)
            if res["cls"] == "accepted_but_reference_rejects" and name == "script.pt" and (all(
                    d.startswith("script.pt: zip_edit: zip ") and "/data" not in d for d in descs)
                    or any(w in str(res["outcomes"]) for w in JIT_CODE_ERRORS)):
                res["cls"] = "reference_only"  # torch.jit.load compiles code/ and constants ckptviz never reads
            if out and res["cls"] in DEFECTS:
                save_case(path, res, Path(out), f"{res['cls']}-s{seed}-{i}")
            shutil.rmtree(path.parent, ignore_errors=True)
            yield res

    def selftest(self, what: str, timeout: float) -> dict:
        def target(emit):
            emit({"ev": "verb", "verb": f"selftest:{what}"})
            if what == "segv":
                os.kill(os.getpid(), signal.SIGSEGV)
            elif what == "sleep":
                time.sleep(3600)
            elif what == "raise":
                raise ValueError("a raw error")
            elif what == "memory":
                bytearray(self.limit)
            elif what == "exit":
                os._exit(3)
            return []

        return self.run_child(target, timeout)


def save_case(path: Path, res: dict, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    dst = out / (stem + (path.suffix if path.is_file() else ".d"))
    if path.is_dir():
        shutil.copytree(path, dst, dirs_exist_ok=True)
    else:
        shutil.copyfile(path, dst)
    (out / (stem + ".json")).write_text(json.dumps({**res, "file": str(dst)}, indent=1))


def serve(seeds_dir: str, headroom: int) -> None:
    """The server loop: JSON requests on stdin, JSON results on stdout (one line each)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stray prints must not corrupt the protocol
    srv = Server(Path(seeds_dir), headroom)
    proto.write(json.dumps({"ready": True, "limit": srv.limit}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        t = req.get("timeout", DEFAULT_TIMEOUT)
        if req["op"] == "fuzz":
            for res in srv.fuzz(req["seed"], req["start"], req["stop"], t, req.get("out")):
                proto.write(json.dumps(res) + "\n")
        elif req["op"] == "file":
            res = srv.run_child(lambda emit, req=req: srv.verbs.exercise(req["path"], req.get("seed_path"),
                                                                         req.get("ref"), emit), t)
            proto.write(json.dumps(res) + "\n")
        elif req["op"] == "selftest":
            proto.write(json.dumps(srv.selftest(req["what"], t)) + "\n")
        proto.write(json.dumps({"end": True}) + "\n")
    shutil.rmtree(srv.work, ignore_errors=True)


# ---- the client (the test or CLI process) ---------------------------------------------------------
class Client:
    """One fork server process; ``request`` sends one request and yields its results."""

    def __init__(self, seeds_dir: Path, headroom: int = DEFAULT_HEADROOM):
        env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz.harness", str(seeds_dir), str(headroom)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, env=env, text=True,
                                     bufsize=1)
        hello = self.proc.stdout.readline()
        if not hello:
            raise RuntimeError("the fuzz server did not start")
        self.limit = json.loads(hello)["limit"]
        self.fd = self.proc.stdout.fileno()
        self.pending = b""

    def lines(self) -> list[str]:
        """The complete lines available now (for select loops; the text wrapper is not used after hello)."""
        chunk = os.read(self.fd, 1 << 20)
        if not chunk:
            raise RuntimeError("a fuzz server died")
        self.pending += chunk
        *full, self.pending = self.pending.split(b"\n")
        return [x.decode() for x in full if x.strip()]

    def send(self, req: dict) -> None:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()

    def results(self) -> Iterator[dict]:
        while True:
            for line in self.lines():
                msg = json.loads(line)
                if msg.get("end"):
                    return
                yield msg

    def request(self, req: dict) -> list[dict]:
        self.send(req)
        return list(self.results())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(30)


def fuzz(seeds_dir: Path, cases: int, seed: int, workers: int = 2, timeout: float = DEFAULT_TIMEOUT,
         out: Path | None = None, chunk: int = 25, progress: bool = False) -> list[dict]:
    """Run cases [0, cases) of ``seed`` over ``workers`` fork servers; one result dict per case."""
    clients = [Client(seeds_dir) for _ in range(workers)]
    try:
        todo = list(range(0, cases, chunk))
        busy: dict[int, Client] = {}
        results: list[dict] = []

        def give(c: Client) -> None:
            a = todo.pop(0)
            c.send({"op": "fuzz", "seed": seed, "start": a, "stop": min(a + chunk, cases), "timeout": timeout,
                    "out": str(out) if out else None})
            busy[c.fd] = c

        for c in clients:
            if todo:
                give(c)
        while busy:
            ready, _, _ = select.select(list(busy), [], [])
            for fd in ready:
                c = busy[fd]
                for line in c.lines():
                    msg = json.loads(line)
                    if msg.get("end"):
                        del busy[fd]
                        if todo:
                            give(c)
                    else:
                        results.append(msg)
                        if progress and len(results) % 500 == 0:
                            print(f"{len(results)}/{cases}", file=sys.stderr, flush=True)
        return sorted(results, key=lambda r: r["i"])
    finally:
        for c in clients:
            c.close()


def summary(results: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        out[r["cls"]] = out.get(r["cls"], 0) + 1
    return out


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_HEADROOM)
