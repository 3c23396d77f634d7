"""What the weights digest costs when a model file loads: ``read_model_file`` (torch.load with
weights_only, then the SHA-256 of the weights checked) against the same load without the check,
one after the other in one process, for each backbone; and the same for an exported ONNX file
(ONNX Runtime's session, then the graph digest). Medians of ``--rounds``, every run shown.

    python benchmarks/bench_model_digest.py --rounds 5
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def timed(fn, rounds):
    runs = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), runs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    args = ap.parse_args()
    from geodet.config import ModelConfig
    from geodet.model import build_model, save_model
    from geodet.model.file import weights_sha256
    from geodet.model.onnx import export_core, graph_sha256, load_onnx, write_metadata

    print(f"CPU: {torch.cpu.get_capabilities().get('cpu_name')}, avx512_f "
          f"{torch.cpu.get_capabilities().get('avx512_f')}; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as d:
        for bb in args.backbones:
            model = build_model(ModelConfig(backbone=bb, classes=["car"]), bands=[1, 2, 3], tile_size=256, overlap=32,
                                load_pretrained=False)
            path = save_model(model, Path(d) / f"{bb}.pt")
            size = path.stat().st_size / 2**20

            def plain():
                torch.load(path, map_location="cpu", weights_only=True)

            def checked():
                payload = torch.load(path, map_location="cpu", weights_only=True)
                assert weights_sha256(payload["state_dict"]) == payload["weights_sha256"]

            plain()  # page cache warm for both
            a, ra = timed(plain, args.rounds)
            b, rb = timed(checked, args.rounds)
            print(f"{bb} model.pt ({size:.0f} MiB): load {a:.3f} s, load + digest {b:.3f} s: {b / a:.2f}x "
                  f"(runs {' '.join(f'{x:.3f}' for x in ra)} / {' '.join(f'{x:.3f}' for x in rb)})")
            onnx_path = Path(d) / f"{bb}.onnx"
            export_core(model, onnx_path)
            write_metadata(onnx_path, model.card, {"precision": "fp32"})
            import onnx
            import onnxruntime as ort

            def session():
                ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

            def loaded():
                load_onnx(onnx_path)

            def digest_only():
                graph_sha256(onnx.load(str(onnx_path)))

            session()
            a, ra = timed(session, args.rounds)
            b, rb = timed(loaded, args.rounds)
            c, rc = timed(digest_only, args.rounds)
            print(f"{bb} .onnx ({onnx_path.stat().st_size / 2**20:.0f} MiB): session {a:.3f} s, load_onnx (session, "
                  f"file hash, graph digest) {b:.3f} s: {b / a:.2f}x; graph digest alone {c:.3f} s "
                  f"(runs {' '.join(f'{x:.3f}' for x in ra)} / {' '.join(f'{x:.3f}' for x in rb)} / "
                  f"{' '.join(f'{x:.3f}' for x in rc)})")


if __name__ == "__main__":
    main()
