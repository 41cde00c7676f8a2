"""`devit-ext bench kernels` (CPU, any device): what authentication costs per message (docs/security.md).

Per token message (int8, one token per image, batch 1 and 8, widths 192 and
384): `wire.seal` (the worker: flag + HMAC-SHA256 tag appended, one copy) and
`wire.decode(key=...)` against plain `decode` (the aggregator: the tag checked
before the fields), and per batch control message the sha256 of the images it
announces (3 x 224 x 224 uint8 per image) + its 16-byte tag. Median of many
calls on the same tensors; the bytes column is what travels.
"""
from __future__ import annotations

import torch

from .. import auth, ops, wire
from ..engines import _proto
from .timing import Table, median_time

KEY = bytes(range(32))
H = "ab" * 32


def run(device: str = "cpu", quick: bool = False) -> list[Table]:
    iters = 50 if quick else 300
    t = Table("auth cpu: HMAC-SHA256 per message (wire.seal / decode(key=)) vs plain decode")
    for d in (192, 384):
        for B in (1, 8):
            q, s = ops.quantize_int8(torch.randn(B, 1, d))
            plain = wire.encode(H, 0, 7, q=q, scales=s)
            sealed = wire.seal(plain, KEY)
            seal_s = median_time(lambda: wire.seal(plain, KEY), [()], iters=iters)
            dec_s = median_time(lambda: wire.decode(plain, device=0), [()], iters=iters)
            dec_auth_s = median_time(lambda: wire.decode(sealed, device=0, key=KEY), [()], iters=iters)
            t.add(message=f"tokens int8 B={B} d={d}", bytes=sealed.numel(), tag_bytes=wire.TAG_BYTES,
                  seal_us=seal_s * 1e6, decode_us=dec_s * 1e6, decode_auth_us=dec_auth_s * 1e6,
                  auth_overhead_us=(seal_s + dec_auth_s - dec_s) * 1e6)
    for B in (1, 8):
        x = torch.randint(0, 256, (B, 3, 224, 224), dtype=torch.uint8)
        c = torch.zeros(12, dtype=torch.int64)

        def sign():
            return _proto.sign_batch_ctrl(c, KEY, auth.image_digest(x.numpy()))
        sec = median_time(sign, [()], iters=max(20, iters // 10))
        t.add(message=f"control + images sha256 B={B} 224px", bytes=x.numel(), tag_bytes=auth.CTRL_TAG_BYTES,
              seal_us=sec * 1e6, decode_us="-", decode_auth_us="-", auth_overhead_us=2 * sec * 1e6)
    return [t]
