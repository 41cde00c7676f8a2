"""The local engine's onnxruntime sender vs the 4 sub-models run one after the other in onnxruntime
(the e2e cpu bench's two rows only), interleaved, with the other processes' CPU load per round.
Run: PYTHONPATH=$PWD python scripts/ort_sender_vs_sequential.py"""
import time, statistics, torch
from devit_ext.bench._e2e_models import make_teacher, build_devit, default_cpu_shape, _inputs, CPU_TEACHER
from devit_ext.bench.e2e_cpu import _ort_fn, _Tokens, Guard
from devit_ext.engines import collaborate
t = make_teacher(CPU_TEACHER); shape, _ = default_cpu_shape(t); m = build_devit(t, [shape]*4); del t
ex = _inputs(2, m, "cpu", torch.float32, n=1)[0]
subs = [_ort_fn(_Tokens(s), ex) for s in m.submodels]
seq = lambda x: m.fusion([f(x) for f in subs])
eng = lambda x: collaborate(m, x, backend="onnxruntime")
for b in (8, 1):
    xs = _inputs(b, m, "cpu", torch.float32, n=2)
    with torch.inference_mode():
        eng(xs[0]); seq(xs[0])
        T = {"seq": [], "eng": []}; L = []
        for r in range(6):
            with Guard() as g:
                for n, f in (("seq", seq), ("eng", eng)):
                    t0 = time.perf_counter(); f(xs[r % 2]); T[n].append(time.perf_counter() - t0)
            L.append(g.others_cores)
            print(b, r, {k: round(v[-1]*1e3) for k, v in T.items()}, round(g.others_cores, 2), flush=True)
    ms = {k: statistics.median(v)*1e3 for k, v in T.items()}
    rat = statistics.median([a/b_ for a, b_ in zip(T["seq"], T["eng"])])
    print(f"batch {b}: seq {ms['seq']:.0f} ms, engine {ms['eng']:.0f} ms, median per-round ratio seq/engine {rat:.2f}, others {statistics.median(L):.2f} cores", flush=True)
