"""Every data-safety case of issue 13, run as a user would: command, exit code, last stderr line.

Each case runs the real ``lplr`` command in a subprocess on small generated inputs in a fresh
temporary folder, and says whether the input was left byte-identical. The table (markdown) goes
to stdout. About two minutes on a 2-core machine.

Usage::

    python benchmarks/safety_cases.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

CLUSTER = ["--workers", "1", "--threads-per-worker", "1", "--memory-limit", "2GiB"]


def digest(root: Path) -> str:
    """One sha256 over every file under ``root`` (names and bytes)."""
    h = hashlib.sha256()
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for p in paths:
        h.update(str(p.relative_to(root.parent)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def run(
    args: list[str], *, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "lplr_dask.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= 220 else line[:217] + "..."


class Table:
    def __init__(self, root: Path):
        self.root = root
        self.rows: list[tuple[str, str, str, str, str]] = []

    def case(
        self, name: str, args: list[str], *, protect: Path | None = None, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        before = digest(protect) if protect is not None else None
        r = run(args, **kw)  # type: ignore[arg-type]
        args = list(args)
        kept = "" if protect is None else ("yes" if digest(protect) == before else "**NO**")
        if args[-len(CLUSTER) :] == CLUSTER:
            args = args[: -len(CLUSTER)]
        shown = " ".join(
            shlex.quote(os.path.relpath(a, self.root) if a.startswith(str(self.root)) else a) for a in args
        )
        self.rows.append((name, f"`lplr {shown}`", str(r.returncode), kept, last_line(r.stderr).replace("|", "\\|")))
        return r

    def note(self, name: str, what: str, code: str, kept: str, line: str) -> None:
        self.rows.append((name, what, code, kept, line.replace("|", "\\|")))

    def markdown(self) -> str:
        head = "| case | command | exit | input unchanged | last stderr line |\n|---|---|---|---|---|\n"
        return head + "\n".join("| " + " | ".join(r) + " |" for r in self.rows)


def interrupted(t: Table, src: Path, out: Path, sig: int, stage: str) -> None:
    """Start a compress, send ``sig`` once the store reaches ``stage``, then resume it."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)  # a store left by the case before would be seen at once
    args = ["compress", str(src), str(out), "--rank", "16", "--overwrite", *CLUSTER]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lplr_dask.cli", *args],
        stderr=subprocess.PIPE,
        text=True,
        stdout=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if zarr.open_group(str(out), mode="r").attrs["lplr"]["stage"] == stage:
                break
        except Exception:  # noqa: BLE001 - not created yet
            pass
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    name = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}[sig]
    where = {"started": "pass 1", "basis": "pass 2"}[stage]
    t.note(
        f"D2 {name} in {where}",
        f"`lplr compress I.zarr int.lplr.zarr --rank 16` + {name}",
        str(proc.returncode),
        "",
        last_line(err),
    )
    r = t.case(
        f"D2 resume after {name} in {where}", ["compress", str(src), str(out), "--rank", "16", "--resume", *CLUSTER]
    )
    if r.returncode == 0:
        done = zarr.open_group(str(out))
        ref = zarr.open_group(str(src.parent / "ref.lplr.zarr"))
        same = all(np.array_equal(done[f"{m}/codes"][...], ref[f"{m}/codes"][...]) for m in ("L", "R"))
        t.rows[-1] = (*t.rows[-1][:4], t.rows[-1][4] + f" (codes identical to an undisturbed run: {same})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="work in DIR and keep it (default: a temporary folder)")
    opts = parser.parse_args(argv)
    root = opts.keep or Path(tempfile.mkdtemp(prefix="lplr-safety-"))
    root.mkdir(parents=True, exist_ok=True)
    t = Table(root)
    A = root / "A.zarr"
    assert (
        run(
            ["generate", str(A), "--shape", "2000x1500", "--rank", "16", "--chunks", "512x512", "--overwrite", *CLUSTER]
        ).returncode
        == 0
    )
    par = root / "par"
    par.mkdir(exist_ok=True)
    a = par / "a.zarr"
    run(["generate", str(a), "--shape", "300x200", "--chunks", "128x128", "--overwrite", *CLUSTER])
    S = root / "S.lplr.zarr"
    assert run(["compress", str(A), str(S), "--rank", "8", "--overwrite", *CLUSTER]).returncode == 0

    # D1: outputs that would destroy the input
    t.case("D1 output is the input", ["compress", str(A), str(A), "--rank", "8", "--overwrite", *CLUSTER], protect=A)
    t.case(
        "D1 output holds the input", ["compress", str(a), str(par), "--rank", "8", "--overwrite", *CLUSTER], protect=par
    )
    t.case(
        "D1 output inside the input", ["compress", str(A), str(A / "x.lplr.zarr"), "--rank", "8", *CLUSTER], protect=A
    )
    t.case("D1 convert onto itself", ["convert", str(A), str(A), "--overwrite", *CLUSTER], protect=A)
    t.case("D1 decompress onto the store", ["decompress", str(S), str(S), "--overwrite", *CLUSTER], protect=S)
    t.case("D1 decompress onto the source", ["decompress", str(S), str(A), "--overwrite", *CLUSTER], protect=A)
    foreign = root / "thesis"
    foreign.mkdir(exist_ok=True)
    (foreign / "thesis.tex").write_text("years of work")
    t.case(
        "D1 --overwrite of foreign data",
        ["compress", str(A), str(foreign), "--rank", "8", "--overwrite", *CLUSTER],
        protect=foreign,
    )

    # D2: signals
    big_enough = root / "I.zarr"  # a few seconds a pass, so that a signal lands inside one
    run(
        [
            "generate",
            str(big_enough),
            "--shape",
            "8192x8192",
            "--rank",
            "16",
            "--chunks",
            "1024x1024",
            "--overwrite",
            *CLUSTER,
        ]
    )
    run(["compress", str(big_enough), str(root / "ref.lplr.zarr"), "--rank", "16", "--overwrite", *CLUSTER])
    for sig, stage in ((signal.SIGINT, "started"), (signal.SIGINT, "basis"), (signal.SIGTERM, "basis")):
        interrupted(t, big_enough, root / "int.lplr.zarr", sig, stage)

    # D3: damaged chunks
    for damage in ("deleted", "truncated", "bit-flipped"):
        D = root / f"{damage}.lplr.zarr"
        run(["compress", str(A), str(D), "--rank", "8", "--overwrite", *CLUSTER])
        chunk = D / "R" / "codes" / "c" / "0" / "1"
        if damage == "deleted":
            chunk.unlink()
        elif damage == "truncated":
            chunk.write_bytes(chunk.read_bytes()[: max(1, chunk.stat().st_size // 2)])
        else:
            data = bytearray(chunk.read_bytes())
            data[len(data) // 2] ^= 0x10
            chunk.write_bytes(bytes(data))
        t.case(f"D3 {damage} chunk: info", ["info", str(D)])
        t.case(f"D3 {damage} chunk: evaluate", ["evaluate", str(A), str(D), *CLUSTER])
        t.case(
            f"D3 {damage} chunk: decompress",
            ["decompress", str(D), str(root / f"{damage}.zarr"), "--overwrite", *CLUSTER],
        )
        t.case(f"D3 {damage} chunk: verify", ["verify", str(D)])
    t.case("D3 clean store: verify", ["verify", str(S)])

    # D8: a regenerated input on resume
    B = root / "B.zarr"
    run(
        [
            "generate",
            str(B),
            "--shape",
            "2000x1500",
            "--rank",
            "16",
            "--chunks",
            "512x512",
            "--seed",
            "1",
            "--overwrite",
            *CLUSTER,
        ]
    )
    R8 = root / "d8.lplr.zarr"
    run(["compress", str(B), str(R8), "--rank", "8", "--overwrite", *CLUSTER])
    g = zarr.open_group(str(R8), mode="r+")
    meta = dict(g.attrs["lplr"])
    meta.update(stage="basis", complete=False)  # as if interrupted in pass 2 ...
    g.attrs["lplr"] = meta
    run(
        [
            "generate",
            str(B),
            "--shape",
            "2000x1500",
            "--rank",
            "16",
            "--chunks",
            "512x512",
            "--seed",
            "2",
            "--overwrite",
            *CLUSTER,
        ]
    )
    t.case("D8 resume of a regenerated input", ["compress", str(B), str(R8), "--rank", "8", "--resume", *CLUSTER])

    # D9: a second writer
    lock = R8 / ".lplr-lock.json"
    lock.write_text(
        json.dumps(
            {
                "job_id": "a1b2c3",
                "host": os.uname().nodename,
                "pid": os.getpid(),
                "started": "now",
                "command": "lplr compress ...",
            }
        )
    )
    t.case("D9 second writer", ["compress", str(A), str(R8), "--rank", "8", "--overwrite", *CLUSTER], protect=R8)
    lock.unlink()

    # D4/D5: huge and tiny values
    for name, factor in (("D5 values x1e-30", 1e-30), ("D4 values x2e19", 2e19)):
        X = root / f"x{factor:g}.zarr"
        src = zarr.open_array(str(A), mode="r")
        out = zarr.create_array(str(X), shape=src.shape, chunks=src.chunks, dtype="f4", overwrite=True)
        out[...] = (np.asarray(src[...], dtype=np.float64) * factor).astype(np.float32)
        r = t.case(
            name,
            [
                "compress",
                str(X),
                str(root / "x.lplr.zarr"),
                "--rank",
                "8",
                "--overwrite",
                "--evaluate",
                "--json",
                *CLUSTER,
            ],
        )
        if r.returncode == 0:
            res = json.loads(r.stdout)
            t.rows[-1] = (*t.rows[-1][:4], f"estimate {res['error_estimate']:.4g}, exact {res['error_exact']:.4g}")

    # D6/D7: workers that cannot hold a task
    big = root / "big.zarr"
    zarr.create_array(str(big), shape=(16384, 16384), chunks=(16384, 16384), dtype="f4", overwrite=True)
    t.case(
        "D7 task larger than the workers' memory",
        [
            "compress",
            str(big),
            str(root / "big.lplr.zarr"),
            "--rank",
            "8",
            "--workers",
            "1",
            "--threads-per-worker",
            "1",
            "--memory-limit",
            "512MiB",
        ],
    )

    # D10: attrs
    for name, edit in (
        ('D10 complete: "no"', lambda m: m.update(complete="no")),
        ("D10 version: true", lambda m: m.update(version=True)),
        ("D10 unknown key in quantizer.L", lambda m: m["quantizer"]["L"].update(future_option=1)),
        ("D10 source.shape not R's", lambda m: m["source"].update(shape=[m["source"]["shape"][0], 7])),
    ):
        E = root / "attrs.lplr.zarr"
        run(["compress", str(A), str(E), "--rank", "8", "--overwrite", *CLUSTER])
        g = zarr.open_group(str(E), mode="r+")
        meta = json.loads(json.dumps(g.attrs["lplr"]))
        edit(meta)
        g.attrs["lplr"] = meta
        t.case(name, ["info", str(E)])

    # D11/D12: bad inputs
    strings = root / "strings.npy"
    np.save(strings, np.array([["a", "b"], ["c", "d"]]))
    t.case("D11 string dtype", ["compress", str(strings), str(root / "s.lplr.zarr"), "--rank", "1", *CLUSTER])
    t.case(
        "D11 --bits-per-entry inf", ["compress", str(A), str(root / "s.lplr.zarr"), "--bits-per-entry", "inf", *CLUSTER]
    )
    notpem = root / "ca.pem"
    notpem.write_text("not a certificate")
    t.case(
        "D11 non-PEM TLS files",
        [
            "compress",
            str(A),
            str(root / "s.lplr.zarr"),
            "--rank",
            "8",
            "--scheduler",
            "tls://127.0.0.1:1",
            "--tls-ca-file",
            str(notpem),
            "--tls-cert",
            str(notpem),
            "--tls-key",
            str(notpem),
        ],
    )
    st = root / "huge.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 2**62]}}).encode()
    st.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
    t.case(
        "D11 safetensors header claiming 2^62 bytes",
        ["compress", f"{st}:w", str(root / "s.lplr.zarr"), "--rank", "8", *CLUSTER],
    )
    T = root / "trunc.zarr"
    run(["convert", str(A), str(T), "--overwrite", *CLUSTER])
    first = T / "c" / "0" / "0"
    first.write_bytes(first.read_bytes()[:10])
    t.case(
        "D12 truncated input chunk",
        ["compress", str(T), str(root / "s.lplr.zarr"), "--rank", "8", "--overwrite", *CLUSTER],
    )
    C = root / "corrupt.zarr"
    run(["convert", str(A), str(C), "--overwrite", *CLUSTER])
    (C / "zarr.json").write_text("{not json")
    t.case(
        "D12 corrupt zarr.json", ["compress", str(C), str(root / "s.lplr.zarr"), "--rank", "8", "--overwrite", *CLUSTER]
    )
    M = root / "noscale.lplr.zarr"
    run(["compress", str(A), str(M), "--rank", "8", "--overwrite", *CLUSTER])
    import shutil

    shutil.rmtree(M / "L" / "scale")
    t.case("D12 missing L/scale", ["info", str(M)])
    t.case(
        "D12 --resume onto a plain array", ["compress", str(A), str(T), "--rank", "8", "--resume", *CLUSTER], protect=T
    )
    t.case(
        "D12 usage error (bad quantizer)",
        ["compress", str(A), str(root / "s.lplr.zarr"), "--rank", "8", "--quantizer", "nonsense", *CLUSTER],
    )
    print(t.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
