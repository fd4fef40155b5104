"""GLM-OCR serving throughput: ``fastsd ocr serve`` under N concurrent clients vs in-process, and layout mode.

Builds full-size random-weight GLM-OCR (zai-org/GLM-OCR's sizes) and PP-DocLayoutV3
(PaddlePaddle/PP-DocLayoutV3_safetensors' sizes) from the configs shipped in fastsd (nothing is
downloaded), then measures on the same synthetic pages (``--page`` px, ``--tokens`` cap per page,
greedy, repetition penalty 1.1):

  stock        transformers ``generate``, one page at a time (fastsd's engine with fast=False, batch 1)
  in-process   fastsd's fast decoder, pages in batches of ``--batch``
  server       ``fastsd ocr serve`` on loopback, ``--clients`` concurrent HTTP clients (dynamic batching);
               again with ``stream: true`` (SSE read as it comes; time to the first text is printed) and
               with sampling (temperature 0.7, top_p 0.9, top_k 50, a seed per page)
  whole-page   ``fastsd.ocr.ocr`` over a folder of the pages (what ``fastsd ocr --layout off`` does)
  layout       the same with ``layout=True`` (PP-DocLayoutV3 regions, each read with its prompt)

Random weights rarely emit EOS, so pages run to the cap and the rates compare like for like
(tokens/s is printed too). The random layout model's regions are whatever it finds (their count
per page is printed); its reading of them costs what real regions of that size cost.

    python benchmarks/ocr_serve.py                 # CUDA: full size
    python benchmarks/ocr_serve.py --tiny          # CPU smoke run with the tiny test models
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pages(n: int, size: tuple[int, int]):
    """Synthetic pages: lines of text on white, each page different."""
    from PIL import Image, ImageDraw

    out = []
    for i in range(n):
        im = Image.new("RGB", size, "white")
        pen = ImageDraw.Draw(im)
        for line in range(0, size[1] - 40, 28):
            pen.text((40, 20 + line), f"page {i} line {line // 28}: the quick brown fox jumps over", fill="black")
        out.append(im)
    return out


def data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def peak_gib(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed(fn, device: str):
    import torch

    reset(device)
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start, peak_gib(device)


def serving(args, glm: Path, device: str, docs: list, row):
    """Stock transformers one page at a time, fastsd in-process batched, and the server under N clients."""

    from fastsd.ocr.engine import PageJob, TransformersEngine
    from fastsd.ocr.serve import ServeLimits, start

    # stock transformers, one page at a time
    stock = TransformersEngine(
        str(glm), device=device, batch_size=1, max_new_tokens=args.tokens, fast=False, local_files_only=True
    )
    grid = stock.grid
    fitted = [im.resize(grid.fit(*im.size)) for im in docs]
    stock.run([PageJob(0, fitted[0], "Text Recognition:")])  # warm-up
    gens, secs, peak = timed(
        lambda: [stock.run([PageJob(i, fitted[i], "Text Recognition:")])[0] for i in range(args.stock_pages)], device
    )
    stock_rate = row("stock transformers", "batch 1", args.stock_pages, secs, sum(g.tokens for g in gens), peak)
    stock = None  # free its memory before the fast engine loads
    reset(device)

    # fastsd in-process, batched
    engine = TransformersEngine(
        str(glm), device=device, batch_size=args.batch, max_new_tokens=args.tokens, local_files_only=True
    )
    engine.run([PageJob(i, fitted[i], "Text Recognition:") for i in range(min(args.batch, len(fitted)))])  # warm-up
    jobs = [PageJob(i, fitted[i], "Text Recognition:") for i in range(args.pages)]

    def batched():
        out = []
        for s in range(0, len(jobs), args.batch):
            out += engine.run(jobs[s : s + args.batch])
        return out

    gens, secs, peak = timed(batched, device)
    inproc = row("fastsd in-process", f"batch {args.batch}", args.pages, secs, sum(g.tokens for g in gens), peak)

    # the server, N concurrent clients in another process (as real clients are: in this one they
    # would share its GIL with the server's batch loop, and their JSON/base64 work would slow it)
    limits = ServeLimits(max_tokens=args.tokens, max_batch=args.batch, batch_wait_ms=15)
    server = start(engine_obj=engine, port=0, limits=limits, quiet=True)
    sizes = [im.size for im in fitted[: args.pages]]

    def serve_all(n: int, extra: dict) -> dict:
        """Run the clients' process; it builds its requests, then sends when told. Its timings come back."""
        spec = {"url": server.base_url, "n": n, "clients": args.clients, "tokens": args.tokens, "extra": extra,
                "page": args.page, "sizes": sizes}  # fmt: skip
        child = subprocess.Popen([sys.executable, __file__, "--client-child", json.dumps(spec)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert child.stdout.readline().strip() == "ready", "the client process did not start"
        child.stdin.write("go\n")
        child.stdin.flush()
        out, _ = child.communicate(timeout=900)
        if child.returncode:
            raise RuntimeError(f"client process exit {child.returncode}")
        return json.loads(out.strip().splitlines()[-1])

    served = 0.0
    sampled = {"temperature": 0.7, "top_p": 0.9, "top_k": 50}
    for name, extra in [("", {}), (", streamed", {"stream": True}), (", sampled", sampled)]:
        serve_all(min(args.clients, args.pages), extra)  # warm-up
        batches0, restarts0 = server.batcher.batches, server.batcher.restarts
        server.batcher.largest_batch = 0
        reset(device)
        got = serve_all(args.pages, extra)
        secs, peak = got["seconds"], peak_gib(device)
        n_batches = server.batcher.batches - batches0
        note = f"{n_batches} batches ({server.batcher.restarts - restarts0} restarted), largest {server.batcher.largest_batch}"
        gathered = list(server.batcher.gathered)[-n_batches:] if n_batches else []
        note += " (" + ", ".join(f"{g.size} in {g.waited_ms:.0f} ms: {g.closed}, {g.still_receiving} coming"
                                 for g in gathered) + ")"  # fmt: skip
        if got["first_text"]:
            note += f"; first text after {sum(got['first_text']) / len(got['first_text']):.2f} s on average"
        rate = row("fastsd ocr serve" + name, f"{args.clients} clients", args.pages, secs, got["tokens"], peak, note)
        served = served or rate
    server.stop()
    return engine, served, inproc, stock_rate


def client_child(spec: dict) -> None:
    """The clients' process: ``spec["n"]`` requests over ``spec["clients"]`` threads; prints its timings."""
    import httpx

    w, h = (int(v) for v in spec["page"].lower().split("x"))
    docs = pages(spec["n"], (w, h))
    uris = [data_uri(im.resize(tuple(spec["sizes"][i % len(spec["sizes"])]))) for i, im in enumerate(docs)]
    extra, url = spec["extra"], spec["url"] + "/chat/completions"
    tokens, first_text, lock = [0], [], threading.Lock()

    def ask(c, i: int) -> None:
        content = [{"type": "image_url", "image_url": {"url": uris[i]}}, {"type": "text", "text": "Text Recognition:"}]
        body = {"model": "glm-ocr", "max_tokens": spec["tokens"], "messages": [{"role": "user", "content": content}],
                **extra, **({"seed": i} if "temperature" in extra else {})}  # fmt: skip
        if not extra.get("stream"):
            r = c.post(url, json=body)
            r.raise_for_status()
            with lock:
                tokens[0] += r.json()["usage"]["completion_tokens"]
            return
        sent, first = time.perf_counter(), None
        with c.stream("POST", url, json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if first is None and '"content":' in line and '"content": ""' not in line:
                    first = time.perf_counter() - sent
                if '"usage"' in line:
                    with lock:
                        tokens[0] += json.loads(line.removeprefix("data: "))["usage"]["completion_tokens"]
        with lock:
            first_text.append(first if first is not None else time.perf_counter() - sent)

    def client(mine: list[int]) -> None:
        with httpx.Client(timeout=600) as c:
            for i in mine:
                ask(c, i)

    n, k = spec["n"], spec["clients"]
    threads = [threading.Thread(target=client, args=(list(range(j, n, k)),)) for j in range(min(k, n))]
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"seconds": time.perf_counter() - start, "tokens": tokens[0], "first_text": first_text}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (smoke run)")
    ap.add_argument("--pages", type=int, default=64, help="pages per measurement")
    ap.add_argument("--stock-pages", type=int, default=8, help="pages for the (slow) stock measurement")
    ap.add_argument("--page", default="896x1120", help="page size WxH")
    ap.add_argument("--tokens", type=int, default=256, help="max new tokens per page / region")
    ap.add_argument("--batch", type=int, default=32, help="in-process batch and server batch limit")
    ap.add_argument("--clients", type=int, default=32, help="concurrent server clients")
    ap.add_argument("--layout-pages", type=int, default=16, help="pages for the layout measurement")
    ap.add_argument("--work", help="folder for the built models (default: a temp folder)")
    ap.add_argument("--only", choices=("all", "layout"), default="all",
                    help="layout: only whole-page vs layout mode, at the product's default batch limits")  # fmt: skip
    ap.add_argument("--cap", type=float, help="hard VRAM cap in GiB for the whole process (e.g. 12: a T4's budget)")
    ap.add_argument("--client-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client_child:
        client_child(json.loads(args.client_child))
        return 0

    import torch

    from fastsd.demo.tiny_layout import save_pp_doclayout
    from fastsd.demo.tiny_ocr import save_tiny_glm_ocr
    from fastsd.ocr import ocr
    from fastsd.ocr.engine import TransformersEngine
    from fastsd.ocr.layout import LayoutDetector, LayoutSettings

    device = "cpu" if args.tiny else "cuda"
    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA GPU: run with --tiny for a CPU smoke run", file=sys.stderr)
        return 2
    if args.tiny:
        args.pages, args.stock_pages, args.tokens, args.batch = min(args.pages, 8), min(args.stock_pages, 2), 8, 4
        args.clients, args.layout_pages = min(args.clients, 8), min(args.layout_pages, 2)
    w, h = (int(v) for v in args.page.lower().split("x"))
    work = Path(args.work or tempfile.mkdtemp(prefix="fastsd-ocr-bench-"))
    glm, lay = work / ("glm-tiny" if args.tiny else "glm-full"), work / ("layout-tiny" if args.tiny else "layout-full")
    t0 = time.perf_counter()
    if not (glm / "config.json").is_file():
        save_tiny_glm_ocr(glm, full=not args.tiny, dtype="float32" if args.tiny else "bfloat16")
    if not (lay / "config.json").is_file():
        # biased to find text/table/formula regions at its anchors: random heads would find none or the whole page
        bias = {"text": 3.0, "table": 2.5, "display_formula": 2.5, "paragraph_title": 2.5}
        save_pp_doclayout(lay, tiny=args.tiny, bias=bias, anchors=True, overrides={"mask_enhanced": False})
    print(f"models ready in {time.perf_counter() - t0:.0f} s under {work}", file=sys.stderr)

    if args.cap and device == "cuda":
        torch.cuda.set_per_process_memory_fraction(args.cap * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    docs = pages(max(args.pages, args.layout_pages), (w, h))
    rows: list[tuple[str, str, float, float, float | None, str]] = []

    def row(name: str, how: str, n: int, seconds: float, tokens: int, peak: float | None, note: str = "") -> float:
        rate = n / seconds
        rows.append((name, how, rate, tokens / seconds, peak, note))
        print(f"{name}: {rate:.2f} pages/s ({tokens / seconds:.0f} tok/s) peak {peak} GiB {note}", file=sys.stderr)
        return rate

    if args.only == "all":
        engine, served, inproc, stock_rate = serving(args, glm, device, docs, row)
    else:  # the product's defaults: a batch limit from (capped) free VRAM, the detector's own batch
        engine = TransformersEngine(str(glm), device=device, max_new_tokens=args.tokens, local_files_only=True)

    # whole-page vs layout mode through fastsd.ocr.ocr
    folder = work / "pages"
    folder.mkdir(exist_ok=True)
    for i, im in enumerate(docs[: args.layout_pages]):
        im.save(folder / f"p{i:03d}.png")
    settings = LayoutSettings(input_size=320) if args.tiny else LayoutSettings()
    layout_batch = {"batch_size": args.batch} if args.only == "all" else {}
    detector = LayoutDetector(str(lay), device=device, settings=settings, local_files_only=True, **layout_batch)
    detector.detect(docs[:2])  # warm-up

    def fresh(prefix: str) -> Path:  # a new output folder: ocr() resumes into an old one and skips its pages
        return Path(tempfile.mkdtemp(dir=work, prefix=prefix))

    whole, secs, peak = timed(
        lambda: list(
            ocr(
                [str(folder)],
                out=fresh("out-whole-"),
                engine_obj=engine,
                progress=False,
            )
        ),
        device,
    )
    row("whole-page mode", "ocr()", len(whole), secs, sum(r.tokens for r in whole), peak)
    run = ocr(
        [str(folder)],
        out=fresh("out-layout-"),
        engine_obj=engine,
        layout=True,
        layout_obj=detector,
        progress=False,
    )
    (res, secs, peak) = timed(lambda: list(run), device)
    regions = sum(len(r.regions or []) for r in res) / max(1, len(res))
    _, lsecs, _ = timed(lambda: detector.detect(docs[: args.layout_pages]), device)
    row(
        "layout mode", "ocr(layout=True)", len(res), secs, sum(r.tokens for r in res), peak,
        f"{regions:.1f} regions/page ({regions * len(res) / secs:.1f} regions/s); "
        f"layout alone {args.layout_pages / lsecs:.1f} pages/s",
    )  # fmt: skip

    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\n{gpu}, page {w}x{h}, cap {args.tokens} tokens, random weights ({'tiny' if args.tiny else 'full size'})\n")
    print("| variant | how | pages/s | tokens/s | peak VRAM GiB | note |")
    print("|---|---|---|---|---|---|")
    for name, how, rate, tps, pk, note in rows:
        print(f"| {name} | {how} | {rate:.2f} | {tps:.0f} | {pk if pk is not None else '-'} | {note} |")
    if args.only == "all":
        print(
            f"\nserver / in-process: {served / inproc:.2f}x (target >= 0.8); "
            f"server / stock: {served / stock_rate:.1f}x (target >= 5)"
        )
    if args.cap:
        print(f"whole process under a hard cap of {args.cap} GiB (torch.cuda.set_per_process_memory_fraction)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
