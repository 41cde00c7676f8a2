"""The ViT-S/16 teacher (224 px, 100 classes) in eager torch vs onnxruntime under several session settings
and exporters, interleaved round after round in one process, with the other processes' CPU load per round
(issue 16: is the teacher-under-onnxruntime 2.1x of the issue's table reproducible, and with what?).

Rows: eager torch (the baseline); the dynamo exporter (what devit_ext exports with) at 2 threads with
spinning off / on and at 1 thread; the TorchScript exporter (opset 17) spinning off / on; and, when
onnxruntime.transformers is importable, its ViT graph optimiser on the TorchScript export.
Run: PYTHONPATH=$PWD python scripts/ort_session_settings.py [batches, default 1,8] (ROUNDS=4)
"""
import io
import os
import statistics
import sys
import time
import warnings

import onnxruntime as ort
import torch

from devit_ext.bench._e2e_models import CPU_TEACHER, make_teacher
from devit_ext.bench.e2e_cpu import Guard
from devit_ext.engines.ort_sender import onnx_bytes


def session(model: bytes, threads: int, spin: bool):
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.log_severity_level = 3
    s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])


def torchscript_bytes(module, example) -> bytes:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), f, input_names=["images"], output_names=["logits"],
                          opset_version=17, dynamo=False, dynamic_axes={"images": {0: "b"}})
    return f.getvalue()


def vit_optimised(model: bytes) -> bytes | None:
    try:
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError:
        return None
    import onnx

    opt = optimize_model(onnx.load_from_string(model), model_type="vit", num_heads=6, hidden_size=384,
                         opt_level=0)
    print("  transformers optimiser fused:", opt.get_fused_operator_statistics(), flush=True)
    return opt.model.SerializeToString()


def main():
    torch.set_num_threads(2)
    batches = [int(b) for b in (sys.argv[1] if len(sys.argv) > 1 else "1,8").split(",")]
    rounds = int(os.environ.get("ROUNDS", 4))
    t = make_teacher(CPU_TEACHER).eval()
    ex = torch.randn(2, 3, 224, 224)
    dyn, ts = onnx_bytes(t, ex, out_name="logits"), torchscript_bytes(t, ex)
    rows = {"eager": t,
            "dynamo t2 spin0": session(dyn, 2, False), "dynamo t2 spin1": session(dyn, 2, True),
            "dynamo t1 spin0": session(dyn, 1, False),
            "torchscript t2 spin0": session(ts, 2, False), "torchscript t2 spin1": session(ts, 2, True)}
    vit = vit_optimised(ts)
    if vit is not None:
        rows["ts + vit optimiser t2 spin0"] = session(vit, 2, False)
    for b in batches:
        x = torch.randn(b, 3, 224, 224, generator=torch.Generator().manual_seed(b))
        with torch.inference_mode():
            ref = t(x)
            for n, f in rows.items():
                err = (f(x) - ref).abs().max().item()
                print(f"  batch {b} {n}: max abs err vs eager {err:.1e}", flush=True)
            T = {n: [] for n in rows}
            loads = []
            for _ in range(rounds):
                with Guard() as g:
                    for n, f in rows.items():
                        t0 = time.perf_counter()
                        f(x)
                        T[n].append(time.perf_counter() - t0)
                loads.append(g.others_cores)
        base = T["eager"]
        print(f"batch {b}: others' load per round {[round(v, 2) for v in loads]} cores")
        for n, v in T.items():
            ratio = statistics.median([e / r for e, r in zip(base, v)])
            print(f"  {n:28s} {statistics.median(v) * 1e3:8.1f} ms  {ratio:.2f}x eager", flush=True)


if __name__ == "__main__":
    main()
